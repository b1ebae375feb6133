"""The report card: every stage and evaluation records named sections; `render` turns them into `report.md`.

Writing: `write_section(run, stage, name, data)` merges one named section (UTC timestamp + data) into
`runs/<run>/<stage>/report.json`. Sections the pipeline writes:

    tokenizer/training     vocab size, chars, wall time, compression table        (stages.run_tokenizer)
    <stage>/training       steps, wall time, loss, val bpb, tokens/s, MFU, config (trainer.run)
    <stage>/core           {"core": x, "centered": {task: acc}, "results": {...}} (CORE evaluation)
    <stage>/chat_eval      {"ARC-Easy": acc, ..., "ChatCORE": x}                  (chat evaluation)

A section that took measurable time should carry `wall_time_s` (and `total_wall_time_s` when it spans several
invocations): the total wall clock is their sum, because timestamps alone cannot tell a resumed run's idle gaps
from work.

Rendering: `render(run)` writes `runs/<run>/report.md` — the summary table first (the reference's report card),
the environment, each stage's sections in pipeline order, and loss / val bpb plots as PNGs beside it.

    python -m jaxchat.evaluate.report --config=configs/tiny.py [--config.run=NAME]
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

from jaxchat import paths

PIPELINE = ("tokenizer", "base", "mid", "sft", "rl")
STAGE_TITLES = {"tokenizer": "Tokenizer", "base": "Base model", "mid": "Midtraining", "sft": "Chat SFT", "rl": "Chat RL"}
SUMMARY_ROWS = ("CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE")
SUMMARY_STAGES = ("base", "mid", "sft", "rl")
MISSING = "—"
SECTIONS_FILE = "report.json"
REPORT_FILE = "report.md"
LOSS_PLOT = "report_loss.png"
BPB_PLOT = "report_val_bpb.png"
VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")
REPO = Path(__file__).resolve().parents[2]
SMOOTHING = 0.9  # the trainer's console EMA, so the report's "smoothed loss" matches what the log showed


# -- writing ---------------------------------------------------------------------------------------------------------
def _is_main_process() -> bool:
    import jax  # lazily: rendering from a plain script should not pay for jax before it needs it

    return jax.process_index() == 0


def _utc_now() -> str:
    return dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


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


def _write_atomic(path: Path, text: str) -> None:
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


def write_section(run: str, stage: str, name: str, data: dict) -> Path | None:
    """Record (or replace) section `name` of `stage`; returns report.json's path, or None on non-zero processes."""
    if not isinstance(data, dict):
        raise TypeError(f"report section {stage}/{name} must be a dict, got {type(data).__name__}")
    payload = jsonable(data, f"{stage}/{name}")  # convert before touching the file: a bad value must not corrupt it
    if not _is_main_process():
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
        sections[name] = {"timestamp": _utc_now(), "data": payload}
        _write_atomic(path, json.dumps(sections, indent=2) + "\n")
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


def _number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def _segments(records: list[dict]) -> list[list[dict]]:
    """Split timed records into invocations: `elapsed` restarts from zero when a run resumes."""
    segments: list[list[dict]] = []
    last = None
    for r in records:
        e = _number(r.get("elapsed"))
        if e is None:
            continue
        if last is None or e < last:
            segments.append([])
        segments[-1].append(r)
        last = e
    return segments


def summarize_metrics(records: list[dict], before_step: int | None = None) -> dict:
    """Loss (last and smoothed), val bpb (last and best), mean tokens/s and MFU, and the loop time summed over
    invocations (records with step <= `before_step` only, when given)."""
    if before_step is not None:
        records = [r for r in records if r["step"] <= before_step]
    losses = [x for x in (_number(r.get("loss")) for r in records) if x is not None]
    smooth = None
    for x in losses:
        smooth = x if smooth is None else SMOOTHING * smooth + (1 - SMOOTHING) * x
    bpbs = [x for x in (_number(r.get("val_bpb")) for r in records) if x is not None]
    segments = _segments(records)
    # The first logged step of each invocation includes compilation; leave it out of the means unless it is all there is.
    steady = [r for seg in segments for r in seg[1:]] or [r for seg in segments for r in seg]

    def mean(key):
        xs = [x for x in (_number(r.get(key)) for r in steady) if x is not None]
        return sum(xs) / len(xs) if xs else None

    return {
        "final_loss": losses[-1] if losses else None,
        "final_loss_smoothed": smooth,
        "val_bpb": bpbs[-1] if bpbs else None,
        "min_val_bpb": min(bpbs) if bpbs else None,
        "tokens_per_s_mean": mean("tokens_per_s"),
        "mfu_mean": mean("mfu"),
        "loop_time_s": sum(_number(seg[-1]["elapsed"]) for seg in segments),
    }


def write_training_section(config, stage: str, derived, *, start: int, step: int, target: int, wall_time_s: float,
                           device_kind: str, n_devices: int) -> Path | None:
    """The "training" section of a stage, from the trainer's end-of-run state plus its metrics.jsonl."""
    records = read_metrics(paths.run_dir(config.run, stage) / "metrics.jsonl")
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
            "depth": derived.n_layer, "model_dim": derived.model_dim, "n_head": derived.n_head,
            "n_kv_head": derived.n_kv_head, "vocab_size": derived.vocab_size, "sequence_len": derived.sequence_len,
            "device_batch_size": derived.device_batch_size, "total_batch_size": derived.total_batch_size,
            "grad_accum_steps": derived.grad_accum_steps, "embedding_lr": derived.embedding_lr,
            "unembedding_lr": derived.unembedding_lr, "matrix_lr": derived.matrix_lr,
            "weight_decay": config.weight_decay, "warmup_ratio": config.warmup_ratio,
            "warmdown_ratio": config.warmdown_ratio, "final_lr_frac": config.final_lr_frac, "seed": config.seed,
        },
    }
    return write_section(config.run, stage, "training", data)


# -- environment -----------------------------------------------------------------------------------------------------
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def git_info() -> dict:
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return {"commit": "unknown (not a git checkout)"}
    status = _git("status", "--porcelain")
    return {
        "branch": _git("rev-parse", "--abbrev-ref", "HEAD"),
        "commit": commit,
        "dirty": None if status is None else bool(status),
        "message": _git("log", "-1", "--format=%s"),
    }


def code_size() -> dict:
    """Characters, lines and files of the product code: the jaxchat package plus the two entry points."""
    files = [p for p in sorted((REPO / "jaxchat").rglob("*"))
             if p.is_file() and p.suffix in (".py", ".html", ".js", ".css") and "__pycache__" not in p.parts]
    files += [p for p in (REPO / "train.py", REPO / "serve.py") if p.is_file()]
    chars = lines = 0
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace")
        chars += len(text)
        lines += len(text.splitlines())
    return {"files": len(files), "lines": lines, "chars": chars, "tokens_approx": chars // 4}


def _ram_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def _version(package: str) -> str:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def environment() -> dict:
    """The machine and software the report is rendered with (no hostname: reports get shared)."""
    import jax

    devices = jax.devices()
    kinds = Counter(f"{d.device_kind} ({d.platform})" for d in devices)
    ram = _ram_bytes()
    return {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "ram": f"{ram / 2**30:.1f} GiB" if ram else "unknown",
        "accelerators": ", ".join(f"{n} × {k}" for k, n in kinds.items()),
        "processes": jax.process_count(),
        "python": platform.python_version(),
        "versions": {p: _version(p) for p in VERSIONED_PACKAGES},
        "git": git_info(),
        "code": code_size(),
    }


# -- rendering helpers -----------------------------------------------------------------------------------------------
def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def format_value(value, key: str = "") -> str:
    if value is None:
        return MISSING
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        if key.endswith("time_s"):
            return f"{value:,.1f} s ({format_duration(value)})"
        if value == 0:
            text = "0"
        elif abs(value) >= 1e9:
            text = f"{value:.4e}"
        elif abs(value) >= 1000:
            text = f"{value:,.0f}" if value.is_integer() else f"{value:,.1f}"
        elif abs(value) >= 0.01:
            text = f"{value:.4f}"
        else:
            text = f"{value:.4g}"
        return text
    if isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value):
        return ", ".join(format_value(v) for v in value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]], align: str = "---") -> list[str]:
    lines = ["| " + " | ".join(_cell(h) for h in header) + " |",
             "|" + "---|" + f"{align}|" * (len(header) - 1)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def render_data(data: dict) -> list[str]:
    """Scalars as one two-column table, then one table per nested dict or list of dicts."""
    scalars = [(k, v) for k, v in data.items() if not _is_table(v)]
    lines = _table(["Key", "Value"], [[k, format_value(v, k)] for k, v in scalars]) if scalars else []
    for key, value in data.items():
        if not _is_table(value):
            continue
        lines += ["", f"**{key}**", ""]
        if isinstance(value, dict):
            lines += _table(["Key", "Value"], [[k, format_value(v, k)] for k, v in value.items()])
        else:
            columns = list(dict.fromkeys(k for row in value for k in row))
            lines += _table(columns, [[format_value(row.get(c), c) for c in columns] for row in value])
    return lines


def _is_table(value) -> bool:
    if isinstance(value, dict):
        return bool(value) and all(not isinstance(v, (dict, list)) for v in value.values())
    return isinstance(value, list) and bool(value) and all(isinstance(v, dict) for v in value)


def _norm(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def _metric(value) -> float | None:
    if isinstance(value, dict):  # {"accuracy": x} from a more detailed evaluator
        value = value.get("accuracy", value.get("acc"))
    return _number(value)


def summary_values(stage_sections: dict[str, dict]) -> dict[str, dict[str, float]]:
    """{row: {stage: value}}: CORE from a stage's "core" section, the rest from its "chat_eval" section (names
    matched ignoring case and punctuation, so a chat_eval "arc_easy" fills ARC-Easy)."""
    # Tasks beyond the reference's (the tiny run's synthetic ones, ChatCORE_cat) get rows too, before ChatCORE.
    standard = {_norm(r) for r in SUMMARY_ROWS}
    extra = []
    for stage in SUMMARY_STAGES:
        for name, value in stage_sections.get(stage, {}).get("chat_eval", {}).get("data", {}).items():
            timing = name in ("wall_time_s", "total_wall_time_s")
            if not timing and _norm(name) not in standard and name not in extra and _metric(value) is not None:
                extra.append(name)
    rows = (*SUMMARY_ROWS[:-1], *extra, SUMMARY_ROWS[-1])
    table: dict[str, dict[str, float]] = {row: {} for row in rows}
    for stage in SUMMARY_STAGES:
        sections = stage_sections.get(stage, {})
        found = {_norm(k): v for k, v in sections.get("chat_eval", {}).get("data", {}).items()}
        if "core" in sections:  # only the CORE figure: the bundle's own task names (arc_easy, ...) are not chat evals
            found["core"] = next((v for k, v in sections["core"]["data"].items() if _norm(k) == "core"), None)
        for row in rows:
            value = _metric(found.get(_norm(row)))
            if value is not None:
                table[row][stage] = value
    return table


def _duration(data: dict) -> float | None:
    for key in ("total_wall_time_s", "wall_time_s"):
        if _number(data.get(key)) is not None:
            return _number(data[key])
    return None


def _parse_time(stamp) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    except (TypeError, ValueError):
        return None


def _stages(run_dir: Path) -> list[str]:
    """Pipeline stages first, in order, then any other stage folder that holds report data."""
    found = [p.name for p in sorted(run_dir.iterdir()) if p.is_dir()
             and ((p / SECTIONS_FILE).exists() or (p / "metrics.jsonl").exists())] if run_dir.is_dir() else []
    return [s for s in PIPELINE if s in found] + [s for s in found if s not in PIPELINE]


# -- plots -----------------------------------------------------------------------------------------------------------
def _tokens_per_step(record: dict, section_value) -> float | None:
    return _number(record.get("tokens_per_step")) or _number(section_value)


def plot(out_dir: Path, curves: dict[str, dict]) -> dict[str, Path]:
    """Loss and val bpb against steps and tokens, one line per stage; returns {"loss"|"val_bpb": png path}."""
    from matplotlib.figure import Figure  # no pyplot: no global backend state, Agg is Figure's default canvas
    from matplotlib.ticker import EngFormatter

    made = {}
    for key, filename, title in (("loss", LOSS_PLOT, "Training loss"), ("val_bpb", BPB_PLOT, "Validation bits per byte")):
        series = {stage: c[key] for stage, c in curves.items() if c[key]}
        if not series:
            continue
        fig = Figure(figsize=(11, 4), dpi=110, layout="constrained")
        ax_step, ax_tok = fig.subplots(1, 2)
        for i, (stage, points) in enumerate(series.items()):
            color = f"C{i}"
            steps = [p[0] for p in points]
            values = [p[2] for p in points]
            tokens = [p[1] for p in points if p[1] is not None]
            style = {"color": color, "label": stage}
            if key == "loss":
                smooth, ema = [], None
                for v in values:
                    ema = v if ema is None else SMOOTHING * ema + (1 - SMOOTHING) * v
                    smooth.append(ema)
                ax_step.plot(steps, values, color=color, alpha=0.25, linewidth=0.8)
                ax_step.plot(steps, smooth, **style)
                if len(tokens) == len(points):
                    ax_tok.plot(tokens, values, color=color, alpha=0.25, linewidth=0.8)
                    ax_tok.plot(tokens, smooth, **style)
            else:
                ax_step.plot(steps, values, marker="o", markersize=3, **style)
                if len(tokens) == len(points):
                    ax_tok.plot(tokens, values, marker="o", markersize=3, **style)
        ax_step.set_xlabel("step")
        ax_tok.set_xlabel("tokens")
        ax_tok.xaxis.set_major_formatter(EngFormatter())
        for ax in (ax_step, ax_tok):
            ax.set_ylabel(key.replace("_", " "))
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend()
        fig.suptitle(title + (" (faint: raw; solid: smoothed)" if key == "loss" else ""))
        path = out_dir / filename
        fig.savefig(path, format="png")
        made[key] = path
    return made


def _curves(stage: str, records: list[dict], training: dict) -> dict:
    per_step = training.get("tokens_per_step")
    loss, bpb = [], []
    for r in records:
        tps = _tokens_per_step(r, per_step)
        tokens = r["step"] * tps if tps else None
        if _number(r.get("loss")) is not None:
            loss.append((r["step"], tokens, float(r["loss"])))
        if _number(r.get("val_bpb")) is not None:
            bpb.append((r["step"], tokens, float(r["val_bpb"])))
    return {"loss": loss, "val_bpb": bpb}


# -- render ----------------------------------------------------------------------------------------------------------
def render(run: str) -> Path:
    """Write runs/<run>/report.md (and its PNGs) from whatever stages have recorded; returns its path."""
    run_dir = paths.run_dir(run)
    out = run_dir / REPORT_FILE
    if not _is_main_process():
        return out
    run_dir.mkdir(parents=True, exist_ok=True)
    stages = _stages(run_dir)
    sections = {s: read_sections(run_dir / s / SECTIONS_FILE) for s in stages}
    metrics = {s: read_metrics(run_dir / s / "metrics.jsonl") for s in stages}

    lines = [f"# jaxchat report: {run}", "", f"Rendered {_utc_now()}.", "", "## Summary", ""]
    values = summary_values(sections)
    lines += _table(["Metric"] + [s.upper() for s in SUMMARY_STAGES],
                    [[row] + [f"{values[row][s]:.4f}" if s in values[row] else MISSING for s in SUMMARY_STAGES]
                     for row in values], align=":---:")
    durations = {s: sum(d for d in (_duration(sec["data"]) for sec in sections[s].values()) if d is not None)
                 for s in stages}
    timed = {s: d for s, d in durations.items() if d}
    total = sum(timed.values())
    lines += ["", f"Total wall clock: {format_duration(total) if timed else MISSING}"
              + (" (" + ", ".join(f"{s} {format_duration(d)}" for s, d in timed.items()) + ")" if timed else "")]

    starts = [t - dt.timedelta(seconds=_duration(sec["data"]) or 0)
              for secs in sections.values() for sec in secs.values()
              if (t := _parse_time(sec.get("timestamp"))) is not None]
    lines += ["", "## Environment", ""] + _environment_lines(min(starts) if starts else None)

    for stage in stages:
        if not sections[stage]:
            continue
        lines += ["", f"## {STAGE_TITLES.get(stage, stage)}"]
        for name, section in sorted(sections[stage].items(), key=lambda kv: str(kv[1].get("timestamp"))):
            lines += ["", f"### {name.replace('_', ' ')}", "", f"_recorded {section.get('timestamp', 'at an unknown time')}_", ""]
            lines += render_data(section["data"])

    curves = {s: _curves(s, metrics[s], sections[s].get("training", {}).get("data", {})) for s in stages if metrics[s]}
    made = plot(run_dir, curves) if curves else {}
    if made:
        lines += ["", "## Plots", ""]
        no_tokens = [s for s, c in curves.items() if any(p[1] is None for p in c["loss"] + c["val_bpb"])]
        if no_tokens:
            lines += [f"(not on the tokens axis, no tokens per step recorded: {', '.join(no_tokens)})", ""]
        for key, path in made.items():
            lines += [f"![{key.replace('_', ' ')}]({path.name})", ""]

    _write_atomic(out, "\n".join(lines).rstrip("\n") + "\n")
    return out


def _environment_lines(started: dt.datetime | None) -> list[str]:
    env = environment()
    git, code = env["git"], env["code"]
    dirty = {True: " (dirty: uncommitted changes)", False: " (clean)", None: ""}[git.get("dirty")]
    lines = [
        f"- Run started: {started.strftime('%Y-%m-%d %H:%M:%S UTC') + ' (approx.)' if started else MISSING}",
        f"- Git: commit {git['commit']}{dirty}" + (f" on {git['branch']}" if git.get("branch") else ""),
    ]
    if git.get("message"):
        lines.append(f"- Commit message: {git['message']}")
    lines += [
        f"- Platform: {env['platform']}",
        f"- CPUs: {env['cpus']}; RAM: {env['ram']}",
        f"- Accelerators: {env['accelerators']}" + (f" across {env['processes']} processes" if env["processes"] > 1 else ""),
        f"- Python {env['python']}; " + ", ".join(f"{p} {v}" for p, v in env["versions"].items()),
        f"- Code (jaxchat/ + train.py + serve.py): {code['chars']:,} characters, {code['lines']:,} lines, "
        f"{code['files']:,} files, ~{code['tokens_approx']:,} tokens",
    ]
    return lines


def main(argv: list[str] | None = None) -> int:
    from jaxchat import config as C

    argv = sys.argv[1:] if argv is None else argv
    try:
        config, rest = C.parse_args(argv)
        if rest:
            raise C.ConfigError(f"unknown argument {rest[0]!r} (usage: python -m jaxchat.evaluate.report "
                                "--config=configs/<name>.py [--config.run=NAME])")
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not paths.run_dir(config.run).is_dir():
        print(f"error: no run directory {paths.run_dir(config.run)}: nothing to report yet "
              f"(train first, e.g. {C.command(config, 'train.py', '--stage=all')})", file=sys.stderr)
        return 2
    print(render(config.run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
