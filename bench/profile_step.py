"""Where does the training step's time go? Profile the jitted step and print the time per kind of work.

    python bench/profile_step.py [--config=configs/tiny.py] [--steps=5] [--profile-steps=3] [--top=15] [--config.x=y]

Builds the real step (jaxchat.dryrun.TrainProgram: the trainer's model, loss, optimizer and donation) on one device,
times `--steps` synced steps (median wall and CPU time of this process), then traces `--profile-steps` more with
`jax.profiler.trace` and reads the perfetto trace back. Every traced op is matched to its instruction in the compiled
HLO, and classified twice:
- by what it computes, from the Python stack XLA records for it (forward or backward matmul, attention, softcap and
  cross-entropy, RMSNorm, rotary, the embedding gather and its scatter-add, Muon's Newton-Schulz, its momentum,
  AdamW, clipping, the parameter update); an op of the backward pass carries `transpose(jvp(...))` in its name; a
  fused op counts for whatever its root came from;
- by what kind of op it is (matmul, copy/transpose, scatter, gather, reduction, elementwise), from its HLO.
Times are per step, as wall shares: on a CPU, XLA runs independent ops concurrently on its threads (and an op may
itself use several), so at every instant the ops running split that instant equally; the shares add up to the time
some op ran in the traced steps (busy_ms; the timed steps' median differs by dispatch, gaps and the load). On a CPU,
XLA only emits per-op trace events with `--xla_cpu_enable_xprof_traceme=true`, which this script adds to XLA_FLAGS
before jax starts.

On a shared machine the wall shares include the time other processes held the cores. For a breakdown that does not
depend on the load, pin the run to one core (`taskset -c 0 python bench/profile_step.py`): then the ops run one after
another and the shares, scaled by cpu_ms / busy_ms, are CPU time. `--devices=N` profiles N devices (default 1: set
JAX_PLATFORMS=cpu and leave --xla_force_host_platform_device_count out of XLA_FLAGS for the plain one-device step).

The last line printed is one JSON object. Written for the CPU step; on a GPU it matches the device streams' kernels to
HLO by their `hlo_op` argument or name (untested there).
"""
from __future__ import annotations

import argparse
import glob
import gzip
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path

if "--xla_cpu_enable_xprof_traceme" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_enable_xprof_traceme=true").strip()

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxchat import config as C  # noqa: E402
from jaxchat import model  # noqa: E402
from jaxchat.dryrun import HPARAMS, TrainProgram  # noqa: E402

# What an op computes, by the innermost function of its recorded Python stack that names a kind of work (the first
# match walking outwards). Matmuls are split into forward and backward by the op's name.
FUNCTION_CATEGORY = [
    ({"orthogonalize", "orthogonalize_sharded"}, "muon newton-schulz"),
    ({"nesterov_step", "muon.<locals>.update_fn"}, "muon momentum+scale"),
    ({"clip_by_global_norm.<locals>.update_fn", "clip_by_global_norm.<locals>.update_fn.<locals>.clip_fn",
      "tree_norm", "train_step"}, "grad clip+norm"),
    ({"apply_updates", "apply_updates.<locals>.<lambda>", "train_step.<locals>.<lambda>"}, "param update"),
    ({"causal_attention", "blocked_causal_attention", "chunked_attention", "_chunked_forward", "_chunked_bwd",
      "_scores_block"}, "attention"),
    ({"token_losses", "chunked_token_losses"}, "softcap+cross-entropy"),
    ({"softcapped_logits"}, "softcap+cross-entropy"),
    ({"embed"}, "embedding gather/scatter"),
    ({"apply_rotary", "rotary_tables"}, "rotary"),
    ({"rms_norm"}, "rmsnorm"),
    ({"relu2"}, "relu^2"),
    ({"_accumulate_grads", "_accumulate_grads.<locals>.micro_step", "_accumulate_grads.<locals>.<lambda>"},
     "grad accumulation"),
]
ADAM_FILES = ("optax/",)  # any other optax op (scale_by_adam, bias correction, scale, masking) is AdamW's


def parse_hlo(text: str) -> dict:
    """{instruction name: {"opcode", "op_name", "frames": [function names, innermost first], "contains": set}}."""
    files, funcs, locs, frames = {}, {}, {}, {}
    section = None
    table = re.compile(r"^(\d+) (.*)$")
    for line in text.splitlines():
        if line in ("FileNames", "FunctionNames", "FileLocations", "StackFrames"):
            section = line
            continue
        if not line.strip():
            section = None
            continue
        if section:
            m = table.match(line)
            if not m:
                section = None
            else:
                i, rest = int(m.group(1)), m.group(2)
                if section == "FileNames":
                    files[i] = rest.strip('"')
                elif section == "FunctionNames":
                    funcs[i] = rest.strip('"')
                elif section == "FileLocations":
                    f = re.search(r"file_name_id=(\d+) function_name_id=(\d+)", rest)
                    locs[i] = (files.get(int(f.group(1)), ""), funcs.get(int(f.group(2)), ""))
                else:
                    f = re.search(r"file_location_id=(\d+) parent_frame_id=(\d+)", rest)
                    frames[i] = (int(f.group(1)), int(f.group(2)) - 1)  # printed 1-based; 0 = no parent

    def stack(frame_id: int) -> list:
        out, seen = [], set()
        while frame_id in frames and frame_id not in seen:
            seen.add(frame_id)
            loc, frame_id = frames[frame_id]
            out.append(locs.get(loc, ("", "")))
        return out

    instr = re.compile(r"^\s*(?:ROOT\s+)?%([^\s=]+) = (?:\([^%]*?\)|\S+) ([a-z][\w\-]*)\(")
    comp_start = re.compile(r"^(?:ENTRY\s+)?%([^\s(]+)\s*\(")
    ops, comps, current = {}, {}, None
    for line in text.splitlines():
        if not line.startswith(" "):
            m = comp_start.match(line)
            current = m.group(1) if m else None
            if current:
                comps[current] = []
            continue
        m = instr.match(line)
        if not m:
            continue
        name, opcode = m.group(1), m.group(2)
        op_name = re.search(r'op_name="([^"]*)"', line)
        frame = re.search(r"stack_frame_id=(\d+)", line)
        calls = re.findall(r"(?:calls|to_apply|body|condition)=%([^\s,}]+)", line)
        ops[name] = {"opcode": opcode, "op_name": op_name.group(1) if op_name else "",
                     "stack": stack(int(frame.group(1))) if frame else [], "calls": calls}
        if current:
            comps[current].append(name)

    def contents(comp: str, seen: set) -> set:
        out = set()
        for n in comps.get(comp, []):
            out.add(ops[n]["opcode"])
            for c in ops[n]["calls"]:
                if c not in seen:
                    seen.add(c)
                    out |= contents(c, seen)
        return out

    for op in ops.values():
        op["contains"] = set()
        for c in op["calls"]:
            op["contains"] |= contents(c, {c})
    return ops


def op_kind(op: dict) -> str:
    ops = {op["opcode"]} | op["contains"]
    if ops & {"dot", "convolution"} or op["opcode"] == "custom-call":
        return "matmul"
    if "scatter" in ops:
        return "scatter"
    if "gather" in ops:
        return "gather"
    if ops & {"reduce", "reduce-window"}:
        return "reduction"
    if op["opcode"] in ("copy", "transpose") or (op["opcode"] == "fusion" and ops & {"copy", "transpose"}
                                                 and not ops - {"copy", "transpose", "bitcast", "parameter",
                                                                "reshape", "broadcast", "slice", "concatenate"}):
        return "copy/transpose"
    if op["opcode"] in ("copy-start", "copy-done", "concatenate", "slice", "dynamic-slice", "dynamic-update-slice",
                        "pad"):
        return "copy/transpose"
    return "elementwise"


def category(op: dict) -> str:
    backward = "transpose(" in op["op_name"]
    kind = op_kind(op)
    for path, func in op["stack"]:
        if func in ("Linear.__call__", "chunked_token_losses.<locals>.<lambda>",
                    "chunked_token_losses.<locals>.chunk") and kind == "matmul":
            return "matmul " + ("backward" if backward else "forward")
        if func == "softcapped_logits" and kind == "matmul":
            return "matmul " + ("backward" if backward else "forward")
        for names, cat in FUNCTION_CATEGORY:
            if func in names:
                if cat in ("muon newton-schulz", "muon momentum+scale", "grad clip+norm", "param update",
                           "grad accumulation"):
                    return cat
                return f"{cat} {'backward' if backward else 'forward'}"
        if any(a in path for a in ADAM_FILES) and "_clipping" not in path and "tree_math" not in path:
            return "adamw"
    return "other" + (" backward" if backward else "")


def trace_ops(trace_path: str, ops: dict) -> list:
    """[(instruction name, start us, duration us)] of every traced op that is an instruction of the program."""
    data = json.load(gzip.open(trace_path))
    events = data["traceEvents"] if isinstance(data, dict) else data
    out = []
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        name = e.get("args", {}).get("hlo_op") or e["name"]
        if name in ops and ops[name]["opcode"] not in ("while", "call", "conditional"):
            out.append((name, float(e["ts"]), float(e["dur"])))
    return out


def wall_shares(timed: list) -> tuple[dict, float]:
    """Each op's share of the wall time: every instant the ops running then (on any thread) split it equally, so the
    shares add up to the time at least one op ran (returned second, in us). Ops running concurrently on XLA's
    threads thus count for what they cost the step, not for their own (contended) duration."""
    edges = sorted([(ts, 1, i) for i, (_, ts, _) in enumerate(timed)] + [(ts + d, -1, i) for i, (_, ts, d) in
                                                                          enumerate(timed)])
    share, active, last, busy = [0.0] * len(timed), set(), None, 0.0
    for t, kind, i in edges:
        if active and last is not None and t > last:
            for j in active:
                share[j] += (t - last) / len(active)
            busy += t - last
        last = t
        if kind > 0:
            active.add(i)
        else:
            active.discard(i)
    return {i: s for i, s in enumerate(share)}, busy


def profile(prog, params, opt_state, batch, n: int):
    trace_dir = tempfile.mkdtemp(prefix="jaxchat-profile-")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(n):
            params, opt_state, m = prog.compiled(params, opt_state, batch, HPARAMS)
            jax.block_until_ready(m)
    traces = glob.glob(f"{trace_dir}/**/perfetto_trace.json.gz", recursive=True)
    if not traces:
        raise SystemExit(f"no perfetto trace written under {trace_dir}")
    return traces[0], params, opt_state


def table(rows: dict, total: float, title: str) -> str:
    lines = [f"{title:<34} {'ms/step':>9} {'%':>6}"]
    for k, v in sorted(rows.items(), key=lambda kv: -kv[1]):
        lines.append(f"{k:<34} {v:9.1f} {100 * v / total:6.1f}")
    lines.append(f"{'total (time any op ran)':<34} {total:9.1f} {100.0:6.1f}")
    return "\n".join(lines)


def main(argv):
    tiny = Path(__file__).resolve().parent.parent / "configs" / "tiny.py"
    ap = argparse.ArgumentParser(prog="python bench/profile_step.py", description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5, help="timed steps")
    ap.add_argument("--profile-steps", type=int, default=3, help="traced steps")
    ap.add_argument("--top", type=int, default=15, help="ops listed")
    ap.add_argument("--devices", type=int, default=1)
    cfg, args = C.parse_command(argv, ap, default_config=str(tiny))
    steps, n_prof, top = args.steps, args.profile_steps, args.top
    devices = jax.devices()[: args.devices]
    attention, _ = model.resolve_attention(cfg.attention, devices[0].platform)
    prog = TrainProgram(cfg, attention, devices)
    params, opt_state, batch = prog.init()
    walls, cpus = [], []
    for i in range(2 + steps):  # 2 warm-up steps, then timed ones (wall and this process's CPU time)
        t, c = time.perf_counter(), time.process_time()
        params, opt_state, m = prog.compiled(params, opt_state, batch, HPARAMS)
        jax.block_until_ready(m)
        if i >= 2:
            walls.append(time.perf_counter() - t)
            cpus.append(time.process_time() - c)
    dt, cpu = float(np.median(walls)), float(np.median(cpus))
    ops = parse_hlo(prog.compiled.as_text())
    path, params, opt_state = profile(prog, params, opt_state, batch, n_prof)
    timed = trace_ops(path, ops)
    shares, _ = wall_shares(timed)
    op_sum = sum(d for _, _, d in timed) / 1e3 / n_prof
    by_cat, by_kind, by_op = {}, {}, {}
    for i, (name, _, _) in enumerate(timed):
        ms = shares[i] / 1e3 / n_prof
        op = ops[name]
        c, k = category(op), op_kind(op)
        by_cat[c] = by_cat.get(c, 0.0) + ms
        by_kind[k] = by_kind.get(k, 0.0) + ms
        e = by_op.setdefault(name, {"ms": 0.0, "category": c, "kind": k, "opcode": op["opcode"]})
        e["ms"] += ms
    total = sum(by_cat.values()) or 1.0
    print(f"{cfg.run}: step {dt * 1e3:.1f} ms wall, {cpu * 1e3:.1f} ms CPU (medians of {steps}), {len(devices)} "
          f"{devices[0].platform} device(s), jax {jax.__version__}, load average {os.getloadavg()[0]:.2f}; "
          f"{n_prof} steps traced, {len(timed) // max(n_prof, 1)} ops per step, {op_sum:.1f} ms of op time per step "
          f"in {total:.1f} ms when some op ran (wall shares below: concurrent ops split the time)")
    print(table(by_cat, total, "what (from the Python stack)"))
    print()
    print(table(by_kind, total, "op kind (from the HLO)"))
    print()
    print(f"top {top} ops:")
    top_ops = sorted(by_op.items(), key=lambda kv: -kv[1]["ms"])[:top]
    for name, e in top_ops:
        print(f"  {e['ms']:8.1f} ms  {name:<32} {e['kind']:<15} {e['category']}")
    result = {
        "bench": "profile_step", "config": cfg.run, "device": devices[0].device_kind, "n_devices": len(devices),
        "jax": jax.__version__, "load_average": round(os.getloadavg()[0], 2), "attention": attention,
        "compute_dtype": cfg.compute_dtype, "muon_ns_dtype": cfg.muon_ns_dtype, "remat": cfg.get("remat", "none"),
        "step_ms": round(dt * 1e3, 1),
        "cpu_ms": round(cpu * 1e3, 1),
        "busy_ms": round(total, 1), "op_ms_sum": round(op_sum, 1),
        "categories_ms": {k: round(v, 1) for k, v in sorted(by_cat.items(), key=lambda kv: -kv[1])},
        "kinds_ms": {k: round(v, 1) for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
        "top_ops": [{"name": n, "ms": round(e["ms"], 2), "kind": e["kind"], "category": e["category"]}
                    for n, e in top_ops],
        "trace": path,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1:])
