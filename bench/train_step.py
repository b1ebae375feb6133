"""Time the jitted training step for any config on whatever devices are present: tokens/s and MFU.

    python bench/train_step.py --config=configs/d20.py --config.device_batch_size=32 [--steps=20] [--warmup=3]

Random tokens, real model, real optimizer, real sharding (all local devices on the fsdp axis). The step is compiled
ahead of time from abstract shapes first (jaxchat.dryrun.TrainProgram), so XLA's memory analysis says whether it fits
the device before a single weight is allocated (`--memory-limit-gib`, default: the device's own limit where it reports one). Compile time is
reported separately; the step time is the median over `--steps` synced steps. MFU is against the card's bf16 peak
(jaxchat.config.PEAK_FLOPS), or absent for an unknown device. The last line printed is one JSON object.
"""
import json
import sys
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


def main(argv):
    cfg, rest = C.parse_args(argv)
    opts = dict(a.lstrip("-").split("=", 1) for a in rest)
    steps, warmup = int(opts.get("steps", 20)), int(opts.get("warmup", 3))
    device = jax.devices()[0]
    attention, why = model.resolve_attention(cfg.attention, device.platform)
    print(f"attention: {attention} ({why})", file=sys.stderr)
    prog = TrainProgram(cfg, attention)
    mem = prog.memory()
    limit = float(opts["memory-limit-gib"]) * 2**30 if "memory-limit-gib" in opts else device_memory_limit()
    if limit and mem and mem["need_bytes"] > limit:
        raise SystemExit(f"{cfg.run} at device_batch_size {cfg.device_batch_size} needs {mem['need_bytes'] / 2**30:.1f} "
                         f"GiB per device, over the {limit / 2**30:.1f} GiB limit: lower --config.device_batch_size")
    params, opt_state, batch = prog.init()
    dt, _, params, opt_state = prog.run(params, opt_state, batch, steps, warmup,
                                        log=lambda s: print(s, file=sys.stderr))
    fig = prog.figures(dt)
    peak = peak_memory()
    result = {
        "bench": "train_step", "config": cfg.run, "depth": cfg.depth, "device": device.device_kind,
        "n_devices": prog.d.n_devices, "device_batch_size": prog.d.device_batch_size, "sequence_len": cfg.sequence_len,
        "grad_accum": prog.d.grad_accum_steps, "attention": attention, "compute_dtype": cfg.compute_dtype, **fig,
        "compile_s": round(prog.compile_s, 1), "xla_need_gib": round(mem["need_bytes"] / 2**30, 2) if mem else None,
        "peak_memory_gib": None if peak is None else round(peak / 2**30, 2), "jax": jax.__version__,
    }
    mfu = fig["mfu_percent"]
    print(f"{cfg.run}: {fig['tokens_per_s']:,.0f} tokens/s, step {fig['step_ms']:.1f} ms"
          + (f", MFU {mfu:.1f}%" if mfu is not None else ", MFU n/a (unknown device peak)"))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
