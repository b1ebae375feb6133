"""The base stage end to end through `train.py`: exact resume after SIGTERM and after kill -9, fallback past a
damaged checkpoint, clear errors, and bits-per-byte by its definition."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import pytest

REPO = Path(__file__).resolve().parent.parent
# A small, fast variant of the tiny config: 12 steps of 4 x 64 tokens, checkpoints every 4 steps.
FAST = ["--config=configs/tiny.py", "--config.depth=2", "--config.sequence_len=64", "--config.device_batch_size=4",
        "--config.num_iterations=12", "--config.save_every=4", "--config.eval_every=6", "--config.eval_tokens=1024",
        "--config.sample_every=0", "--config.tokenizer=tiny", "--config.tokenizer_max_chars=2000000"]


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    home = tmp_path_factory.mktemp("home")
    proc = train(home, "tok", "--stage=tokenizer")
    assert proc.returncode == 0, proc.stderr
    return home


def env(home):
    e = dict(os.environ, JAXCHAT_HOME=str(home), PYTHONUNBUFFERED="1")
    e.pop("XLA_FLAGS", None)  # one CPU device, as a user's laptop
    return e


def train(home, run, *args, timeout=300):
    cmd = [sys.executable, "train.py", *FAST, f"--config.run={run}", *args]
    return subprocess.run(cmd, cwd=REPO, env=env(home), capture_output=True, text=True, timeout=timeout)


def start(home, run, *args):
    cmd = [sys.executable, "train.py", *FAST, f"--config.run={run}", *args]
    return subprocess.Popen(cmd, cwd=REPO, env=env(home), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def losses(home, run):
    lines = (home / "runs" / run / "base" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    return {r["step"]: r["loss"] for r in records if "loss" in r}, {r["step"]: r["val_bpb"] for r in records if "val_bpb" in r}


def wait_for(predicate, proc, timeout=240):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, f"process exited early:\n{proc.stdout.read()}"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.1)


@pytest.fixture(scope="module")
def uninterrupted(home):
    proc = train(home, "straight", "--stage=base")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return losses(home, "straight")


def test_uninterrupted_run_trains_and_logs_every_step(uninterrupted):
    train_losses, val = uninterrupted
    assert sorted(train_losses) == list(range(1, 13))
    assert sorted(val) == [0, 6, 12]
    assert train_losses[12] < train_losses[1]
    assert val[12] < val[0]


def test_resume_after_sigterm_is_bit_identical(home, uninterrupted):
    proc = start(home, "sigterm", "--stage=base")
    metrics = home / "runs" / "sigterm" / "base" / "metrics.jsonl"
    wait_for(lambda: metrics.exists() and len(losses(home, "sigterm")[0]) >= 5, proc)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "received SIGTERM" in out and "stopped at step" in out
    stopped_at = max(losses(home, "sigterm")[0])
    assert stopped_at < 12
    resumed = train(home, "sigterm", "--stage=base")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed base from step {stopped_at}" in resumed.stdout
    assert losses(home, "sigterm") == uninterrupted  # exact float equality, every step and every val bpb


def test_resume_after_kill_9_is_bit_identical(home, uninterrupted):
    proc = start(home, "kill9", "--stage=base")
    manifest = home / "runs" / "kill9" / "base" / "checkpoints" / "8" / "jaxchat_manifest.json"
    wait_for(manifest.exists, proc)
    proc.kill()
    proc.communicate()
    resumed = train(home, "kill9", "--stage=base")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed base from step" in resumed.stdout
    assert losses(home, "kill9") == uninterrupted


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(home, uninterrupted):
    proc = train(home, "damaged", "--stage=base", "--config.num_iterations=8")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    step8 = home / "runs" / "damaged" / "base" / "checkpoints" / "8"
    victim = max((p for p in step8.rglob("*") if p.is_file() and "manifest" not in p.name), key=lambda p: p.stat().st_size)
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    resumed = train(home, "damaged", "--stage=base")
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "resumed base from step 4" in resumed.stdout
    assert "8" in resumed.stderr  # the warning names the damaged step
    # steps 5..12 were re-run from step 4's state: same numbers as the straight run
    assert {k: v for k, v in losses(home, "damaged")[0].items() if k > 4} == {
        k: v for k, v in uninterrupted[0].items() if k > 4}


def test_rerunning_a_finished_stage_does_no_work(home, uninterrupted):
    proc = train(home, "straight", "--stage=base")
    assert proc.returncode == 0
    assert "resumed base from step 12" in proc.stdout and "finished at step 12" in proc.stdout


def test_missing_tokenizer_names_the_command(tmp_path):
    proc = train(tmp_path, "notok", "--stage=base")
    assert proc.returncode == 2
    # the command given is this very one, with --stage=tokenizer (configs/notok.py does not exist)
    assert f"run `python train.py {' '.join(FAST)} --config.run=notok --stage=tokenizer`" in proc.stderr, proc.stderr


def test_bad_stage_and_bad_config_fail_clearly(home):
    proc = train(home, "x", "--stage=nope")
    assert proc.returncode == 2 and "--stage must be one of" in proc.stderr
    proc = train(home, "x", "--stage=base", "--config.depth=0")
    assert proc.returncode == 2 and "depth must be >= 1" in proc.stderr


def test_bits_per_byte_matches_a_hand_computed_example():
    from jaxchat.evaluate import bpb

    # vocab 4: token 3 is a special (0 bytes); token 1 is 2 bytes, token 2 is 3 bytes, token 0 is 1 byte.
    token_bytes = jnp.array([1, 2, 3, 0])
    logits = jnp.log(jnp.array([[[0.1, 0.2, 0.3, 0.4], [0.25, 0.25, 0.25, 0.25], [0.5, 0.1, 0.1, 0.3],
                                  [0.7, 0.1, 0.1, 0.1]]]))

    class Graph:  # the forward pass is replaced by fixed logits
        pass

    import jaxchat.model as model
    original = model.forward
    model.forward = lambda g, p, x: logits
    try:
        targets = jnp.array([[2, 3, 0, -1]])  # a 3-byte token, a special, a 1-byte token, an ignored target
        nats, nbytes = bpb.batch_nats_and_bytes(Graph, None, jnp.zeros((1, 4), jnp.int32), targets, token_bytes)
    finally:
        model.forward = original
    # counted: position 0 (-ln 0.3, 3 bytes) and position 2 (-ln 0.5, 1 byte); the special and the ignored are not
    expected_nats = -math.log(0.3) - math.log(0.5)
    assert float(nats) == pytest.approx(expected_nats, rel=1e-5)
    assert int(nbytes) == 4
    assert bpb.bits_per_byte(float(nats), int(nbytes)) == pytest.approx(expected_nats / (math.log(2) * 4), rel=1e-5)
    assert bpb.bits_per_byte(1.0, 0) == float("inf")


def test_inspect_lists_the_d20_parameter_count_from_shapes_alone(capsys):
    from jaxchat import inspect

    assert inspect.main(["--config=configs/d20.py"]) == 0
    out = capsys.readouterr().out
    assert "total parameters: 560,988,160" in out
    assert "(65536, 1280)" in out


def test_inspect_describes_a_trained_run(home, uninterrupted, capsys):
    from jaxchat import inspect

    assert inspect.main([str(home / "runs" / "straight")]) == 0
    out = capsys.readouterr().out
    assert "step 12" in out and "depth = 2" in out and "total parameters:" in out and "val_bpb" in out
