"""The base stage end to end through `train.py`: exact resume after SIGTERM and after kill -9, fallback past a
damaged checkpoint, clear errors, and bits-per-byte by its definition. Then, in process, the loop's host side:
prefetched batches, metrics read one step late, exact resume with batches queued, data errors on the loop's thread."""
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax.numpy as jnp
import numpy as np
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
    assert proc.returncode == 2 and "argument --stage: invalid choice: 'nope'" in proc.stderr
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
    original = model.forward_losses  # the loss path bpb shares with training (chunked when the config says so)
    model.forward_losses = lambda g, p, x, t: model.token_losses(logits, t)
    try:
        targets = jnp.array([[2, 3, 0, -1]])  # a 3-byte token, a special, a 1-byte token, an ignored target
        nats, nbytes = bpb.batch_nats_and_bytes(Graph, None, jnp.zeros((1, 4), jnp.int32), targets, token_bytes)
    finally:
        model.forward_losses = original
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


# ---- the host side of the loop, in process: prefetched batches, metrics read one step late -------------------------
# A one-layer model on a counting stream (batch i is seeded by i, its state is i) with two micro-batches per step, on
# the session's emulated devices: the loop's bookkeeping is what is tested, not the model.

TOK_VOCAB = 265  # fixtures_tok.ByteTokenizer's


class Counting:
    """Batch i of a slot holds tokens drawn from a generator seeded by (slot, i); `drawn` records every i handed out
    (on whichever thread asked). `fail_at`: raise instead of handing out that batch, as a damaged shard would."""

    def __init__(self, rows, seq_len, slot, drawn, fail_at=None):
        self.rows, self.seq_len, self.slot, self.drawn, self.fail_at = rows, seq_len, slot, drawn, fail_at
        self.i = 0

    def __iter__(self):
        return self

    def __next__(self):
        if self.i == self.fail_at:
            raise ValueError(f"batch {self.i}: row group 3 of shard_00007.parquet is damaged")
        x = np.random.default_rng((self.slot, self.i)).integers(0, TOK_VOCAB, (self.rows, self.seq_len + 1), np.int32)
        self.drawn.append(self.i)
        self.i += 1
        return {"inputs": x[:, :-1], "targets": x[:, 1:]}

    def get_state(self):
        return {"i": self.i}

    def set_state(self, state):
        self.i = state["i"]


def loop_config(run, *, prefetch=2, num_iterations=12, save_every=-1):
    import jax

    from jaxchat import config as C

    c = C.default_config()
    c.run = run
    c.depth, c.head_dim, c.vocab_size, c.sequence_len, c.device_batch_size = 1, 32, TOK_VOCAB, 32, 2
    c.total_batch_size = 2 * c.device_batch_size * c.sequence_len * len(jax.devices())  # two micro-batches a step
    c.compute_dtype, c.muon_ns_dtype = "float32", "float32"
    c.num_iterations, c.save_every, c.prefetch = num_iterations, save_every, prefetch
    c.eval_every, c.sample_every, c.log_every = -1, -1, 1
    return c


def counting_stage(config, drawn, *, fail_at=None, on_step=None):
    import jax

    from jaxchat import config as C
    from jaxchat import optim, trainer

    derived = C.derive(config, len(jax.devices()))

    def schedule(step):
        if on_step:
            on_step(step)
        return optim.schedule(config, derived, step)

    return trainer.Stage(name="base", num_iterations=config.num_iterations, val_data=None, schedule=schedule,
                         train_data=lambda rows, slot, n: Counting(rows, config.sequence_len, slot, drawn, fail_at),
                         sample_prompts=())


def run_loop(config, drawn=None, **kw):
    from fixtures_tok import ByteTokenizer

    from jaxchat import trainer

    return trainer.run(config, counting_stage(config, [] if drawn is None else drawn, **kw), ByteTokenizer(),
                       log=lambda s: None)


def logged(run):
    from jaxchat import paths

    lines = (paths.run_dir(run, "base") / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: (r["loss"], r["grad_norm"]) for r in map(json.loads, lines) if "loss" in r}


def synchronous_losses(config):
    """The same steps on the same batches, each batch built and each loss read before the next step is dispatched."""
    import jax

    from jaxchat import config as C
    from jaxchat import model, optim, sharding, train_step, trainer

    derived = C.derive(config, len(jax.devices()))
    mesh = sharding.make_mesh(config.mesh_data, config.mesh_fsdp)
    graphdef, abstract = model.abstract_params(C.model_config(config,
                                                                           attention=trainer.resolve_attention(config)))
    tx = optim.make_optimizer(config, derived)
    ps = sharding.param_shardings(abstract, mesh)
    ss = sharding.state_shardings(tx, abstract, mesh)
    bs = sharding.batch_sharding(mesh)
    step_fn = train_step.jit_train_step(graphdef, tx, param_shardings=ps, state_shardings=ss, batch_sharding=bs)
    params, opt_state = train_step.init_state(C.model_config(config), config.seed, tx,
                                              param_shardings=ps, state_shardings=ss)
    stream = Counting(config.device_batch_size * len(jax.devices()), config.sequence_len, 0, [])
    out = {}
    for step in range(config.num_iterations):
        micro = [next(stream) for _ in range(derived.grad_accum_steps)]
        batch = {k: jax.device_put(np.stack([m[k] for m in micro]), bs) for k in ("inputs", "targets")}
        params, opt_state, metrics = step_fn(params, opt_state, batch, optim.schedule(config, derived, step))
        out[step + 1] = (float(metrics["loss"]), float(metrics["grad_norm"]))
    return out


@pytest.fixture(scope="module")
def prefetched_straight():
    config = loop_config("prefetch-straight", prefetch=4)
    assert run_loop(config).completed
    return logged("prefetch-straight")


def test_metrics_read_a_step_late_are_every_steps_own(prefetched_straight):
    # Loss and grad norm of every step, logged one step late from a prefetched stream, are exactly those of a loop
    # that builds each batch and reads each loss before dispatching the next step.
    assert prefetched_straight == synchronous_losses(loop_config("prefetch-sync"))


def test_prefetch_0_is_the_synchronous_loop_with_the_same_numbers(prefetched_straight):
    assert run_loop(loop_config("prefetch-0", prefetch=0)).completed
    assert logged("prefetch-0") == prefetched_straight


def test_resume_after_a_stop_with_batches_queued_is_exact(prefetched_straight, capsys):
    import signal as sig
    import threading

    from jaxchat import inspect, paths

    if threading.current_thread() is not threading.main_thread():
        pytest.skip("needs the main thread: the loop installs its signal handlers there")
    drawn = []

    def sigterm_at_step_5(step):
        if step == 5:
            sig.raise_signal(sig.SIGTERM)

    first = run_loop(loop_config("prefetch-resume", prefetch=4), drawn, on_step=sigterm_at_step_5)
    assert not first.completed and first.step == 6  # the signal lands before step 6 is dispatched; 6 finishes
    # the prefetch thread had drawn past the last step consumed (2 micro-batches a step): those batches were queued
    assert max(drawn) + 1 > 2 * 6, drawn
    capsys.readouterr()
    assert inspect.main([str(paths.run_dir("prefetch-resume", "base") / "checkpoints")]) == 0
    shown = capsys.readouterr().out
    # the stream as step 6 left it (12 micro-batches consumed), not where the prefetch thread had drawn it to
    assert "\nstep 6\n" in shown and 'data_state: {"slots": [{"i": 12}]}' in shown, shown
    second = run_loop(loop_config("prefetch-resume", prefetch=4))
    assert second.completed and second.step == 12
    assert logged("prefetch-resume") == prefetched_straight  # every step's loss and grad norm, bit for bit


def test_an_error_in_the_data_pipeline_surfaces_on_the_training_thread():
    import threading

    with pytest.raises(ValueError, match="shard_00007.parquet is damaged") as failure:
        run_loop(loop_config("prefetch-error", prefetch=2), fail_at=7)  # step 4's second micro-batch
    # raised where it happened, inside the stream (on the prefetch thread), and re-raised on this one
    assert any(entry.name == "__next__" and entry.path == Path(__file__) for entry in failure.traceback)
    assert "prefetch thread" in "".join(getattr(failure.value, "__notes__", []))
    assert not [t for t in threading.enumerate() if t.name == "jaxchat-prefetch"]  # the thread is gone
    assert sorted(logged("prefetch-error")) == [1, 2, 3]  # what ran before the error was logged


def test_prefetcher_stays_at_most_depth_ahead_and_closes_when_asked():
    import threading

    from jaxchat.trainer import Prefetcher

    produced = []

    def produce():
        produced.append(len(produced))
        return produced[-1]

    with Prefetcher(produce, count=10, depth=2) as batches:
        assert [next(batches), next(batches)] == [0, 1]
        deadline = time.time() + 10
        while len(produced) < 5 and time.time() < deadline:  # 2 taken + 2 queued + 1 waiting to be queued
            time.sleep(0.01)
        time.sleep(0.2)
        assert len(produced) == 5 and batches.queued() == 2
    assert not [t for t in threading.enumerate() if t.name == "jaxchat-prefetch"]
    assert len(produced) == 5  # closing stopped it: nothing more was produced
