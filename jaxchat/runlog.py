"""A run's log book: the named sections each stage and evaluation records, and the trainer's metrics.jsonl.

Sections: `write_section(run, stage, name, data)` merges one named section (UTC timestamp + data) into
`runs/<run>/<stage>/report.json`, under a file lock and atomically. Sections the pipeline writes:

    tokenizer/tokenizer    vocab size, chars, wall time, compression table        (stages.run_tokenizer)
    <stage>/training       steps, wall time, loss, val bpb, tokens/s, MFU, config (trainer.run)
    <stage>/core           {"CORE": x, "<task> (centered)": acc, "wall_time_s"}   (CORE evaluation)
    <stage>/chat_eval      {"ARC-Easy": acc, ..., "ChatCORE": x}                  (chat evaluation)

A section that took measurable time should carry `wall_time_s` (and `total_wall_time_s` when it spans several
invocations): the total wall clock is their sum, because timestamps alone cannot tell a resumed run's idle gaps
from work.

Metrics: `MetricsLog` writes `runs/<run>/<stage>/metrics.jsonl`, one JSON object per logged step; `read_metrics`
and `summarize_metrics` read it back (the training section is built from them). evaluate/report.py renders both.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

from jaxchat import paths

SECTIONS_FILE = "report.json"
METRICS_FILE = "metrics.jsonl"
SMOOTHING = 0.9  # the trainer's console EMA, so the report's "smoothed loss" matches what the log showed


def is_main_process() -> bool:
    import jax  # lazily: rendering from a plain script should not pay for jax before it needs it

    return jax.process_index() == 0


def utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def number(x) -> float | None:
    """`x` as a float when it is a finite real number (not a bool), else None."""
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; reports are meant to be shared
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# -- sections --------------------------------------------------------------------------------------------------------
def jsonable(value, where: str = "data"):
    """`value` with numpy/jax scalars and arrays, tuples, Paths and ConfigDicts turned into plain JSON types.

    Non-finite floats become the strings "nan"/"inf"/"-inf": json.dumps would write bare NaN, which is not JSON."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v, f"{where}[{k!r}]") for k, v in value.items()}
    if hasattr(value, "to_dict") and callable(value.to_dict):  # ml_collections.ConfigDict
        return jsonable(value.to_dict(), where)
    if isinstance(value, (list, tuple)):
        return [jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Path):
        return str(value)
    try:
        import numpy as np

        if isinstance(value, np.generic) or (hasattr(value, "shape") and hasattr(value, "dtype")):
            arr = np.asarray(value)  # also jax arrays (fetched to host)
            return jsonable(arr.item() if arr.ndim == 0 else arr.tolist(), where)
    except ImportError:
        pass
    raise TypeError(f"report section {where} is a {type(value).__name__}, which has no JSON form; "
                    "pass numbers, strings, lists or dicts")


def read_sections(path: Path) -> dict:
    """{name: {"timestamp", "data"}} from a report.json; a missing file is empty, a corrupt one warns and is empty."""
    if not path.exists():
        return {}
    try:
        sections = json.loads(path.read_text())
        if not isinstance(sections, dict):
            raise ValueError(f"expected a JSON object of sections, found {type(sections).__name__}")
    except (OSError, ValueError) as e:
        warnings.warn(f"{path}: unreadable report sections ({e}); skipping them", stacklevel=2)
        return {}
    good = {}
    for name, section in sections.items():
        if isinstance(section, dict) and isinstance(section.get("data"), dict):
            good[name] = section
        else:
            warnings.warn(f"{path}: section {name!r} lacks a 'data' object; skipping it", stacklevel=2)
    return good


class _FileLock:
    """An exclusive flock beside report.json, so two processes adding sections to one stage cannot lose each other's."""

    def __init__(self, path: Path):
        self.path, self._fd = path, None

    def __enter__(self):
        try:
            import fcntl
        except ImportError:  # not POSIX: writers are rare enough to go unlocked
            return self
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock


def write_section(run: str, stage: str, name: str, data: dict) -> Path | None:
    """Record (or replace) section `name` of `stage`; returns report.json's path, or None on non-zero processes."""
    if not isinstance(data, dict):
        raise TypeError(f"report section {stage}/{name} must be a dict, got {type(data).__name__}")
    payload = jsonable(data, f"{stage}/{name}")  # convert before touching the file: a bad value must not corrupt it
    if not is_main_process():
        return None
    directory = paths.run_dir(run, stage)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SECTIONS_FILE
    with _FileLock(directory / f".{SECTIONS_FILE}.lock"):
        sections = {}
        if path.exists():
            try:
                sections = json.loads(path.read_text())
                if not isinstance(sections, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as e:
                keep = path.with_name(f"{SECTIONS_FILE}.corrupt-{dt.datetime.now(dt.timezone.utc):%Y%m%dT%H%M%S}")
                os.replace(path, keep)
                warnings.warn(f"{path}: unreadable ({e}); moved it to {keep.name} and started afresh", stacklevel=2)
                sections = {}
        sections[name] = {"timestamp": utc_now(), "data": payload}
        write_atomic(path, json.dumps(sections, indent=2) + "\n")
    return path


class CharTally:
    """Passes texts through while counting them, for the tokenizer section's chars/docs figures."""

    def __init__(self, texts: Iterable[str]):
        self.texts, self.chars, self.docs = texts, 0, 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            self.chars += len(text)
            self.docs += 1
            yield text


# -- metrics ---------------------------------------------------------------------------------------------------------
class MetricsLog:
    """metrics.jsonl: one JSON object per logged step. On resume, lines past the restored step are dropped, so the
    file always describes exactly one run of the stage. Only the primary process writes it (all hold the same numbers)."""

    def __init__(self, path: Path, resume_step: int, primary: bool = True):
        self.path = path
        self._file = None
        if not primary:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    if json.loads(line).get("step", 0) <= resume_step:
                        kept.append(line)
                except json.JSONDecodeError:
                    pass  # a line cut by a crash mid-write
        path.write_text("".join(line + "\n" for line in kept))
        self._file = path.open("a")

    def write(self, record: dict) -> None:
        if self._file:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()

    def close(self) -> None:
        if self._file:
            self._file.close()


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl; unparsable lines (e.g. one cut by a crash) are skipped with one warning."""
    if not path.exists():
        return []
    records, bad = [], []
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        warnings.warn(f"{path}: unreadable ({e}); no metrics from it", stacklevel=2)
        return []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append(record)
        else:
            bad.append(i)
    if bad:
        warnings.warn(f"{path}: skipped {len(bad)} unreadable line(s) (first: line {bad[0]})", stacklevel=2)
    return records


def smooth(values: Iterable[float]) -> list[float]:
    """The EMA of `values` with the trainer's SMOOTHING."""
    out, ema = [], None
    for v in values:
        ema = v if ema is None else SMOOTHING * ema + (1 - SMOOTHING) * v
        out.append(ema)
    return out


def segments(records: list[dict]) -> list[list[dict]]:
    """Split timed records into invocations: `elapsed` restarts from zero when a run resumes."""
    found: list[list[dict]] = []
    last = None
    for r in records:
        e = number(r.get("elapsed"))
        if e is None:
            continue
        if last is None or e < last:
            found.append([])
        found[-1].append(r)
        last = e
    return found


def summarize_metrics(records: list[dict], before_step: int | None = None) -> dict:
    """Loss (last and smoothed), val bpb (last and best), mean tokens/s and MFU, and the loop time summed over
    invocations (records with step <= `before_step` only, when given)."""
    if before_step is not None:
        records = [r for r in records if r["step"] <= before_step]
    losses = [x for x in (number(r.get("loss")) for r in records) if x is not None]
    bpbs = [x for x in (number(r.get("val_bpb")) for r in records) if x is not None]
    runs = segments(records)
    # The first logged step of each invocation includes compilation; leave it out of the means unless it is all there is.
    steady = [r for seg in runs for r in seg[1:]] or [r for seg in runs for r in seg]

    def mean(key):
        xs = [x for x in (number(r.get(key)) for r in steady) if x is not None]
        return sum(xs) / len(xs) if xs else None

    return {
        "final_loss": losses[-1] if losses else None,
        "final_loss_smoothed": smooth(losses)[-1] if losses else None,
        "val_bpb": bpbs[-1] if bpbs else None,
        "min_val_bpb": min(bpbs) if bpbs else None,
        "tokens_per_s_mean": mean("tokens_per_s"),
        "mfu_mean": mean("mfu"),
        "loop_time_s": sum(number(seg[-1]["elapsed"]) for seg in runs),
    }


def write_training_section(config, stage: str, derived, *, start: int, step: int, target: int, wall_time_s: float,
                           device_kind: str, n_devices: int) -> Path | None:
    """The "training" section of a stage, from the trainer's end-of-run state plus its metrics.jsonl."""
    records = read_metrics(paths.run_dir(config.run, stage) / METRICS_FILE)
    stats = summarize_metrics(records)
    earlier = summarize_metrics(records, before_step=start)["loop_time_s"] if start else 0.0
    data = {
        "steps": step,
        "target_steps": target,
        "completed": step >= target,
        "resumed_from_step": start,
        "wall_time_s": wall_time_s,
        # Approximate across resumes: time an interrupted invocation spent past its last checkpoint is not in the log.
        "total_wall_time_s": earlier + wall_time_s,
        **{k: v for k, v in stats.items() if k != "loop_time_s"},
        "tokens_per_step": derived.total_batch_size,
        "tokens_trained": step * derived.total_batch_size,
        "num_params": derived.num_params,
        "flops_per_token": derived.flops_per_token,
        "device_kind": device_kind,
        "n_devices": n_devices,
        "config": {
            "depth": derived.model.n_layer, "model_dim": derived.model.n_embd, "n_head": derived.model.n_head,
            "n_kv_head": derived.model.n_kv_head, "vocab_size": derived.model.vocab_size,
            "sequence_len": derived.model.sequence_len,
            "device_batch_size": derived.device_batch_size, "total_batch_size": derived.total_batch_size,
            "grad_accum_steps": derived.grad_accum_steps, "embedding_lr": derived.embedding_lr,
            "unembedding_lr": derived.unembedding_lr, "matrix_lr": derived.matrix_lr,
            "weight_decay": config.weight_decay, "warmup_ratio": config.warmup_ratio,
            "warmdown_ratio": config.warmdown_ratio, "final_lr_frac": config.final_lr_frac, "seed": config.seed,
        },
    }
    return write_section(config.run, stage, "training", data)
