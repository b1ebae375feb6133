"""`python -m jaxchat.inspect <run dir | stage dir | checkpoints dir | step dir> [--verify]`
   `python -m jaxchat.inspect --config=configs/d20.py [--config.x=y]`  (the model a config builds, via eval_shape)

Prints the config, the saved steps (marking damaged or unfinished ones), the latest good step's metrics, and
every parameter's shape and dtype with the exact total, all from orbax's metadata and our JSON item: array
data is never read, so inspecting a d32 checkpoint is instant and needs no accelerator. For a run dir, each
stage is described in turn, followed by the tail of its `metrics.jsonl`.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from jaxchat import checkpoint as ckpt

STAGE_ORDER = ("base", "mid", "sft", "rl")
METRICS_TAIL = 5


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out += _flatten(v, key + ".") if isinstance(v, dict) and v else [(key, v)]
    return out


def _kv_lines(d: dict, indent: str = "  ") -> list[str]:
    return [f"{indent}{k} = {v!r}" if isinstance(v, str) else f"{indent}{k} = {v}" for k, v in _flatten(d)]


def param_table(shapes: dict) -> list[str]:
    """Aligned `path  shape  dtype  count` rows plus the exact total with thousands separators."""
    rows = [(path, str(shape), str(dtype), f"{math.prod(shape):,}") for path, (shape, dtype) in shapes.items()]
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(("parameter", "shape", "dtype", "count"))]
    fmt = lambda r: f"  {r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]:>{widths[3]}}"
    total = sum(math.prod(shape) for shape, _ in shapes.values())
    return [fmt(("parameter", "shape", "dtype", "count"))] + [fmt(r) for r in rows] + [f"total parameters: {total:,}"]


def _describe_checkpoints(directory: Path, verify: bool, only_step: int | None = None) -> list[str]:
    lines = [f"checkpoints: {directory}"]
    mngr = ckpt.open_read_only(directory)
    statuses = ckpt.step_statuses(mngr, verify=verify)
    if only_step is not None:
        statuses = [s for s in statuses if s.step == only_step]
    for s in statuses:
        lines.append(f"  step {s.step}" + ("" if s.ok else f"  INVALID: {s.reason}"))
    for p in ckpt.unfinished_saves(directory):
        lines.append(f"  {p.name}  UNFINISHED: save interrupted before orbax finalised it (ignored)")
    damaged = directory / ckpt.DAMAGED_DIR
    if damaged.is_dir():
        lines.append(f"  set aside as damaged: {', '.join(sorted(p.name for p in damaged.iterdir()))}")
    good = [s.step for s in statuses if s.ok]
    if not statuses:
        return lines + ["  (no finished checkpoints)"]
    if not good:
        return lines + ["  no usable checkpoint: every step above is damaged"]
    step = good[-1]
    meta = ckpt.read_meta(mngr, step)
    lines += [f"step {step}", "config:"] + _kv_lines(meta.get("config") or {})
    lines += ["metrics:"] + (_kv_lines(meta["metrics"]) if meta.get("metrics") else ["  (none)"])
    lines += ["data_state: " + json.dumps(meta.get("data_state"))]
    lines += ["params:"] + param_table(ckpt.item_shapes(mngr, step, "params"))
    return lines


def _metrics_tail(path: Path) -> list[str]:
    if not path.is_file():
        return []
    tail = path.read_text().splitlines()[-METRICS_TAIL:]
    return [f"{path} (last {len(tail)} lines):"] + [f"  {line}" for line in tail]


def _describe_stage(stage: Path, verify: bool) -> list[str]:
    lines = _describe_checkpoints(stage / "checkpoints", verify) if (stage / "checkpoints").is_dir() else []
    return lines + _metrics_tail(stage / "metrics.jsonl")


def _stage_dirs(run: Path) -> list[Path]:
    stages = [p for p in run.iterdir() if (p / "checkpoints").is_dir() or (p / "metrics.jsonl").is_file()]
    rank = lambda p: (STAGE_ORDER.index(p.name) if p.name in STAGE_ORDER else len(STAGE_ORDER), p.name)
    return sorted(stages, key=rank)


def describe(path, *, verify: bool = False) -> str:
    """Human-readable summary of a run dir, a stage dir, a `checkpoints/` dir, or one step dir."""
    path = Path(path).expanduser().absolute()
    if not path.is_dir():
        raise FileNotFoundError(f"{path} does not exist; pass a run dir ($JAXCHAT_HOME/runs/<run>), a stage dir "
                                "or its checkpoints/ dir")
    if path.name.isdigit() and ((path / ckpt.MANIFEST).exists() or (path / "meta").is_dir()):
        return "\n".join(_describe_checkpoints(path.parent, verify, only_step=int(path.name)))
    if (path / "checkpoints").is_dir() or (path / "metrics.jsonl").is_file():
        return "\n".join([f"stage: {path.name}"] + _describe_stage(path, verify))
    stages = _stage_dirs(path)
    if stages:
        parts = [f"run: {path}"] + [f"\n== {s.name} ==\n" + "\n".join(_describe_stage(s, verify)) for s in stages]
        return "\n".join(parts + _metrics_tail(path / "metrics.jsonl"))
    if any(p.name.isdigit() or ckpt.TMP_MARKER in p.name for p in path.iterdir()):
        return "\n".join(_describe_checkpoints(path, verify))
    raise FileNotFoundError(f"no checkpoints found under {path}: expected a run dir with <stage>/checkpoints/, "
                            "a stage dir, or a checkpoints dir with numbered step dirs")


def describe_config(config) -> str:
    """Parameter shapes of the model `config` builds, from `jax.eval_shape`: no weights are allocated."""
    from jaxchat import model
    from jaxchat.config import model_config

    _, abstract = model.abstract_params(model_config(config))
    shapes = ckpt.leaf_shapes(abstract)
    return "\n".join([f"config: {config.run} (shapes via jax.eval_shape)"] + param_table(shapes))


def main(argv=None) -> int:
    from jaxchat import config as C

    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m jaxchat.inspect", description=__doc__.splitlines()[0])
    ap.add_argument("path", nargs="?", help="run dir, stage dir, checkpoints dir or step dir (none with --config)")
    ap.add_argument("--verify", action="store_true", help="re-read every file against its checksum (slow)")
    try:
        config, args = C.parse_command(argv, ap, required=False)
        if config is not None:  # the model a config builds, not a checkpoint
            if args.path or args.verify:
                ap.error("--config describes a config's model: give it no path and no --verify")
            print(describe_config(config))
            return 0
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.path is None:
        ap.error("give a run, stage, checkpoints or step dir, or --config=configs/<name>.py")
    from absl import logging as absl_logging  # orbax logs its read-only notices at WARNING: not for this report
    absl_logging.set_verbosity(absl_logging.ERROR)
    try:
        print(describe(args.path, verify=args.verify))
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
