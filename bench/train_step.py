"""Time the jitted training step for any config on whatever devices are present: tokens/s and MFU.

    python bench/train_step.py --config=configs/d20.py --config.device_batch_size=32 [--steps=20] [--warmup=3]

Random tokens, real model, real optimizer, real sharding (all local devices on the fsdp axis). Compile time is
reported separately; the step time is the median over `--steps` synced steps. MFU is against the card's bf16 peak
(jaxchat.config.PEAK_FLOPS), or absent for an unknown device. The last line printed is one JSON object.
"""
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxchat import config as C  # noqa: E402
from jaxchat import model, optim, sharding, train_step  # noqa: E402


def main(argv):
    cfg, rest = C.parse_args(argv)
    opts = dict(a.lstrip("-").split("=", 1) for a in rest)
    steps, warmup = int(opts.get("steps", 20)), int(opts.get("warmup", 3))
    devices = jax.devices()
    kind = devices[0].device_kind
    platform = devices[0].platform
    attention = cfg.attention if cfg.attention != "auto" else ("cudnn" if platform == "gpu" else "xla")
    d = C.derive(cfg, len(devices))
    mesh = sharding.make_mesh(cfg.mesh_data, cfg.mesh_fsdp)
    gcfg = model.GPTConfig.from_config(cfg, attention=attention)
    graphdef, abstract = model.abstract_params(gcfg)
    tx = optim.make_optimizer(cfg, d)
    ps = sharding.param_shardings(abstract, mesh)
    ss = sharding.state_shardings(jax.eval_shape(tx.init, abstract), abstract, mesh)
    params, opt_state = train_step.init_state(gcfg, cfg.seed, tx, param_shardings=ps, state_shardings=ss)
    bs = sharding.batch_sharding(mesh)
    step = train_step.jit_train_step(graphdef, tx, param_shardings=ps, state_shardings=ss, batch_sharding=bs)

    rows = d.device_batch_size * d.n_devices
    rng = np.random.default_rng(0)
    x = rng.integers(0, cfg.vocab_size, (d.grad_accum_steps, rows, cfg.sequence_len + 1), dtype=np.int32)
    batch = jax.device_put({"inputs": x[..., :-1], "targets": x[..., 1:]}, {"inputs": bs, "targets": bs})
    hparams = {"lrm": 1.0, "momentum": 0.95}

    t0 = time.perf_counter()
    params, opt_state, m = step(params, opt_state, batch, hparams)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
        params, opt_state, m = step(params, opt_state, batch, hparams)
    jax.block_until_ready(m)
    times = []
    for i in range(steps):
        t = time.perf_counter()
        params, opt_state, m = step(params, opt_state, batch, hparams)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
        print(f"step {i + 1}/{steps}: {times[-1] * 1e3:.1f} ms, loss {float(m['loss']):.4f}", file=sys.stderr)
    dt = statistics.median(times)
    tokens_per_s = d.total_batch_size / dt
    mfu = C.mfu(d.flops_per_token, tokens_per_s, kind, d.n_devices, cfg.peak_flops)
    mem = None
    if platform == "gpu":
        stats = devices[0].memory_stats() or {}
        mem = stats.get("peak_bytes_in_use")
    result = {
        "bench": "train_step", "config": cfg.run, "depth": cfg.depth, "device": kind, "n_devices": d.n_devices,
        "device_batch_size": d.device_batch_size, "sequence_len": cfg.sequence_len, "grad_accum": d.grad_accum_steps,
        "attention": attention, "compute_dtype": cfg.compute_dtype, "step_ms": round(dt * 1e3, 2),
        "tokens_per_s": round(tokens_per_s, 1), "mfu_percent": None if mfu is None else round(mfu, 2),
        "compile_s": round(compile_s, 1), "peak_memory_gib": None if mem is None else round(mem / 2**30, 2),
        "jax": jax.__version__,
    }
    print(f"{cfg.run}: {tokens_per_s:,.0f} tokens/s, step {dt * 1e3:.1f} ms"
          + (f", MFU {mfu:.1f}%" if mfu is not None else ", MFU n/a (unknown device peak)"))
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
