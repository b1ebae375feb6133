"""Time the jitted training step for any config on whatever devices are present: tokens/s and MFU.

    python bench/train_step.py --config=configs/d20.py --config.device_batch_size=32 [--steps=20] [--warmup=3]

Random tokens, real model, real optimizer, real sharding (all local devices on the fsdp axis). The step is compiled
ahead of time from abstract shapes first, so XLA's memory analysis says whether it fits the device before a single
weight is allocated (`--memory-limit-gib`, default: the device's own limit where it reports one). Compile time is
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

HPARAMS = {"lrm": 1.0, "momentum": 0.95}


class Program:
    """The real train step for a config, compiled ahead of time from abstract shapes (nothing allocated yet)."""

    def __init__(self, cfg, attention: str):
        devices = jax.devices()
        self.cfg, self.attention = cfg, attention
        self.d = C.derive(cfg, len(devices))
        mesh = sharding.make_mesh(cfg.mesh_data, cfg.mesh_fsdp)
        self.gcfg = model.GPTConfig.from_config(cfg, attention=attention)
        graphdef, abstract = model.abstract_params(self.gcfg)
        self.tx = optim.make_optimizer(cfg, self.d)
        self.ps = sharding.param_shardings(abstract, mesh)
        self.ss = sharding.state_shardings(jax.eval_shape(self.tx.init, abstract), abstract, mesh)
        self.bs = sharding.batch_sharding(mesh)
        step = train_step.jit_train_step(graphdef, self.tx, param_shardings=self.ps, state_shardings=self.ss,
                                         batch_sharding=self.bs)
        rows = self.d.device_batch_size * self.d.n_devices
        self.batch_shape = (self.d.grad_accum_steps, rows, cfg.sequence_len)
        tokens = jax.ShapeDtypeStruct(self.batch_shape, np.int32, sharding=self.bs)
        abstract_state = jax.eval_shape(self.tx.init, abstract)
        t0 = time.perf_counter()
        self.compiled = step.lower(abstract, abstract_state, {"inputs": tokens, "targets": tokens}, HPARAMS).compile()
        self.compile_s = time.perf_counter() - t0

    def memory(self) -> dict:
        """XLA's per-device estimate: arguments + temporaries + outputs not aliased to (donated) arguments."""
        m = self.compiled.memory_analysis()
        if m is None:
            return {}
        need = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
        return {"argument_bytes": m.argument_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
                "output_bytes": m.output_size_in_bytes, "alias_bytes": m.alias_size_in_bytes, "need_bytes": need}

    def init(self):
        params, opt_state = train_step.init_state(self.gcfg, self.cfg.seed, self.tx, param_shardings=self.ps,
                                                  state_shardings=self.ss)
        x = np.random.default_rng(0).integers(0, self.cfg.vocab_size, (*self.batch_shape[:2],
                                                                       self.cfg.sequence_len + 1), dtype=np.int32)
        batch = jax.device_put({"inputs": x[..., :-1], "targets": x[..., 1:]}, {"inputs": self.bs, "targets": self.bs})
        return params, opt_state, batch

    def run(self, params, opt_state, batch, steps: int, warmup: int, log=None):
        """(median step seconds, first step seconds, params, opt_state), every step synced."""
        times = []
        for i in range(warmup + steps):
            t = time.perf_counter()
            params, opt_state, m = self.compiled(params, opt_state, batch, HPARAMS)
            jax.block_until_ready(m)
            times.append(time.perf_counter() - t)
            if log and i >= warmup:
                log(f"step {i - warmup + 1}/{steps}: {times[-1] * 1e3:.1f} ms, loss {float(m['loss']):.4f}")
        return statistics.median(times[warmup:]), times[0], params, opt_state

    def figures(self, dt: float, peak: float = 0.0) -> dict:
        kind = jax.devices()[0].device_kind
        tokens_per_s = self.d.total_batch_size / dt
        mfu = C.mfu(self.d.flops_per_token, tokens_per_s, kind, self.d.n_devices, peak or self.cfg.peak_flops)
        return {"step_ms": round(dt * 1e3, 2), "tokens_per_s": round(tokens_per_s, 1),
                "mfu_percent": None if mfu is None else round(mfu, 2)}


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
    prog = Program(cfg, attention)
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
