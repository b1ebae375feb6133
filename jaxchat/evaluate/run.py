"""Evaluate a stage's checkpoint: `python -m jaxchat.evaluate --config=configs/X.py --stage=base|mid|sft|rl [--tasks=...]`.

Tasks are CORE (the DCLM bundle; the default for base) and the chat tasks in `jaxchat.tasks.EVAL_TASKS` (the default
for mid/sft/rl is `config.eval.chat_tasks`). Results are printed, saved to `runs/<run>/<stage>/eval.json` (merged
with earlier results, so tasks can be run separately) and recorded as the stage's report section; CORE also writes
`core.csv`. A task whose data cannot be had (offline, no bundle) is skipped with the reason, the others still run.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

from jaxchat import paths, runlog
from jaxchat.config import ConfigError, parse_command
from jaxchat.tasks import CHATCORE_TASKS

STAGES = ("base", "mid", "sft", "rl")


def default_tasks(config, stage: str) -> list[str]:
    text = config.eval.base_tasks if stage == "base" else config.eval.chat_tasks
    return [t.strip() for t in text.split(",") if t.strip()]


def evaluate_stage(config, stage: str, tasks: list[str] | None = None, step: int | None = None,
                   log: Callable[[str], None] = print) -> dict:
    """Run `tasks` on the stage's checkpoint; returns {"step", "core"?, "chat"?, "skipped"}."""
    import jax

    from jaxchat import sharding
    from jaxchat.checkpoint import load_model
    from jaxchat.data.fetch import FetchError
    from jaxchat.data.hub import HubDatasetUnavailable
    from jaxchat.data.hub import offline as hub_offline
    from jaxchat.engine import Engine
    from jaxchat.evaluate import chat_eval, core
    from jaxchat.tasks import EVAL_TASKS, ONLINE, eval_task

    if stage not in STAGES:
        raise ValueError(f"--stage must be one of {', '.join(STAGES)}, got {stage!r}")
    tasks = default_tasks(config, stage) if tasks is None else tasks
    unknown = [t for t in tasks if t != "CORE" and t not in EVAL_TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {', '.join(unknown)}; choose from CORE, {', '.join(EVAL_TASKS)}")
    # This process's devices: the weights are replicated over them and CORE's and the chat evals' rows are split
    # over them (every process scores its own share of the problems).
    mesh = sharding.make_mesh(1, devices=jax.local_devices())
    cfg, params, ckpt_step, tokenizer = load_model(config, stage, step=step, mesh=mesh)
    engine = Engine(cfg, params, tokenizer, mesh=mesh)
    out_dir = paths.run_dir(config.run, stage)
    out_dir.mkdir(parents=True, exist_ok=True)
    log(f"evaluating {config.run}/{stage} step {ckpt_step} on {', '.join(tasks) or 'nothing'}")
    summary: dict = {"step": ckpt_step, "skipped": {}}

    if "CORE" in tasks:
        t0 = time.perf_counter()
        try:
            bundle = paths.eval_bundle_dir() if hub_offline() else core.download_bundle()
            if not (Path(bundle) / "core.yaml").exists():
                raise FileNotFoundError(f"no CORE bundle in {bundle} and offline mode is on; fetch it where the "
                                        f"network is reachable: `{core.FETCH_COMMAND}`")
            result = core.evaluate_core(engine.token_stats, tokenizer, bundle,
                                        max_per_task=config.eval.core_max_per_task,
                                        max_seq_len=core.crop_length(config), row_tokens=cfg.sequence_len, log=log)
        except (FetchError, FileNotFoundError) as e:
            summary["skipped"]["CORE"] = str(e).splitlines()[0]
            log(f"CORE skipped: {summary['skipped']['CORE']}")
        else:
            if jax.process_index() == 0:
                core.write_results_csv(result, out_dir / "core.csv")
            summary["core"] = result
            log(f"CORE {result['core']:.4f}")
            centered = {f"{k} (centered)": v for k, v in result["centered"].items()}
            runlog.write_section(config.run, stage, "core", {"CORE": result["core"], **centered,
                                                             "wall_time_s": time.perf_counter() - t0})

    chat_names = [t for t in tasks if t != "CORE"]
    if chat_names:
        t0 = time.perf_counter()
        available = {}
        for name in chat_names:
            try:
                task = eval_task(name)
                len(task)  # loads (or downloads) the data now, so a missing dataset is reported here
            except (HubDatasetUnavailable, FetchError, FileNotFoundError) as e:
                hint = " (needs the hub's data)" if name in ONLINE else ""
                summary["skipped"][name] = str(e).splitlines()[0] + hint
                log(f"{name} skipped: {summary['skipped'][name]}")
                continue
            available[name] = task
        result = chat_eval.run_chat_eval(available, engine=engine, eval_cfg=config.eval, log=log)
        summary["chat"] = result
        chat_seconds = time.perf_counter() - t0

    if jax.process_index() == 0:
        merged = _save(out_dir / "eval.json", summary)
        if "chat" in summary:  # the section holds every task evaluated on this step, not only this invocation's
            tasks_done = merged["chat"]["tasks"]
            section = {name: r["accuracy"] for name, r in tasks_done.items()}
            section.update({k: merged["chat"][k] for k in ("ChatCORE", "ChatCORE_cat") if k in merged["chat"]})
            runlog.write_section(config.run, stage, "chat_eval", {**section, "wall_time_s": chat_seconds})
    return summary


def _save(path: Path, summary: dict) -> dict:
    """Merge into eval.json: results of the same checkpoint step accumulate task by task; a new step starts afresh."""
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = {}
    if old.get("step") != summary["step"]:
        old = {}
    merged = {**old, **summary, "skipped": {**old.get("skipped", {}), **summary["skipped"]}}
    if "chat" in old and "chat" in summary:
        merged["chat"] = {**old["chat"], **summary["chat"],
                          "tasks": {**old["chat"].get("tasks", {}), **summary["chat"]["tasks"]}}
        done = merged["chat"]["tasks"]
        for key, names in (("ChatCORE", CHATCORE_TASKS), ("ChatCORE_cat", CHATCORE_TASKS[:3])):
            if all(n in done for n in names):  # recomputed over the merged tasks
                merged["chat"][key] = sum(done[n]["centered"] for n in names) / len(names)
    for name in [*merged.get("chat", {}).get("tasks", {}), *(["CORE"] if "core" in merged else [])]:
        merged["skipped"].pop(name, None)  # evaluated now, whatever an earlier attempt said
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(merged, indent=1, default=float) + "\n")
    os.replace(tmp, path)
    return merged


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    from jaxchat.checkpoint import CheckpointError, IncompatibleCheckpointError

    ap = argparse.ArgumentParser(prog="python -m jaxchat.evaluate", description="Evaluate a trained stage.")
    ap.add_argument("--stage", required=True, choices=STAGES)
    ap.add_argument("--tasks", default=None,
                    help="comma-separated: CORE and/or chat tasks (default: config.eval.base_tasks for base, "
                         "config.eval.chat_tasks otherwise)")
    ap.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the newest)")
    try:
        config, args = parse_command(argv, ap)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    tasks = None if args.tasks is None else [t.strip() for t in args.tasks.split(",") if t.strip()]
    try:
        evaluate_stage(config, args.stage, tasks, args.step)
    except (ValueError, FileNotFoundError, CheckpointError, IncompatibleCheckpointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
