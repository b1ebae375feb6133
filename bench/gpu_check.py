"""One prepared GPU check: every figure only a GPU can give, in one short run on a lent card.

    bash bench/gpu_check.sh [--dry-run] [--budget=SECONDS]     # the entry point (see it for the environment)
    python bench/gpu_check.py [--dry-run] [--budget=SECONDS] [--out=DIR]

The driver runs each stage in its own process, in order, with its own timeout under one overall deadline; a stage the
remaining time cannot hold is skipped with a line saying so, and a stage that fails or hangs costs only itself. Every
figure is one JSON line in `OUT/results.jsonl`, every stage's output goes to `OUT/log.txt`, and the run ends with a
summary table (< 3 kB) on stdout. Stages:

1. env       nvidia-smi, jax/jaxlib/cuDNN versions, devices; measured bf16 GEMM TFLOP/s (8192³) and HBM copy GB/s
             next to the nominal peaks.
2. attention cuDNN `dot_product_attention` causal forward+backward at d20 shapes (MHA, GQA, sliding window with
             is_causal=True) against an fp32 XLA reference, timed against plain and chunked XLA; picks cuDNN, or
             the chunked XLA attention when cuDNN fails or disagrees, for the rest.
3. train     the d20 step on one device at the largest device batch of 32, 16, 8 whose compiled memory fits; compile
             and step time, tokens/s, MFU against the measured and the nominal peak, peak memory, and a one-step
             profile: time per kernel class and the top 10 kernels.
4. decode    nanochat's inference grid: d20 random weights, 1,792-token prompt, 256 new tokens, batch 1/8/32/128:
             TTFT, TPOT, tokens/s, MBU against the measured copy bandwidth.
5. eval      bench/eval.py's GSM8K-shaped generative eval, batched against one problem at a time.
6. extra     if time remains: the train step with the other attention (chunked when cuDNN was picked, plain XLA
             otherwise) at the train stage's batch, and d26 at a batch that fits.

`--dry-run` runs the same stages at toy sizes on any machine (CPU included) in about two minutes, so a test exercises
every path of this script between GPU loans. The GPU image lacks grain, fastapi, uvicorn and ml_collections: nothing
here imports the first three, and ml_collections (with flax/optax when the image's are older than ours) comes from
the wheels `bench/fetch_wheels.sh` puts in `.whl/`, installed by the driver with `pip --no-index --target`.
"""
from __future__ import annotations

import argparse
import gzip
import importlib.metadata
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WHEELS = ROOT / ".whl"
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

# (name, seconds it may take on an H100/H200 with a cold compilation cache, seconds below which it is not started);
# the dry run's toy stages take a few seconds each (up to 16 s on a loaded 2-core CPU) and get half of both.
STAGES = [("env", 50, 15), ("attention", 60, 20), ("train", 150, 60), ("decode", 90, 30), ("eval", 75, 30),
          ("fp8", 120, 50), ("extra", 150, 60)]
DRY_RUN_TIME_SCALE = 1 / 2
SUMMARY_RESERVE_S = 5
# Fault injection for the tests of the driver itself: the named stage hangs (dry run only), as a wedged kernel would.
STALL_ENV = "JAXCHAT_GPU_CHECK_STALL"

# Sizes: the real check, and the dry run's toy stand-ins that take every code path.
FULL = {
    "gemm_n": 8192, "copy_bytes": 2 << 30,
    "attention": {"B": 8, "T": 2048, "H": 10, "D": 128, "kv_gqa": 2, "window": 512},
    "config": "configs/d20.py", "overrides": [], "batches": [32, 16, 8], "steps": 10, "warmup": 2,
    "decode": {"batch_sizes": [1, 8, 32, 128], "prompt_tokens": 1792, "decode_tokens": 256},
    "eval": {"problems": 128, "max_tokens": 256, "batch": 64, "single": 8},
    "extra_config": "configs/d26.py", "extra_batches": [16, 8, 4],
    # the 2026 model at depth 12 (d24 compiles twice too slowly for the budget): bf16 and fp8 steps side by side
    "fp8_config": "configs/d24.py", "fp8_overrides": ["--config.depth=12"], "fp8_batch": 16,
}
DRY = {
    "gemm_n": 512, "copy_bytes": 16 << 20,
    "attention": {"B": 1, "T": 256, "H": 4, "D": 64, "kv_gqa": 2, "window": 64},
    # B=256 is over the stand-in 1 GiB device limit (CPUs report none), so the fit search has something to reject.
    "config": "configs/tiny.py", "overrides": ["--config.depth=2"], "batches": [256, 8], "steps": 3, "warmup": 1,
    "memory_limit_gib": 1.0,
    "decode": {"batch_sizes": [1, 4], "prompt_tokens": 96, "decode_tokens": 16},
    "eval": {"problems": 8, "max_tokens": 16, "batch": 8, "single": 2},
    "extra_config": "configs/tiny.py", "extra_batches": [4, 2],
    "fp8_config": "configs/tiny.py", "fp8_overrides": ["--config.depth=2"], "fp8_batch": 4,
}


# ----------------------------------------------------------------------------------------------------------------------
# Results: one JSON object per line, appended by every stage process.


def emit(out: Path, stage: str, **fields) -> dict:
    record = {"stage": stage, "time": round(time.time(), 1), **fields}
    with open(out / "results.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    print(json.dumps(record), flush=True)
    return record


def read_results(out: Path) -> list[dict]:
    path = out / "results.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a stage killed mid-write leaves a torn last line; the rest still count
            continue
    return records


def find(records: list[dict], stage: str, kind: str) -> dict | None:
    hits = [r for r in records if r.get("stage") == stage and r.get("kind") == kind]
    return hits[-1] if hits else None


# ----------------------------------------------------------------------------------------------------------------------
# Stages (each runs in its own process: `--stage=NAME`)


def timed(fn, *args, repeats: int, warmup: int = 2) -> float:
    """Seconds per call: `repeats` calls dispatched back to back after `warmup`, one sync at the end."""
    import jax

    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    t0 = time.perf_counter()
    for _ in range(repeats):
        result = fn(*args)
    jax.block_until_ready(result)
    return (time.perf_counter() - t0) / repeats


def stage_env(out: Path, sizes: dict, **_):
    import jax
    import jax.numpy as jnp

    from jaxchat import hardware

    smi = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
        print(subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=20).stdout)
    except (OSError, subprocess.SubprocessError) as e:
        print(f"nvidia-smi: {e}")
    versions = {}
    for name in ("jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "flax", "optax", "orbax-checkpoint",
                 "ml_collections", "numpy"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            pass
    cudnn = None
    try:
        from jax._src.lib import cuda_versions

        cudnn = cuda_versions.cudnn_get_version() if cuda_versions else None
    except Exception as e:  # noqa: BLE001 -- absent on CPU wheels; the version is information, not a requirement
        print(f"cuDNN version unavailable: {type(e).__name__}: {e}")
    devices = jax.devices()
    kind = devices[0].device_kind
    emit(out, "env", kind="versions", python=sys.version.split()[0], cudnn=cudnn, nvidia_smi=smi, **versions,
         devices=[f"{d.platform}:{d.id} {d.device_kind}" for d in devices], jax_path=jax.__file__)

    n = sizes["gemm_n"]
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
    dt = timed(jax.jit(lambda a, b: a @ b), a, b, repeats=10)
    gemm = 2 * n**3 / dt
    # x + 1 reads and writes every byte once; the figure counts both, as copy bandwidth is usually quoted.
    x = jnp.zeros((sizes["copy_bytes"] // 2,), jnp.bfloat16)
    dt_copy = timed(jax.jit(lambda x: x + jnp.asarray(1, x.dtype)), x, repeats=10)
    copy = 2 * sizes["copy_bytes"] / dt_copy
    emit(out, "env", kind="ceilings", device=kind, gemm_n=n, gemm_tflops=round(gemm / 1e12, 1),
         nominal_tflops=(hardware.peak_flops(kind) or 0) / 1e12 or None, copy_gbps=round(copy / 1e9, 1),
         nominal_gbps=(hardware.peak_bandwidth(kind) or 0) / 1e9 or None, copy_bytes=sizes["copy_bytes"])


def stage_attention(out: Path, sizes: dict, **_):
    import jax
    import jax.numpy as jnp

    from jaxchat import model

    s = sizes["attention"]
    variants = [("mha", s["H"], 0), ("gqa", s["kv_gqa"], 0), ("window", s["kv_gqa"], s["window"])]
    ok = True
    for name, h_kv, window in variants:
        shape = dict(B=s["B"], T=s["T"], H=s["H"], H_kv=h_kv, D=s["D"], window=window)
        record = {"variant": name, **shape}
        for impl in ("cudnn", "xla", "chunked"):
            try:
                errors = model.attention_errors(impl, **shape)
                q = jnp.ones((s["B"], s["T"], s["H"], s["D"]), jnp.bfloat16)
                kv = jnp.ones((s["B"], s["T"], h_kv, s["D"]), jnp.bfloat16)

                def loss(q, k, v, impl=impl, window=window):
                    return jnp.sum(model.causal_attention(q, k, v, impl, window).astype(jnp.float32))

                fwd_bwd = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
                record[f"{impl}_ms"] = round(timed(fwd_bwd, q, kv, kv, repeats=10) * 1e3, 3)
                record[f"{impl}_max_error"] = round(max(errors.values()), 5)
            except Exception as e:  # noqa: BLE001 -- a failing kernel is a finding, recorded, not a crash
                record[f"{impl}_error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"
        passed = "cudnn_max_error" in record and record["cudnn_max_error"] <= model.ATTENTION_TOLERANCE
        ok = ok and passed
        emit(out, "attention", kind="variant", cudnn_ok=passed, **record)
    choice = "cudnn" if ok else "chunked"
    emit(out, "attention", kind="choice", attention=choice,
         reason="cuDNN passed every variant" if ok else "cuDNN failed or disagreed on a variant (see above): the "
         "chunked XLA attention (cuDNN's memory behaviour, in plain JAX) takes its place")


def _train_config(path: str, overrides: list[str], batch: int, attention: str):
    from jaxchat import config as C

    cfg = C.load_config([f"--config={path}", *overrides, f"--config.device_batch_size={batch}",
                         "--config.total_batch_size=-1", f"--config.attention={attention}"])
    return cfg


def _fit_and_time(out, stage, sizes, path, batches, attention, profile: bool):
    """Compile for each candidate batch (largest first) until XLA's memory estimate fits the device; run that one."""
    import jax

    import train_step as bench_train

    from jaxchat.dryrun import TrainProgram

    limit = bench_train.device_memory_limit() or sizes.get("memory_limit_gib", 0) * 2**30
    records = read_results(out)
    measured = find(records, "env", "ceilings")
    measured_peak = measured["gemm_tflops"] * 1e12 if measured else None
    for batch in batches:
        cfg = _train_config(path, sizes["overrides"], batch, attention)
        try:
            prog = TrainProgram(cfg, attention)
        except Exception as e:  # noqa: BLE001
            emit(out, stage, kind="compile_failed", config=cfg.run, device_batch_size=batch,
                 error=f"{type(e).__name__}: {str(e)[:300]}")
            continue
        mem = prog.memory()
        fits = not (limit and mem and mem["need_bytes"] > 0.97 * limit)
        emit(out, stage, kind="compiled", config=cfg.run, depth=cfg.depth, device_batch_size=batch, attention=attention,
             compile_s=round(prog.compile_s, 1), need_gib=round(mem.get("need_bytes", 0) / 2**30, 2),
             temp_gib=round(mem.get("temp_bytes", 0) / 2**30, 2),
             limit_gib=round(limit / 2**30, 2) if limit else None, fits=fits)
        if not fits:
            continue
        try:
            params, opt_state, data = prog.init()
            dt, first, params, opt_state = prog.run(params, opt_state, data, sizes["steps"], sizes["warmup"],
                                                    log=print)
        except Exception as e:  # noqa: BLE001 -- an OOM the estimate missed: try the next batch
            emit(out, stage, kind="run_failed", config=cfg.run, device_batch_size=batch,
                 error=f"{type(e).__name__}: {str(e)[:300]}")
            continue
        peak = bench_train.peak_memory()
        fig = prog.figures(dt)
        measured_mfu = prog.figures(dt, peak=measured_peak)["mfu_percent"] if measured_peak else None
        result = emit(out, stage, kind="step", config=cfg.run, depth=cfg.depth, device_batch_size=batch,
                      sequence_len=cfg.sequence_len, attention=attention, compile_s=round(prog.compile_s, 1),
                      **fig, mfu_measured_percent=measured_mfu,
                      first_step_s=round(first, 2), peak_memory_gib=round(peak / 2**30, 2) if peak else None,
                      device=jax.devices()[0].device_kind)
        if profile:
            emit(out, stage, kind="profile", **profile_step(prog, params, opt_state, data, out))
        return result
    emit(out, stage, kind="no_fit", config=path, batches=batches)
    return None


def stage_train(out: Path, sizes: dict, attention: str, **_):
    _fit_and_time(out, "train", sizes, sizes["config"], sizes["batches"], attention, profile=True)


# Kernel classes by name, first match wins (cuDNN attention kernels carry "fmha"/"sdpa"/"flash"; cuBLAS and CUTLASS
# GEMMs "gemm"/"xmma"/"nvjet"/"cutlass"; XLA's own kernels are named for their fusion).
KERNEL_CLASSES = [
    ("attention", r"fmha|sdpa|flash|cudnn|attention"),
    ("collective", r"nccl|all-reduce|all-gather|reduce-scatter|all-to-all|collective"),
    ("gemm", r"gemm|xmma|nvjet|cutlass|cublas|matmul|dot"),
    ("copy", r"memcpy|memset|copy|transpose|dynamic-update-slice"),
    ("fusion", r"fusion|loop_|input_|reduce|triton|convert|broadcast"),
]


def kernel_class(name: str) -> str:
    low = name.lower()
    for cls, pattern in KERNEL_CLASSES:
        if re.search(pattern, low):
            return cls
    return "other"


def summarize_trace(path: Path) -> dict:
    """Time per kernel class and the top 10 kernels of a perfetto trace. On a GPU the kernels are the events of the
    device's stream threads; without a device trace (CPU) the host's non-Python events stand in, and say so."""
    data = json.load(gzip.open(path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    pids = {e["pid"]: e.get("args", {}).get("name", "") for e in events
            if e.get("ph") == "M" and e.get("name") == "process_name"}
    threads = {(e["pid"], e["tid"]): e.get("args", {}).get("name", "") for e in events
               if e.get("ph") == "M" and e.get("name") == "thread_name"}
    spans = [e for e in events if e.get("ph") == "X" and "dur" in e]
    device = [e for e in spans if "/device:" in pids.get(e["pid"], "")
              and threads.get((e["pid"], e.get("tid")), "").lower().startswith("stream")]
    source = "device streams"
    if not device:
        source = "host events (no device trace)"
        device = [e for e in spans if not e["name"].startswith("$") and "::" not in e["name"]
                  and not e["name"].startswith(("PjitFunction", "ThreadpoolListener", "end:"))]
    by_class: dict[str, float] = {}
    by_name: dict[str, list] = {}
    for e in device:
        us = float(e["dur"])
        by_class[kernel_class(e["name"])] = by_class.get(kernel_class(e["name"]), 0.0) + us
        entry = by_name.setdefault(e["name"], [0, 0.0])
        entry[0] += 1
        entry[1] += us
    total = sum(by_class.values()) or 1.0
    top = sorted(by_name.items(), key=lambda kv: -kv[1][1])[:10]
    return {"source": source, "kernel_ms": round(total / 1e3, 3),
            "classes": {k: {"ms": round(v / 1e3, 3), "percent": round(100 * v / total, 1)}
                        for k, v in sorted(by_class.items(), key=lambda kv: -kv[1])},
            "top10": [{"name": n[:120], "class": kernel_class(n), "count": c, "ms": round(us / 1e3, 3)}
                      for n, (c, us) in top]}


def profile_step(prog, params, opt_state, data, out: Path) -> dict:
    import jax

    trace_dir = Path(os.environ.get("JAXCHAT_PROFILE_DIR", "/tmp/jaxchat-gpu-check-profile"))
    trace_dir.mkdir(parents=True, exist_ok=True)
    before = set(trace_dir.rglob("perfetto_trace.json.gz"))
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        params, opt_state, m = prog.compiled(params, opt_state, data, {"lrm": 1.0, "momentum": 0.95})
        jax.block_until_ready(m)
    traces = sorted(set(trace_dir.rglob("perfetto_trace.json.gz")) - before, key=lambda p: p.stat().st_mtime)
    if not traces:
        return {"error": f"no perfetto trace written under {trace_dir}"}
    return summarize_trace(traces[-1])


def stage_decode(out: Path, sizes: dict, **_):
    import decode as bench_decode

    from jaxchat import config as C

    cfg = C.load_config([f"--config={sizes['config']}", *sizes["overrides"]])
    measured = find(read_results(out), "env", "ceilings")
    bandwidth = measured["copy_gbps"] * 1e9 if measured else None
    d = sizes["decode"]
    result = bench_decode.measure(cfg, d["batch_sizes"], d["prompt_tokens"], d["decode_tokens"], 0.0, bandwidth)
    for r in result.pop("results"):
        emit(out, "decode", kind="batch", config=cfg.run, bandwidth_source=result["bandwidth_source"],
             weight_bytes=result["weight_bytes"], **{k: (round(v, 6) if isinstance(v, float) else v)
                                                     for k, v in r.items()})


def stage_eval(out: Path, sizes: dict, **_):
    import eval as bench_eval

    from jaxchat import config as C

    cfg = C.load_config([f"--config={sizes['config']}", *sizes["overrides"]])
    emit(out, "eval", kind="throughput", **bench_eval.measure(cfg, **sizes["eval"]))


def stage_extra(out: Path, sizes: dict, attention: str, **_):
    records = read_results(out)
    step = find(records, "train", "step")
    other = "chunked" if attention == "cudnn" else "xla"
    if step:  # the same step with the other attention, for the comparison
        _fit_and_time(out, "extra", sizes, sizes["config"], [step["device_batch_size"]], other, profile=False)
    else:
        emit(out, "extra", kind="note", note="attention comparison skipped: the train stage ran no step")
    _fit_and_time(out, "extra", sizes, sizes["extra_config"], sizes["extra_batches"], attention, profile=False)


def fp8_instructions(hlo: str) -> dict:
    """What an optimised HLO holds of fp8: GEMMs on fp8 operands (cuBLASLt custom calls, or dots on f8 arrays where
    no rewrite happened) and every instruction producing an f8 array (the quantisations)."""
    gemms = [line for line in hlo.splitlines() if "f8e" in line and ("custom-call" in line or " dot(" in line)]
    return {"fp8_gemms": len(gemms), "fp8_cublas_gemms": sum("cublas" in g.lower() for g in gemms),
            "f8_instructions": sum(" = f8e" in line for line in hlo.splitlines())}


def stage_fp8(out: Path, sizes: dict, attention: str, **_):
    """The same 2026-model step in bf16 and with fp8 training matmuls (the record's --fp8): step time, MFU (FLOPs from
    the model either way) and the FP8 GEMMs XLA compiled."""
    from jaxchat.dryrun import TrainProgram

    ms = {}
    for fp8 in (False, True):
        cfg = _train_config(sizes["fp8_config"], [*sizes["fp8_overrides"], f"--config.fp8={fp8}"], sizes["fp8_batch"],
                            attention)
        try:
            prog = TrainProgram(cfg, attention)
            params, opt_state, data = prog.init()
            dt, _, params, opt_state = prog.run(params, opt_state, data, sizes["steps"], sizes["warmup"], log=print)
        except Exception as e:  # noqa: BLE001 -- fp8 not supported here is a finding
            emit(out, "fp8", kind="failed", fp8=fp8, error=f"{type(e).__name__}: {str(e)[:300]}")
            continue
        ms[fp8] = dt
        emit(out, "fp8", kind="step", fp8=fp8, config=cfg.run, depth=cfg.depth, device_batch_size=cfg.device_batch_size,
             compile_s=round(prog.compile_s, 1), **prog.figures(dt), **fp8_instructions(prog.compiled.as_text()))
        del params, opt_state, data, prog
    if len(ms) == 2:
        emit(out, "fp8", kind="speedup", speedup=round(ms[False] / ms[True], 3))


STAGE_FUNCTIONS = {"env": stage_env, "attention": stage_attention, "train": stage_train, "decode": stage_decode,
                   "eval": stage_eval, "fp8": stage_fp8, "extra": stage_extra}


# ----------------------------------------------------------------------------------------------------------------------
# The driver


def carried_wheels(target: Path, log) -> list[str]:
    """Install the carried wheels whose package is missing or older here (pip --no-index --no-deps --target)."""
    if not WHEELS.is_dir():
        return []
    needed = []
    for wheel in sorted(WHEELS.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        try:
            have = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            have = None
        if have is None or _version_key(have) < _version_key(version):
            needed.append(wheel)
            log(f"carried wheel {wheel.name}: installed version {have or 'none'}")
    if needed:
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", str(target), *map(str, needed)], check=True)
    return [w.name for w in needed]


def _version_key(v: str) -> tuple:
    return tuple(int(p) if p.isdigit() else 0 for p in re.split(r"[.+-]", v)[:4])


def run_stage(name: str, timeout: float, args, attention: str, env: dict, log_file) -> tuple[str, float]:
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--stage={name}", f"--out={args.out}",
           f"--attention={attention}"] + (["--dry-run"] if args.dry_run else [])
    t0 = time.perf_counter()
    log_file.write(f"\n===== stage {name} (timeout {timeout:.0f} s) =====\n")
    log_file.flush()
    proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
        status = "ok" if rc == 0 else f"failed (exit {rc})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status = f"timed out after {timeout:.0f} s"
    return status, time.perf_counter() - t0


def pct(x) -> str:
    return "n/a" if x is None else f"{x:.1f}%"


def summary(records: list[dict], statuses: dict) -> str:
    lines = ["| stage | status | s | figures |", "|---|---|---:|---|"]

    def row(stage, text):
        st, secs = statuses.get(stage, ("not run", 0.0))
        lines.append(f"| {stage} | {st} | {secs:.0f} | {text} |")

    c = find(records, "env", "ceilings")
    v = find(records, "env", "versions")
    row("env", (f"{c['device']}; GEMM {c['gemm_tflops']} TFLOP/s (nominal {c['nominal_tflops'] or 'n/a'}); copy "
                f"{c['copy_gbps']} GB/s (nominal {c['nominal_gbps'] or 'n/a'}); jax {(v or {}).get('jax')}, cuDNN "
                f"{(v or {}).get('cudnn')}") if c else "-")
    variants = [r for r in records if r.get("stage") == "attention" and r.get("kind") == "variant"]
    choice = find(records, "attention", "choice")
    def impl(r, name):
        if f"{name}_error" in r:
            return f"{name} failed ({r[f'{name}_error'][:40]})"
        return f"{name} {r[f'{name}_ms']} ms (err {r[f'{name}_max_error']})"

    row("attention", "; ".join(f"{r['variant']}: {impl(r, 'cudnn')}, {impl(r, 'xla')}, {impl(r, 'chunked')}"
                               for r in variants)
        + (f" -> {choice['attention']}" if choice else ""))
    for stage in ("train", "extra"):
        steps = [r for r in records if r.get("stage") == stage and r.get("kind") == "step"]
        rejected = [r for r in records if r.get("stage") == stage and r.get("kind") == "compiled" and not r["fits"]]
        text = "".join(f"{r['config']} B={r['device_batch_size']} needs {r['need_gib']} GiB > {r['limit_gib']}; "
                       for r in rejected)
        text += "; ".join(f"{r['config']} B={r['device_batch_size']} {r['attention']}: compile {r['compile_s']} s, "
                          f"{r['step_ms']} ms, "
                          f"{r['tokens_per_s']:,.0f} tok/s, MFU {pct(r['mfu_percent'])} nominal / "
                          f"{pct(r['mfu_measured_percent'])} measured, peak {r['peak_memory_gib'] or 'n/a'} GiB"
                          for r in steps)
        prof = find(records, stage, "profile")
        if prof and "classes" in prof:
            text += "; kernels: " + ", ".join(f"{k} {v['percent']}%" for k, v in prof["classes"].items())
        row(stage, text or "-")
    dec = [r for r in records if r.get("stage") == "decode" and r.get("kind") == "batch"]
    mbu = lambda r: "n/a" if r["mbu"] is None else f"{100 * r['mbu']:.0f}%"  # noqa: E731
    row("decode", "; ".join(f"B={r['batch']}: TTFT {1e3 * r['ttft_s']:.1f} ms, TPOT {1e3 * r['tpot_s']:.2f} ms, "
                            f"{r['tokens_per_s']:,.0f} tok/s, MBU {mbu(r)}" for r in dec) or "-")
    f8 = [r for r in records if r.get("stage") == "fp8" and r.get("kind") == "step"]
    sp = find(records, "fp8", "speedup")
    row("fp8", "; ".join(f"{'fp8' if r['fp8'] else 'bf16'} {r['step_ms']} ms, MFU {pct(r['mfu_percent'])}, "
                         f"{r['fp8_gemms']} fp8 GEMMs ({r['fp8_cublas_gemms']} cuBLASLt)" for r in f8)
        + (f" -> {sp['speedup']}x" if sp else "") or "-")
    ev = find(records, "eval", "throughput")
    row("eval", (f"{ev['batched_problems_per_s']} problems/s batched x{ev['batch']} vs {ev['single_problems_per_s']} "
                 f"one at a time ({ev['speedup']}x)") if ev else "-")
    text = "\n".join(lines)
    return text if len(text) < 3000 else text[:2990] + "\n(cut)"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="toy sizes on any machine, every path")
    ap.add_argument("--budget", type=float, default=0, help="overall deadline in seconds (default 360; dry run 240)")
    ap.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "out" / "gpu_check"))
    ap.add_argument("--stage", choices=list(STAGE_FUNCTIONS), help=argparse.SUPPRESS)
    ap.add_argument("--attention", default="chunked", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    sizes = DRY if args.dry_run else FULL
    if args.stage:  # one stage, in the process the driver started for it
        if args.dry_run and os.environ.get(STALL_ENV) == args.stage:
            time.sleep(3600)
        STAGE_FUNCTIONS[args.stage](out, sizes, attention=args.attention)
        return 0

    budget = args.budget or (240 if args.dry_run else 360)
    deadline = time.monotonic() + budget
    (out / "results.jsonl").unlink(missing_ok=True)
    env = dict(os.environ)
    env.setdefault("JAX_COMPILATION_CACHE_DIR", "/tmp/jaxchat-jax-cache")
    env["PYTHONUNBUFFERED"] = "1"
    statuses = {}
    with open(out / "log.txt", "w") as log_file:
        def log(msg):
            log_file.write(msg + "\n")
            log_file.flush()
            print(msg, file=sys.stderr, flush=True)

        site = Path(env.get("JAXCHAT_WHEELS_TARGET", "/tmp/jaxchat-site"))
        installed = carried_wheels(site, log)
        if installed:
            env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        emit(out, "driver", kind="start", dry_run=args.dry_run, budget_s=budget, wheels_installed=installed,
             compilation_cache=env["JAX_COMPILATION_CACHE_DIR"])
        attention = "chunked"
        scale = DRY_RUN_TIME_SCALE if args.dry_run else 1.0
        for name, stage_budget, minimum in STAGES:
            stage_budget, minimum = stage_budget * scale, minimum * scale
            left = deadline - time.monotonic() - SUMMARY_RESERVE_S
            if left < minimum:
                statuses[name] = ("skipped", 0.0)
                log(f"stage {name}: skipped, {max(left, 0):.0f} s left of the {budget:.0f} s budget "
                    f"(it needs at least {minimum:.0f} s)")
                emit(out, name, kind="skipped", seconds_left=round(max(left, 0), 1))
                continue
            timeout = min(stage_budget, left)
            log(f"stage {name}: starting (timeout {timeout:.0f} s)")
            statuses[name] = run_stage(name, timeout, args, attention, env, log_file)
            log(f"stage {name}: {statuses[name][0]} in {statuses[name][1]:.1f} s")
            if name == "attention":
                choice = find(read_results(out), "attention", "choice")
                attention = choice["attention"] if choice else "chunked"
                log(f"attention for the rest of the run: {attention}"
                    + ("" if choice else " (the attention stage gave no verdict)"))
        emit(out, "driver", kind="end", statuses={k: v[0] for k, v in statuses.items()},
             seconds={k: round(v[1], 1) for k, v in statuses.items()})
    print(summary(read_results(out), statuses))
    return 0 if all(s[0] in ("ok", "skipped") for s in statuses.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
