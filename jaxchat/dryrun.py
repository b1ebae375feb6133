"""Will it fit, and how does it shard? Compile the real programs for N devices and read XLA's own analysis.

    python -m jaxchat.dryrun --config=configs/d20.py --devices=8 [--device-memory-gib=N] [--config.x=y ...]

Toy-size tests cannot show whether d20 fits a card or shards correctly; the compiled program can. This compiles the
real train step (the trainer's shardings, optimizer and loss) and the engine's prefill and decode (the server's
default batch of 32 rows over the whole context) ahead of time, from abstract shapes, for N emulated CPU devices:
not one weight is allocated. Per device it reports XLA's argument, temporary and output bytes, FLOPs per step, the
bytes each kind of collective moves per step (read from the optimised HLO, loop bodies times their trip counts), and
whether the step fits the card at JAX's default preallocation (75% of its memory). The last line is one JSON object.

CPUs have no cuDNN: the dry run trains with the chunked XLA attention (model.chunked_attention), which keeps what
cuDNN's flash kernel keeps for the backward (q, k, v, output, logsumexp) and so has its memory behaviour, and says
so. A GPU run that picks cuDNN needs the same memory or less.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
import time

import jax
import numpy as np

from jaxchat import config as C
from jaxchat import engine, hardware, model, optim, sharding, train_step

HPARAMS = {"lrm": 1.0, "momentum": 0.95}
PREALLOCATE = 0.75  # JAX's default XLA_PYTHON_CLIENT_MEM_FRACTION
SERVER_BATCH = 32  # serve.py --max-batch default
COLLECTIVES = ("all-gather", "all-reduce", "reduce-scatter", "all-to-all", "collective-permute")
DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4, "u32": 4, "f32": 4,
               "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}


class TrainProgram:
    """The real train step for a config on the given devices, compiled ahead of time from abstract shapes."""

    def __init__(self, cfg, attention: str, devices=None, fp8: bool | None = None):
        devices = list(devices or jax.devices())
        self.cfg, self.attention = cfg, attention
        self.d = C.derive(cfg, len(devices))
        self.mesh = sharding.make_mesh(cfg.mesh_data, cfg.mesh_fsdp, devices=devices)
        self.gcfg = C.model_config(cfg, attention=attention)
        if fp8 is not None:
            self.gcfg = dataclasses.replace(self.gcfg, fp8=fp8)
        graphdef, abstract = model.abstract_params(self.gcfg)
        self.tx = optim.make_optimizer(cfg, self.d)
        abstract_state = jax.eval_shape(self.tx.init, abstract)
        self.ps = sharding.param_shardings(abstract, self.mesh)
        self.ss = sharding.state_shardings(self.tx, abstract, self.mesh)
        self.bs = sharding.batch_sharding(self.mesh)
        step = train_step.jit_train_step(graphdef, self.tx, param_shardings=self.ps, state_shardings=self.ss,
                                         batch_sharding=self.bs)
        rows = self.d.device_batch_size * self.d.n_devices
        self.batch_shape = (self.d.grad_accum_steps, rows, cfg.sequence_len)
        tokens = jax.ShapeDtypeStruct(self.batch_shape, np.int32, sharding=self.bs)
        t0 = time.perf_counter()
        self.compiled = step.lower(abstract, abstract_state, {"inputs": tokens, "targets": tokens}, HPARAMS).compile()
        self.compile_s = time.perf_counter() - t0

    def memory(self) -> dict:
        return memory_of(self.compiled)

    def init(self):
        """Real params, optimizer state and a random batch, in the program's shardings."""
        params, opt_state = train_step.init_state(self.gcfg, self.cfg.seed, self.tx, param_shardings=self.ps,
                                                  state_shardings=self.ss)
        A, rows, T = self.batch_shape
        x = np.random.default_rng(0).integers(0, self.cfg.vocab_size, (A, rows, T + 1), dtype=np.int32)
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
        return float(np.median(times[warmup:])), times[0], params, opt_state

    def figures(self, dt: float, peak: float = 0.0) -> dict:
        kind = jax.devices()[0].device_kind
        tokens_per_s = self.d.total_batch_size / dt
        mfu = hardware.mfu(self.d.flops_per_token, tokens_per_s, kind, self.d.n_devices, peak or self.cfg.peak_flops)
        return {"step_ms": round(dt * 1e3, 2), "tokens_per_s": round(tokens_per_s, 1),
                "mfu_percent": None if mfu is None else round(mfu, 2)}


def memory_of(compiled) -> dict:
    """XLA's per-device figures: arguments + temporaries + outputs not aliased to (donated) arguments."""
    m = compiled.memory_analysis()
    if m is None:
        return {}
    need = m.argument_size_in_bytes + m.temp_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
    return {"argument_bytes": m.argument_size_in_bytes, "temp_bytes": m.temp_size_in_bytes,
            "output_bytes": m.output_size_in_bytes, "alias_bytes": m.alias_size_in_bytes, "need_bytes": need}


def flops_of(compiled) -> float | None:
    cost = compiled.cost_analysis()
    if isinstance(cost, list):  # older jax: one dict per program
        cost = cost[0] if cost else {}
    return float(cost["flops"]) if cost and "flops" in cost else None


# ----------------------------------------------------------------------------------------------------------------------
# Collectives from the optimised HLO text


_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")
_WHILE = re.compile(r"\swhile\(.*body=%?([\w.\-]+)")
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_COLLECTIVE = re.compile(r"=\s*(.+?)\s+(" + "|".join(COLLECTIVES) + r")(-start)?\(")
_SHAPE = re.compile(r"\b([a-z]+\d*(?:e\dm\d(?:fn)?)?)\[([\d,]*)\]")


def shape_bytes(text: str) -> int:
    """Bytes of an HLO result type: `bf16[8,128]{1,0}` or a tuple of them."""
    total = 0
    for dtype, dims in _SHAPE.findall(text):
        if dtype in DTYPE_BYTES:
            total += DTYPE_BYTES[dtype] * int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
    return total


def collective_bytes(hlo_text: str) -> dict:
    """Result bytes per device of every collective, summed by kind, each counted as many times as it runs per step:
    an op inside a while loop's body counts its known trip count (times its enclosing loops'). Async pairs count once
    (the -start op). Returns {kind: {"bytes": int, "count": int}}; an op in a loop of unknown trip count counts once
    and is listed under "unknown_trip_counts"."""
    comps: dict[str, list[str]] = {}
    entry, current = None, None
    for line in hlo_text.splitlines():
        m = _COMPUTATION.match(line)
        if m and not line.startswith(" "):
            current = m.group(1)
            comps[current] = []
            if line.startswith("ENTRY"):
                entry = current
        elif current is not None:
            comps[current].append(line)
    multiplier = {entry: 1} if entry else {name: 1 for name in comps}
    unknown, order = 0, list(multiplier)
    while order:
        name = order.pop()
        for line in comps.get(name, []):
            w = _WHILE.search(line)
            if w and w.group(1) in comps and w.group(1) not in multiplier:
                trip = _TRIP.search(line)
                if not trip:
                    unknown += 1
                multiplier[w.group(1)] = multiplier[name] * (int(trip.group(1)) if trip else 1)
                order.append(w.group(1))
    out = {kind: {"bytes": 0, "count": 0} for kind in COLLECTIVES}
    for name, lines in comps.items():
        for line in lines:
            m = _COLLECTIVE.search(line)
            if m:
                times = multiplier.get(name, 1)
                out[m.group(2)]["bytes"] += shape_bytes(m.group(1)) * times
                out[m.group(2)]["count"] += times
    out["unknown_trip_counts"] = unknown
    return out


# ----------------------------------------------------------------------------------------------------------------------
# The engine's programs (one device: a server's rows; evaluations split theirs over the devices)


def engine_programs(cfg, rows: int = SERVER_BATCH) -> dict:
    """Compile the prefill of one full-context prompt sampled into `rows` rows, its copy into a whole-context cache of
    `rows` rows, and one decode step over that cache, from abstract shapes; their per-device memory (each program's
    own: the prefill's does not count the generation cache, which it leaves alone)."""
    gcfg = dataclasses.replace(C.model_config(cfg), fp8=False)  # the engine never computes in fp8
    dtype = jax.numpy.dtype(gcfg.compute_dtype)  # the engine casts its params to the compute dtype once
    _, abstract = model.abstract_params(gcfg)
    params = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, dtype), abstract)
    S = engine.bucket(cfg.sequence_len, engine.MIN_CACHE_BUCKET)
    cache, fresh = (jax.eval_shape(lambda n=n: model.KVCache.zeros(gcfg, n, S)) for n in (rows, 1))
    spec = lambda shape, t: jax.ShapeDtypeStruct(shape, t)  # noqa: E731
    sampling = engine.Sampling(*(spec((rows,), t) for t in (np.uint32, np.uint32, np.float32, np.int32, np.float32)))
    k = min(engine.DEFAULT_MAX_TOP_K, gcfg.vocab_size)
    lp = min(engine.MAX_TOP_LOGPROBS, gcfg.vocab_size)  # the server's programs report logprobs
    lowered = {
        "prefill": engine.prefill.lower(gcfg, k, params, spec((1, S), np.int32), spec((1,), np.int32), sampling, lp),
        "insert": engine.insert.lower(cache, fresh, spec((), np.int32), rows),
        "decode": engine.decode.lower(gcfg, k, params, cache, spec((rows,), np.int32), spec((rows,), np.int32),
                                      sampling, lp),
    }
    compiled = {name: program.compile() for name, program in lowered.items()}
    return {name: {**memory_of(c), "flops": flops_of(c), "rows": rows, "cache_len": S} for name, c in compiled.items()}


# ----------------------------------------------------------------------------------------------------------------------
# The command


@dataclasses.dataclass
class Report:
    config: str
    devices: int
    mesh: tuple
    device_batch_size: int
    grad_accum_steps: int
    attention: str
    compile_s: float
    memory: dict
    flops_per_step: float | None
    collectives: dict
    device_memory_gib: float
    fits: bool
    engine: dict

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def dry_run(cfg, n_devices: int, with_engine: bool = True, log=print) -> Report:
    """Compile and analyse; the card is `cfg.device_memory_gib`, and device_batch_size="auto" is resolved first."""
    devices = jax.devices()[:n_devices]
    if len(devices) < n_devices:
        raise SystemExit(f"only {len(devices)} devices; the dry run sets jax_num_cpu_devices before jax starts, so "
                         f"run it as its own process (python -m jaxchat.dryrun)")
    attention = "chunked" if devices[0].platform == "cpu" else model.resolve_attention(cfg.attention, "gpu")[0]
    device_memory_gib = cfg.get("device_memory_gib", 80.0)
    if cfg.get("device_batch_size") == C.AUTO:
        cfg = C.with_device_batch(cfg, auto_device_batch(cfg, devices, attention, log=log))
    # fp8 GEMMs exist on GPUs only: a CPU compiles fp8 matmuls as upcasts (wider temporaries than the GPU's cuBLASLt
    # FP8 GEMMs keep), so the emulated step is compiled in bf16, an upper bound (fp8 saves 1 byte per matmul input
    # for the backward where bf16 saves 2).
    fp8 = None if devices[0].platform == "gpu" else False
    if cfg.get("fp8", False) and fp8 is False:
        log("fp8: compiled in bf16 here (no FP8 GEMMs on a CPU); the fp8 step needs no more memory than this one")
    prog = TrainProgram(cfg, attention, devices, fp8=fp8)
    mem = prog.memory()
    return Report(
        config=cfg.run, devices=n_devices, mesh=tuple(prog.mesh.shape.values()),
        device_batch_size=prog.d.device_batch_size, grad_accum_steps=prog.d.grad_accum_steps, attention=attention,
        compile_s=round(prog.compile_s, 1), memory=mem, flops_per_step=flops_of(prog.compiled),
        collectives=collective_bytes(prog.compiled.as_text()), device_memory_gib=device_memory_gib,
        fits=bool(mem) and mem["need_bytes"] <= PREALLOCATE * device_memory_gib * 2**30,
        engine=engine_programs(cfg) if with_engine else {})


def describe(r: Report) -> str:
    gib = lambda b: f"{b / 2**30:8.2f} GiB"  # noqa: E731
    m = r.memory
    lines = [
        f"{r.config}: train step on {r.devices} devices, mesh (data, fsdp) = {r.mesh}, device batch "
        f"{r.device_batch_size} x {r.grad_accum_steps} accumulation steps, attention {r.attention}"
        + (" (CPU stand-in for cuDNN: the same saved tensors)" if r.attention == "chunked" else ""),
        f"  compile                 {r.compile_s:8.1f} s",
        f"  arguments               {gib(m['argument_bytes'])}   (params, optimizer state, batch; per device)",
        f"  temporaries             {gib(m['temp_bytes'])}",
        f"  outputs (not aliased)   {gib(m['output_bytes'] - m['alias_bytes'])}",
        f"  needs                   {gib(m['need_bytes'])}   of {PREALLOCATE:.0%} x {r.device_memory_gib:g} GiB = "
        f"{PREALLOCATE * r.device_memory_gib:.1f} GiB: {'fits' if r.fits else 'DOES NOT FIT'}",
        f"  FLOPs per step          {r.flops_per_step or 0:.4e}   (per device, XLA's count)",
        "  collectives per step (result bytes per device):",
    ]
    for kind in COLLECTIVES:
        c = r.collectives[kind]
        lines.append(f"    {kind:<20} {gib(c['bytes'])} in {c['count']:,} ops")
    for name, e in r.engine.items():
        lines.append(f"engine {name} ({e['rows']} rows, cache {e['cache_len']:,}): needs {gib(e['need_bytes'])}, "
                     f"temporaries {gib(e['temp_bytes'])}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(prog="python -m jaxchat.dryrun", description=__doc__.splitlines()[0])
    ap.add_argument("--devices", type=int, default=8, metavar="N", help="emulated devices (default 8)")
    ap.add_argument("--device-memory-gib", type=float, default=None, metavar="GIB",
                    help="memory per device (default: the config's device_memory_gib)")
    ap.add_argument("--no-engine", type=C.boolean, nargs="?", const=True, default=False, metavar="1|0",
                    help="skip the engine's prefill and decode (--no-engine or --no-engine=1)")
    try:
        cfg, args = C.parse_command(argv, ap)
        n = args.devices
        jax.config.update("jax_platforms", "cpu")
        jax.config.update("jax_num_cpu_devices", n)
        if args.device_memory_gib is not None:
            cfg.device_memory_gib = args.device_memory_gib
        report = dry_run(cfg, n, with_engine=not args.no_engine, log=lambda m: print(m, file=sys.stderr))
    except C.ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(describe(report))
    print(json.dumps(report.as_dict()))
    return 0 if report.fits else 1


def auto_device_batch(cfg, devices=None, attention: str | None = None, log=print) -> int:
    """`device_batch_size="auto"`: the largest power of two (C.AUTO_BATCHES, those that split total_batch_size) whose
    real train step, compiled ahead of time for `devices` (default: all; nothing is allocated), needs at most
    PREALLOCATE x `cfg.device_memory_gib` per device by XLA's own memory analysis. Raises ConfigError when not even
    the smallest fits, or when the backend reports no memory analysis."""
    devices = list(devices or jax.devices())
    if attention is None:
        attention = model.resolve_attention(cfg.attention, devices[0].platform)[0]
    gib = cfg.get("device_memory_gib", 80.0)
    limit = PREALLOCATE * gib * 2**30
    tried = []
    for rows in C.auto_batch_candidates(cfg, len(devices)):
        prog = TrainProgram(C.with_device_batch(cfg, rows), attention, devices)
        need = prog.memory().get("need_bytes")
        del prog
        if need is None:
            raise C.ConfigError(f"device_batch_size=auto: {devices[0].platform} reports no memory analysis of the "
                                "compiled step; set --config.device_batch_size=N")
        tried.append(f"{rows} rows need {need / 2**30:.1f} GiB")
        if need <= limit:
            log(f"device_batch_size auto: {rows} ({', '.join(tried)} per device; the limit is {limit / 2**30:.1f} GiB "
                f"= {PREALLOCATE:.0%} of device_memory_gib={gib:g})")
            return rows
    raise C.ConfigError(f"device_batch_size=auto: nothing fits {limit / 2**30:.1f} GiB per device ({PREALLOCATE:.0%} "
                        f"of device_memory_gib={gib:g}): {', '.join(tried)}; use more devices, remat='full', a smaller "
                        "loss_chunk, or a smaller model")


def resolve_device_batch(cfg, devices=None, log=print):
    """`cfg` itself, or a copy with device_batch_size="auto" resolved by compiling (auto_device_batch)."""
    if cfg.get("device_batch_size") != C.AUTO:
        return cfg
    return C.with_device_batch(cfg, auto_device_batch(cfg, devices, log=log))


if __name__ == "__main__":
    sys.exit(main())
