"""One orchestrator: `train.py --stage=X` (stages.run_stage) trains a stage, then evaluates its last checkpoint once;
`--stage=all` runs every stage that way, so each evaluation runs once and re-running repeats none; runs/speedrun.sh
calls train.py once per stage and runs no evaluation of its own."""
import json
import os
import subprocess
import types
from pathlib import Path

import pytest

from jaxchat import config as C
from jaxchat import paths, stages
from jaxchat.evaluate import report
from jaxchat.evaluate import run as evaluate_run
from jaxchat.tokenizer import config_dir

REPO = Path(__file__).resolve().parent.parent
MODEL_STAGES = ("base", "mid", "sft", "rl")


@pytest.fixture
def pipeline(tmp_path, monkeypatch):
    """Stages that train instantly to `steps[stage]` and an evaluator that records eval.json, both counted in `calls`."""
    monkeypatch.setenv("JAXCHAT_HOME", str(tmp_path))
    config = C.load_config(["--config=configs/tiny.py", "--config.run=fake", "--config.eval.base_tasks=CORE"])
    tokenizer_dir = config_dir(config)
    tokenizer_dir.mkdir(parents=True)
    (tokenizer_dir / "tokenizer.json").write_text("{}")
    calls, steps, stopped = [], {"base": 40, "mid": 16, "sft": 8, "rl": 4}, set()

    def train_stage(config, stage, tokenizer, log=print):
        calls.append(("train", stage))
        return types.SimpleNamespace(stage=stage, step=steps[stage], completed=stage not in stopped)

    def evaluate_stage(config, stage, tasks=None, step=None, log=print):
        calls.append(("evaluate", stage))
        (paths.run_dir(config.run, stage) / "eval.json").write_text(json.dumps({"step": steps[stage]}))

    monkeypatch.setattr(stages, "load_for_config", lambda config: None)
    monkeypatch.setattr(stages, "train_stage", train_stage)
    monkeypatch.setattr(evaluate_run, "evaluate_stage", evaluate_stage)
    monkeypatch.setattr(report, "render", lambda run: paths.run_dir(run) / "report.md")
    for stage in MODEL_STAGES:
        paths.run_dir(config.run, stage).mkdir(parents=True)
    return types.SimpleNamespace(config=config, calls=calls, steps=steps, stopped=stopped)


def evaluations(calls) -> list[str]:
    return [stage for kind, stage in calls if kind == "evaluate"]


def test_all_evaluates_each_stage_once_and_rerunning_repeats_none(pipeline):
    stages.run_all(pipeline.config, log=lambda *a: None)
    assert pipeline.calls == [(kind, s) for s in MODEL_STAGES for kind in ("train", "evaluate")]  # CORE right after base
    stages.run_all(pipeline.config, log=lambda *a: None)
    assert evaluations(pipeline.calls) == list(MODEL_STAGES)


def test_stage_by_stage_then_all_evaluates_once_and_a_new_checkpoint_again(pipeline):
    for stage in MODEL_STAGES:  # runs/speedrun.sh's path
        stages.run_stage(pipeline.config, stage, log=lambda *a: None)
    stages.run_all(pipeline.config, log=lambda *a: None)
    assert evaluations(pipeline.calls) == list(MODEL_STAGES)
    pipeline.steps["sft"] = 12  # trained further: its last checkpoint is a new one
    stages.run_stage(pipeline.config, "sft", log=lambda *a: None)
    assert evaluations(pipeline.calls) == [*MODEL_STAGES, "sft"]


def test_a_stopped_stage_is_not_evaluated_and_all_stops_there(pipeline):
    pipeline.stopped.add("mid")
    with pytest.raises(SystemExit) as stop:
        stages.run_all(pipeline.config, log=lambda *a: None)
    assert stop.value.code == 0
    assert pipeline.calls == [("train", "base"), ("evaluate", "base"), ("train", "mid")]


STUB_PYTHON = """#!/usr/bin/env bash
printf '%s\\n' "$*" >> "$CALLS"
if [[ $1 == - ]]; then cat > /dev/null; echo "tiny tiny 0 tiny"; fi  # the config read: run, tokenizer, shards, data
"""


def test_speedrun_trains_each_stage_once_and_evaluates_nothing_itself(tmp_path):
    stub = tmp_path / "python"
    stub.write_text(STUB_PYTHON)
    stub.chmod(0o755)
    calls = tmp_path / "calls"
    env = dict(os.environ, PYTHON=str(stub), JAXCHAT_HOME=str(tmp_path / "home"), CALLS=str(calls))

    def speedrun(*extra, home="home") -> list[str]:
        calls.write_text("")
        proc = subprocess.run(["bash", "runs/tiny.sh", "--no-venv", *extra], cwd=REPO, capture_output=True,
                              env={**env, "JAXCHAT_HOME": str(tmp_path / home)}, text=True, timeout=60)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return calls.read_text().splitlines()

    args = "--config=configs/tiny.py"
    # runs/speedrun_gpt2.sh's measurement: the tokenizer, base training (with its CORE evaluation), nothing after
    base_only = speedrun("--base-only", home="gpt2")
    assert base_only[1:] == [f"train.py {args} --stage={s}" for s in ("tokenizer", "base")] + \
        [f"-m jaxchat.evaluate.report {args}"]
    first = speedrun("--rl")
    assert first[1:] == [f"train.py {args} --stage={s}" for s in ("tokenizer", *MODEL_STAGES)] + \
        [f"-m jaxchat.evaluate.report {args}"]
    assert (tmp_path / "home" / "runs" / "tiny" / "speedrun" / "rl.done").exists()
    assert speedrun("--rl")[1:] == [f"-m jaxchat.evaluate.report {args}"]  # resumed: every step's marker is there
