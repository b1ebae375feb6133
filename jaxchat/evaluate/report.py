"""The report card: `render(run)` writes `runs/<run>/report.md` from the run's log book (runlog.py) — the summary
table first (the reference's report card), the environment, each stage's sections in pipeline order, and loss / val
bpb plots as PNGs beside it.

    python -m jaxchat.evaluate.report --config=configs/tiny.py [--config.run=NAME]
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from jaxchat import paths, runlog
from jaxchat.runlog import METRICS_FILE, SECTIONS_FILE, number

PIPELINE = ("tokenizer", "base", "mid", "sft", "rl")
STAGE_TITLES = {"tokenizer": "Tokenizer", "base": "Base model", "mid": "Midtraining", "sft": "Chat SFT", "rl": "Chat RL"}
SUMMARY_ROWS = ("CORE", "ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee", "ChatCORE")
SUMMARY_STAGES = ("base", "mid", "sft", "rl")
MISSING = "—"
REPORT_FILE = "report.md"
LOSS_PLOT = "report_loss.png"
BPB_PLOT = "report_val_bpb.png"
VERSIONED_PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "grain", "numpy")
REPO = Path(__file__).resolve().parents[2]


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
    return number(value)


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
        if number(data.get(key)) is not None:
            return number(data[key])
    return None


def _parse_time(stamp) -> dt.datetime | None:
    try:
        return dt.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.timezone.utc)
    except (TypeError, ValueError):
        return None


def _stages(run_dir: Path) -> list[str]:
    """Pipeline stages first, in order, then any other stage folder that holds report data."""
    found = [p.name for p in sorted(run_dir.iterdir()) if p.is_dir()
             and ((p / SECTIONS_FILE).exists() or (p / METRICS_FILE).exists())] if run_dir.is_dir() else []
    return [s for s in PIPELINE if s in found] + [s for s in found if s not in PIPELINE]


# -- plots -----------------------------------------------------------------------------------------------------------
def _tokens_per_step(record: dict, section_value) -> float | None:
    return number(record.get("tokens_per_step")) or number(section_value)


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
                smooth = runlog.smooth(values)
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
        if number(r.get("loss")) is not None:
            loss.append((r["step"], tokens, float(r["loss"])))
        if number(r.get("val_bpb")) is not None:
            bpb.append((r["step"], tokens, float(r["val_bpb"])))
    return {"loss": loss, "val_bpb": bpb}


# -- render ----------------------------------------------------------------------------------------------------------
def render(run: str) -> Path:
    """Write runs/<run>/report.md (and its PNGs) from whatever stages have recorded; returns its path."""
    run_dir = paths.run_dir(run)
    out = run_dir / REPORT_FILE
    if not runlog.is_main_process():
        return out
    run_dir.mkdir(parents=True, exist_ok=True)
    stages = _stages(run_dir)
    sections = {s: runlog.read_sections(run_dir / s / SECTIONS_FILE) for s in stages}
    metrics = {s: runlog.read_metrics(run_dir / s / METRICS_FILE) for s in stages}

    lines = [f"# jaxchat report: {run}", "", f"Rendered {runlog.utc_now()}.", "", "## Summary", ""]
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

    runlog.write_atomic(out, "\n".join(lines).rstrip("\n") + "\n")
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
    import argparse

    from jaxchat import config as C

    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m jaxchat.evaluate.report",
                                 description="Write a run's report card, report.md in its run directory.")
    try:
        config, _ = C.parse_command(argv, ap)
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
