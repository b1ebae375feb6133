"""Time the jitted training step for any config on whatever devices are present: tokens/s and MFU.

    python bench/train_step.py --config=configs/d20.py --config.device_batch_size=32 [--steps=20] [--warmup=3]

Random tokens, real model, real optimizer, real sharding (all local devices on the fsdp axis). The step is compiled
ahead of time from abstract shapes first (jaxchat.dryrun.TrainProgram), so XLA's memory analysis says whether it fits
the device before a single weight is allocated (`--memory-limit-gib`, default: the device's own limit where it reports one). Compile time is
reported separately; the step time is the median over `--steps` synced steps. MFU is against the card's bf16 peak
(jaxchat.hardware.PEAK_FLOPS), or absent for an unknown device. The last line printed is one JSON object.

`--with-data` also feeds the same step from the real pretraining pipeline (the config's dataset and tokenizer under
$JAXCHAT_HOME; for the tiny corpus without one, a scratch home with the corpus generated and a tokenizer trained on
2M chars) and times five loops, mean ms per step over `--steps`, the median of `--rounds` rounds:
  device    the pre-placed random batch, each loss read one step late: the device alone;
  device_sync  the same, each loss read at once (what reading one step late gains alone);
  host      building one step's batch alone: read, tokenize, pack, stack, place on the devices;
  serial    the loop before prefetching: build the batch, run the step, read its loss, all on one thread;
  overlap   the trainer's loop: batches built `--prefetch` steps ahead on trainer.Prefetcher's thread, each loss read
            after the next step was dispatched.
`hidden` = (serial - overlap) / host is the share of the host's work taken off the step's critical path (1: all of
it; overlap = device then). On a CPU the "device" is the same cores as the host, so there it is bounded by the cores
the step leaves idle.

    python bench/train_step.py --config=configs/tiny.py --with-data [--prefetch=2] [--rounds=3]
"""
import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxchat import config as C  # noqa: E402
from jaxchat import model  # noqa: E402
from jaxchat.dryrun import TrainProgram  # noqa: E402

def device_memory_limit() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("bytes_limit")


def peak_memory() -> int | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats.get("peak_bytes_in_use")


def data_source(cfg):
    """(train shard paths, tokenizer) of cfg's dataset: its tokenizer under $JAXCHAT_HOME if trained, else (tiny corpus
    only) a scratch $JAXCHAT_HOME with the corpus generated and a tokenizer trained on its first 2M chars."""
    from jaxchat import paths
    from jaxchat.data import shards, tiny_corpus
    from jaxchat.tokenizer import Tokenizer, load_for_config

    try:
        tok = load_for_config(cfg)
    except FileNotFoundError:
        pass
    else:
        return shards.list_shards(cfg.dataset)[0], tok
    if cfg.dataset != "tiny":
        raise SystemExit(f"--with-data needs the {cfg.dataset} shards and a trained tokenizer under {paths.home()}")
    os.environ["JAXCHAT_HOME"] = tempfile.mkdtemp(prefix="jaxchat-bench-")
    atexit.register(shutil.rmtree, os.environ["JAXCHAT_HOME"], ignore_errors=True)
    tiny_corpus.ensure_tiny_corpus()
    train_paths, _ = shards.list_shards("tiny")
    return train_paths, Tokenizer.train(shards.iter_texts(train_paths, max_chars=2_000_000), cfg.vocab_size)


def host_overlap(prog, params, opt_state, random_batch, steps: int, warmup: int, depth: int, rounds: int, log):
    """Mean ms per step of five loops on the same compiled step, each run `rounds` times in turn (the median round is
    kept, so drift on a shared machine hits every loop alike): the pre-placed random batch with the loss read late
    (the device alone) and at once, the real pipeline's batches alone (the host alone), both on one thread (serial),
    and the trainer's overlapped loop."""
    from jaxchat import sharding, trainer
    from jaxchat.data.pretrain import pretrain_dataset
    from jaxchat.dryrun import HPARAMS

    cfg = prog.cfg
    train_paths, tok = data_source(cfg)
    slots, n_slots, slot_devices = sharding.batch_readers(prog.mesh)
    data = trainer.Readers(lambda rows, slot, n: iter(pretrain_dataset(train_paths, tok, rows, cfg.sequence_len, slot,
                                                                       n, packing=cfg.packing)),
                           cfg.device_batch_size * slot_devices, slots, n_slots)
    build = trainer.step_batches(data, prog.d.grad_accum_steps, ("inputs", "targets"), prog.bs)
    state = [params, opt_state]

    def loop(next_batch, read_late: bool) -> float:
        """Mean seconds per step over `steps` steps after `warmup`; the loss read at once or one step late."""
        pending, t0 = None, None
        for i in range(warmup + steps):
            if i == warmup:
                t0 = time.perf_counter()
            state[0], state[1], m = prog.compiled(state[0], state[1], next_batch(), HPARAMS)
            if not read_late:
                float(m["loss"])
            elif pending is not None:
                float(pending["loss"])  # the step before, while this one runs
            pending = m
        float(pending["loss"])
        return (time.perf_counter() - t0) / steps

    def host_alone() -> float:
        for _ in range(warmup):
            build()
        t0 = time.perf_counter()
        for _ in range(steps):
            jax.block_until_ready(build()[0])
        return (time.perf_counter() - t0) / steps

    def overlapped() -> float:
        with trainer.Prefetcher(build, warmup + steps, depth) as queued:
            return loop(lambda: next(queued)[0], read_late=True)

    loops = {"device_ms": lambda: loop(lambda: random_batch, read_late=True),
             "device_sync_ms": lambda: loop(lambda: random_batch, read_late=False), "host_ms": host_alone,
             "serial_ms": lambda: loop(lambda: build()[0], read_late=False), "overlap_ms": overlapped}
    times = {k: [] for k in loops}
    for r in range(rounds):
        for k, fn in loops.items():
            times[k].append(fn() * 1e3)
        log(f"round {r + 1}/{rounds}: " + ", ".join(f"{k} {v[-1]:.1f}" for k, v in times.items()))
    out = {k: round(float(np.median(v)), 2) for k, v in times.items()}
    out["hidden"] = round((out["serial_ms"] - out["overlap_ms"]) / out["host_ms"], 3)
    out.update(prefetch=depth, steps=steps, rounds=rounds, dataset=cfg.dataset, packing=cfg.packing,
               tokenizer_vocab=tok.vocab_size)
    log(f"with data: device alone {out['device_ms']:.1f} ms/step, host alone {out['host_ms']:.1f}; serial "
        f"{out['serial_ms']:.1f}, overlapped {out['overlap_ms']:.1f}: {out['hidden']:.0%} of the host's time hidden")
    return out, state[0], state[1]


def main(argv):
    ap = argparse.ArgumentParser(prog="python bench/train_step.py", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed steps")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--memory-limit-gib", type=float, default=None, metavar="GIB",
                    help="refuse a step that needs more (default: the device's own limit where it reports one)")
    ap.add_argument("--with-data", type=C.boolean, nargs="?", const=True, default=False, metavar="1|0",
                    help="also time the step fed by the real pretraining pipeline")
    ap.add_argument("--prefetch", type=int, default=2, help="with data: batches built ahead")
    ap.add_argument("--rounds", type=int, default=3, help="with data: rounds of the five loops")
    cfg, args = C.parse_command(argv, ap)
    steps, warmup = args.steps, args.warmup
    device = jax.devices()[0]
    attention, why = model.resolve_attention(cfg.attention, device.platform)
    print(f"attention: {attention} ({why})", file=sys.stderr)
    prog = TrainProgram(cfg, attention)
    mem = prog.memory()
    limit = args.memory_limit_gib * 2**30 if args.memory_limit_gib is not None else device_memory_limit()
    if limit and mem and mem["need_bytes"] > limit:
        raise SystemExit(f"{cfg.run} at device_batch_size {cfg.device_batch_size} needs {mem['need_bytes'] / 2**30:.1f} "
                         f"GiB per device, over the {limit / 2**30:.1f} GiB limit: lower --config.device_batch_size")
    params, opt_state, batch = prog.init()
    dt, _, params, opt_state = prog.run(params, opt_state, batch, steps, warmup,
                                        log=lambda s: print(s, file=sys.stderr))
    fig = prog.figures(dt)
    peak = peak_memory()
    with_data = None
    if args.with_data:
        with_data, params, opt_state = host_overlap(prog, params, opt_state, batch, steps, warmup, args.prefetch,
                                                    args.rounds, log=lambda s: print(s, file=sys.stderr))
    result = {
        "bench": "train_step", "config": cfg.run, "depth": cfg.depth, "device": device.device_kind,
        "n_devices": prog.d.n_devices, "device_batch_size": prog.d.device_batch_size, "sequence_len": cfg.sequence_len,
        "grad_accum": prog.d.grad_accum_steps, "attention": attention, "compute_dtype": cfg.compute_dtype, **fig,
        "compile_s": round(prog.compile_s, 1), "xla_need_gib": round(mem["need_bytes"] / 2**30, 2) if mem else None,
        "peak_memory_gib": None if peak is None else round(peak / 2**30, 2), "jax": jax.__version__,
    }
    if with_data:
        result["with_data"] = with_data
    mfu = fig["mfu_percent"]
    print(f"{cfg.run}: {fig['tokens_per_s']:,.0f} tokens/s, step {fig['step_ms']:.1f} ms"
          + (f", MFU {mfu:.1f}%" if mfu is not None else ", MFU n/a (unknown device peak)"))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
