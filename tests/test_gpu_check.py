"""bench/gpu_check.sh: the prepared GPU check runs every stage at toy size here, on an imitation of the GPU image
(no grain, fastapi, uvicorn; ml_collections only from a carried folder), so it cannot rot between GPU loans."""
import gzip
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402

MISSING_ON_IMAGE = "grain,fastapi,uvicorn,ml_collections"


def image_env(tmp_path: Path, **extra) -> dict:
    """The environment of the GPU image: the packages it lacks blocked, ml_collections carried as a `--target`
    install of its wheel would lay it out."""
    import ml_collections

    carried = tmp_path / "carried"
    shutil.copytree(Path(ml_collections.__file__).parent, carried / "ml_collections")
    env = dict(os.environ)
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT / "tests" / "gpu_image"), str(carried)]),
               JAXCHAT_BLOCK_IMPORTS=MISSING_ON_IMAGE, JAXCHAT_CARRIED=str(carried), JAXCHAT_PYTHON=sys.executable,
               OUT=str(tmp_path / "out"), JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"),
               JAXCHAT_PROFILE_DIR=str(tmp_path / "profile"), JAXCHAT_WHEELS_TARGET=str(tmp_path / "site"),
               JAX_PLATFORMS="cpu", **extra)
    env.pop("XLA_FLAGS", None)  # one device, as on the card
    return env


def run_check(tmp_path, *args, **env):
    return subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", *args], cwd=ROOT,
                          env=image_env(tmp_path, **env), capture_output=True, text=True, timeout=600)


def records(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]


def test_the_image_imitation_blocks_what_the_gpu_image_lacks(tmp_path):
    code = ("import importlib\n"
            "for name in ('grain', 'fastapi', 'uvicorn'):\n"
            "    try:\n        importlib.import_module(name)\n    except ModuleNotFoundError:\n        continue\n"
            "    raise SystemExit(name + ' imported')\n"
            "import ml_collections, os\n"
            "assert ml_collections.__file__.startswith(os.environ['JAXCHAT_CARRIED']), ml_collections.__file__\n"
            "import jaxchat.train_step, jaxchat.engine, jaxchat.sharding, jaxchat.optim, jaxchat.checkpoint\n"
            "import jaxchat.evaluate.core, jaxchat.evaluate.chat_eval, jaxchat.evaluate.bpb, jaxchat.evaluate.run\n"
            "import jaxchat.evaluate.report, jaxchat.trainer, jaxchat.chat, jaxchat.rl\n"
            "print('imports ok')\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=image_env(tmp_path), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "imports ok" in r.stdout


def test_dry_run_runs_every_stage_on_the_gpu_image_and_prints_the_summary(tmp_path):
    r = run_check(tmp_path)
    assert r.returncode == 0, (r.stdout[-3000:], (tmp_path / "out" / "log.txt").read_text()[-5000:])
    table = r.stdout[r.stdout.index("| stage | status |"):]
    assert len(table.encode()) < 3000
    for stage in ("env", "attention", "train", "decode", "eval", "fp8", "extra"):
        assert f"| {stage} | ok |" in table, table
    rs = records(tmp_path)
    kinds = {(x["stage"], x["kind"]) for x in rs}
    for needed in [("env", "versions"), ("env", "ceilings"), ("attention", "variant"), ("attention", "choice"),
                   ("train", "compiled"), ("train", "step"), ("train", "profile"), ("decode", "batch"),
                   ("eval", "throughput"), ("fp8", "speedup"), ("extra", "step")]:
        assert needed in kinds, needed
    # fp8 on a CPU: the quantisations and fp8 dots are in the HLO (no cuBLASLt to rewrite them into FP8 GEMMs)
    f8 = {x["fp8"]: x for x in rs if x["stage"] == "fp8" and x["kind"] == "step"}
    assert f8[True]["f8_instructions"] > 0 and f8[False]["f8_instructions"] == 0
    # No cuDNN on a CPU: every variant records the failure and the run falls back to XLA, saying why.
    variants = [x for x in rs if x["kind"] == "variant"]
    assert {v["variant"] for v in variants} == {"mha", "gqa", "window"}
    assert all("cudnn_error" in v and v["xla_max_error"] < 0.05 and v["chunked_max_error"] < 0.05 for v in variants)
    assert gpu_check.find(rs, "attention", "choice")["attention"] == "chunked"
    # The fit search compiles the largest batch first and rejects it on XLA's memory estimate.
    compiled = [x for x in rs if x["stage"] == "train" and x["kind"] == "compiled"]
    assert [(c["device_batch_size"], c["fits"]) for c in compiled] == [(256, False), (8, True)]
    step = gpu_check.find(rs, "train", "step")
    assert step["device_batch_size"] == 8 and step["tokens_per_s"] > 0 and step["mfu_measured_percent"] > 0
    assert gpu_check.find(rs, "train", "profile")["top10"]
    decode = [x for x in rs if x["kind"] == "batch"]
    assert [d["batch"] for d in decode] == [1, 4] and all(d["mbu"] > 0 for d in decode)
    assert gpu_check.find(rs, "driver", "start")["wheels_installed"] == []  # ml_collections came from the carry


def test_a_hung_stage_is_killed_and_stages_the_budget_cannot_hold_are_skipped(tmp_path):
    r = run_check(tmp_path, "--budget=30", JAXCHAT_GPU_CHECK_STALL="attention")
    assert r.returncode == 1  # a stage that timed out is a failure of the check
    log = (tmp_path / "out" / "log.txt").read_text()
    assert "stage attention: timed out after" in log
    assert "attention for the rest of the run: chunked (the attention stage gave no verdict)" in log
    assert "stage train: skipped" in log and "stage extra: skipped" in log
    assert "| attention | timed out" in r.stdout and "| train | skipped |" in r.stdout
    assert gpu_check.find(records(tmp_path), "env", "ceilings")  # what finished before the hang is kept


def test_kernel_classes_and_top_kernels_from_a_device_trace(tmp_path):
    def meta(pid, tid, kind, name):
        return {"ph": "M", "pid": pid, "tid": tid, "name": kind, "args": {"name": name}}

    def span(name, dur, tid=7):
        return {"ph": "X", "pid": 2, "tid": tid, "name": name, "ts": 0, "dur": dur}

    events = [meta(1, 0, "process_name", "/host:CPU"), meta(2, 0, "process_name", "/device:GPU:0"),
              meta(2, 7, "thread_name", "Stream #14(Compute)"), meta(2, 8, "thread_name", "XLA Ops"),
              span("sm90_xmma_gemm_bf16bf16_bf16f32", 600), span("sm90_xmma_gemm_bf16bf16_bf16f32", 400),
              span("cudnn_generated_fort_native_sdpa_sm90_flash_fprop", 300), span("loop_multiply_fusion", 150),
              span("ncclDevKernel_AllReduce_Sum_f32", 50), span("Memcpy DtoD", 20), span("something_else", 5),
              span("fusion.123 (an XLA op row, not a kernel)", 9999, tid=8),
              {"ph": "X", "pid": 1, "tid": 3, "name": "PjitFunction(step)", "ts": 0, "dur": 9999}]
    path = tmp_path / "perfetto_trace.json.gz"
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": events}, f)
    s = gpu_check.summarize_trace(path)
    assert s["source"] == "device streams"
    assert s["kernel_ms"] == pytest.approx(1.525)
    assert {k: v["ms"] for k, v in s["classes"].items()} == {
        "gemm": 1.0, "attention": 0.3, "fusion": 0.15, "collective": 0.05, "copy": 0.02, "other": 0.005}
    assert s["top10"][0] == {"name": "sm90_xmma_gemm_bf16bf16_bf16f32", "class": "gemm", "count": 2, "ms": 1.0}


def test_carried_wheels_install_only_what_is_missing_or_older(tmp_path, monkeypatch):
    wheels = tmp_path / "whl"
    wheels.mkdir()
    for name in ("ml_collections-99.0.0-py3-none-any.whl", "optax-0.0.1-py3-none-any.whl"):
        (wheels / name).write_bytes(b"")
    monkeypatch.setattr(gpu_check, "WHEELS", wheels)
    calls = []
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda cmd, check: calls.append(cmd))
    installed = gpu_check.carried_wheels(tmp_path / "site", log=lambda m: None)
    assert installed == ["ml_collections-99.0.0-py3-none-any.whl"]  # optax here is newer than the carried 0.0.1
    assert calls and calls[0][-1].endswith("ml_collections-99.0.0-py3-none-any.whl")
    assert {"--no-index", "--no-deps", "--target"} <= set(calls[0])


def test_benches_pick_defaults_that_fit_the_config():
    import decode
    import eval as eval_bench

    from jaxchat.config import load_config

    tiny = load_config(["--config=configs/tiny.py", "--config.depth=1"])
    out = decode.measure(tiny, [1])  # no prompt/decode lengths: 224 + 32 in tiny's 256 context
    assert (out["prompt_tokens"], out["decode_tokens"]) == (224, 32)
    with pytest.raises(SystemExit, match="must fit the context"):
        decode.measure(tiny, [1], decode_tokens=256)
    # A vocabulary the generated corpus cannot train (d20's 65,536; 4,096 keeps this fast): the bench's tokenizer
    # stops at what the corpus supports and the model keeps the config's head.
    big_vocab = load_config(["--config=configs/tiny.py", "--config.depth=1", "--config.vocab_size=4096"])
    r = eval_bench.measure(big_vocab, problems=2, max_tokens=4, batch=2, single=1)
    assert r["batched_problems_per_s"] > 0 and r["prompt_tokens_mean"] > 100

