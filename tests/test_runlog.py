"""The run's log book: sections merge atomically and survive a corrupt file, values become plain JSON, metrics.jsonl
keeps exactly one run of a stage across resumes, and the training section is summed over invocations."""
import json
import types
from pathlib import Path

import numpy as np
import pytest

from jaxchat import model, paths, runlog


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCHAT_HOME", str(tmp_path))
    return tmp_path


def write_metrics(path: Path, n_steps: int, loss0: float, *, resume_at: int | None = None) -> None:
    """A plausible metrics.jsonl: val at step 0 and every 10 steps, `elapsed` restarting at `resume_at`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"step": 0, "val_bpb": loss0 / 3})]
    t0 = 0
    for step in range(1, n_steps + 1):
        if step == resume_at:
            t0 = step - 1
        r = {"step": step, "loss": loss0 * 0.97 ** step, "lr": 0.02, "tokens_per_s": 1000.0 + step, "mfu": None,
             "elapsed": 0.5 * (step - t0)}
        if step % 10 == 0:
            r["val_bpb"] = loss0 * 0.97 ** step / 3
        lines.append(json.dumps(r))
    path.write_text("\n".join(lines) + "\n")


def test_write_section_merges_and_replaces_atomically(home, monkeypatch):
    path = runlog.write_section("r", "base", "training", {"steps": np.int64(3), "loss": np.float32(0.5),
                                                           "arr": np.arange(3), "bad": float("nan")})
    runlog.write_section("r", "base", "core", {"CORE": 0.2})
    runlog.write_section("r", "base", "training", {"steps": 4})
    sections = json.loads(path.read_text())
    assert set(sections) == {"training", "core"}
    assert sections["training"]["data"] == {"steps": 4}
    assert sections["training"]["timestamp"].endswith("Z")
    assert path.stat().st_mode & 0o777 == 0o644
    before = path.read_text()
    with pytest.raises(TypeError, match="base/chat_eval\\['x'\\] is a object"):
        runlog.write_section("r", "base", "chat_eval", {"x": object()})
    assert path.read_text() == before  # rejected before the file is touched

    def broken_replace(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(runlog.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk full"):
        runlog.write_section("r", "base", "chat_eval", {"GSM8K": 0.1})
    monkeypatch.undo()
    assert path.read_text() == before
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no temp files left behind


def test_write_section_keeps_a_corrupt_file_aside(home):
    path = runlog.write_section("r", "sft", "training", {"steps": 1})
    path.write_text("garbage")
    with pytest.warns(UserWarning, match="report.json: unreadable"):
        runlog.write_section("r", "sft", "chat_eval", {"MMLU": 0.3})
    assert set(json.loads(path.read_text())) == {"chat_eval"}
    kept = [p for p in path.parent.iterdir() if p.name.startswith("report.json.corrupt-")]
    assert len(kept) == 1 and kept[0].read_text() == "garbage"


def test_json_conversion():
    assert runlog.jsonable({"a": (np.float32(1.5), np.int32(2)), 3: np.bool_(True), "p": Path("/x")}) == \
        {"a": [1.5, 2], "3": True, "p": "/x"}
    assert runlog.jsonable(float("inf")) == "inf"


def test_training_section_from_metrics(home):
    """The trainer's hook: loss/val bpb from metrics.jsonl, time summed over the invocations before a resume."""
    write_metrics(paths.run_dir("t", "base") / "metrics.jsonl", 40, 9.0, resume_at=25)
    config = types.SimpleNamespace(run="t", weight_decay=0.0, warmup_ratio=0.0, warmdown_ratio=0.2,
                                   final_lr_frac=0.0, seed=0)
    gpt = model.GPTConfig(vocab_size=1536, n_layer=2, n_head=2, n_kv_head=2, n_embd=128, sequence_len=64)
    derived = types.SimpleNamespace(total_batch_size=4096, num_params=123, flops_per_token=6e3, model=gpt,
                                    device_batch_size=4, grad_accum_steps=1, embedding_lr=0.3, unembedding_lr=0.005,
                                    matrix_lr=0.02)
    path = runlog.write_training_section(config, "base", derived, start=24, step=40, target=40, wall_time_s=9.0,
                                         device_kind="cpu", n_devices=4)
    data = json.loads(path.read_text())["training"]["data"]
    assert data["total_wall_time_s"] == pytest.approx(0.5 * 24 + 9.0)
    assert data["final_loss"] == pytest.approx(9.0 * 0.97 ** 40)
    assert data["val_bpb"] == pytest.approx(9.0 * 0.97 ** 40 / 3)
    assert data["tokens_per_step"] == 4096 and data["tokens_trained"] == 40 * 4096
    assert data["mfu_mean"] is None and 1000 < data["tokens_per_s_mean"] < 1041
    assert data["config"]["depth"] == 2 and data["completed"] is True


def test_metrics_log_drops_lines_past_the_resumed_step(tmp_path):
    path = tmp_path / "base" / runlog.METRICS_FILE
    log = runlog.MetricsLog(path, 0)
    for step in range(1, 6):
        log.write({"step": step, "loss": float(step)})
    log.close()
    with path.open("a") as f:
        f.write('{"step": 6, "lo')  # a line cut by a crash
    log = runlog.MetricsLog(path, 3)  # resumed from the step-3 checkpoint
    log.write({"step": 4, "loss": 0.5})
    log.close()
    assert [(r["step"], r["loss"]) for r in runlog.read_metrics(path)] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 0.5)]
    runlog.MetricsLog(tmp_path / "other" / runlog.METRICS_FILE, 0, primary=False).write({"step": 1})
    assert not (tmp_path / "other").exists()  # only the primary process writes
