"""Decode throughput of the engine for any config with random weights: TTFT, per-token latency, tokens/s, roofline.

    python bench/decode.py --config=configs/d20.py [--batch-sizes=1,8,32,128] [--prompt-tokens=N]
                           [--decode-tokens=N] [--temperature=0.0] [--bandwidth=BYTES_PER_S]

For each batch size B: one prompt is prefilled once and shared by B sample rows (the engine's path), then
`--decode-tokens` decode steps run, each synced to the host as the engine's tool loop needs. TTFT is the (compiled)
prefill time including the first sampled token; TPOT is the median step time; tokens/s = B / TPOT.

Roofline: a decode step must read every weight once (bf16 when the config computes in bf16; the embedding is a
gather and is left out) plus each row's KV cache. The engine attends over its whole cache bucket S, so the KV bytes read
per row are S · kv_bytes_per_token. Ceiling tokens/s = B · peak_bw / (weight_bytes + B · kv_read); MBU = achieved
bytes/s over peak_bw. peak_bw is `--bandwidth` (e.g. the copy bandwidth bench/gpu_check.py measured) or the device's
nominal figure (jaxchat.hardware.PEAK_BANDWIDTH); unknown device (CPU included) → no roofline.

Defaults fit the config: nanochat's own benchmark grid is a 1,792-token prompt and 256 new tokens in a 2,048 context,
so decode defaults to min(256, sequence_len / 8) tokens and the prompt to the rest of the context. Last line: one JSON
object.
"""
import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jaxchat import config as C  # noqa: E402
from jaxchat import engine, hardware, model  # noqa: E402

def weight_bytes(params) -> int:
    """Bytes a decode step reads from weights: everything but the embedding table (a B-row gather)."""
    return sum(x.size * x.dtype.itemsize for path, x in jax.tree_util.tree_leaves_with_path(params)
               if "wte" not in jax.tree_util.keystr(path))


def kv_bytes_per_token(cfg: model.GPTConfig) -> int:
    return cfg.n_layer * 2 * cfg.n_kv_head * cfg.head_dim * jnp.dtype(cfg.compute_dtype).itemsize


def bench_batch(cfg, params, prompt, B, decode_tokens, temperature, max_top_k):
    S = engine.bucket(len(prompt) + decode_tokens, engine.MIN_CACHE_BUCKET)
    T = engine.bucket(len(prompt), engine.MIN_PROMPT_BUCKET)
    tokens = np.zeros((1, T), np.int32)
    tokens[0, :len(prompt)] = prompt
    lengths = np.asarray([len(prompt)], np.int32)
    s = engine.Sampling.rows(np.zeros(B), np.arange(B), np.full(B, temperature), np.zeros(B), np.ones(B))

    def run_prefill():
        cache = model.KVCache.zeros(cfg, B, S)
        jax.block_until_ready(cache)
        t = time.perf_counter()
        (nxt, *_), fresh = engine.prefill(cfg, max_top_k, params, tokens, lengths, s)
        cache = engine.insert(cache, fresh, np.int32(0), B)
        np.asarray(nxt)
        return time.perf_counter() - t, nxt, cache

    compile_prefill, _, _ = run_prefill()
    ttft, nxt, cache = run_prefill()
    steps, compile_decode = [], None
    for i in range(decode_tokens):
        t = time.perf_counter()
        (nxt, *_), cache = engine.decode(cfg, max_top_k, params, cache, nxt, np.full(B, i + 1, np.int32), s)
        np.asarray(nxt)  # the engine's host loop reads every column
        (steps.append if i else lambda s: None)(time.perf_counter() - t)
        if i == 0:
            compile_decode = time.perf_counter() - t
    tpot = statistics.median(steps)
    return {"batch": B, "cache_len": S, "ttft_s": ttft, "tpot_s": tpot, "tokens_per_s": B / tpot,
            "compile_prefill_s": compile_prefill, "compile_decode_s": compile_decode}


def measure(config, batch_sizes=(1, 8, 32, 128), prompt_tokens: int | None = None, decode_tokens: int | None = None,
            temperature: float = 0.0, bandwidth: float | None = None) -> dict:
    decode_tokens = decode_tokens or min(256, config.sequence_len // 8)
    prompt_tokens = prompt_tokens or config.sequence_len - decode_tokens
    if prompt_tokens < 1 or prompt_tokens + decode_tokens > config.sequence_len:
        raise SystemExit(f"--prompt-tokens={prompt_tokens} + --decode-tokens={decode_tokens} must fit the context "
                         f"(sequence_len {config.sequence_len}) with a prompt of at least one token")
    device = jax.devices()[0]
    cfg = C.model_config(config)
    dtype = jnp.dtype(cfg.compute_dtype)
    params = jax.jit(lambda: jax.tree.map(lambda x: x.astype(dtype), model.init(cfg, config.seed)[1]))()
    prompt = np.random.default_rng(0).integers(0, cfg.vocab_size - 9, prompt_tokens).tolist()
    max_top_k = min(engine.DEFAULT_MAX_TOP_K, cfg.vocab_size)

    w_bytes, kv_tok = weight_bytes(params), kv_bytes_per_token(cfg)
    bw = bandwidth or hardware.peak_bandwidth(device.device_kind)
    card = {"device": device.device_kind, "platform": device.platform, "config": config.run,
            "params": model.num_params(params), "compute_dtype": cfg.compute_dtype, "weight_bytes": w_bytes,
            "kv_bytes_per_token": kv_tok, "prompt_tokens": prompt_tokens, "decode_tokens": decode_tokens,
            "bandwidth": bw, "bandwidth_source": "given" if bandwidth else ("nominal" if bw else None)}
    print(json.dumps(card), file=sys.stderr)
    rows = []
    flops_per_token = C.derive(config).flops_per_token / 3  # forward only
    for B in batch_sizes:
        r = bench_batch(cfg, params, prompt, B, decode_tokens, temperature, max_top_k)
        kv_read = r["cache_len"] * kv_tok
        step_bytes = w_bytes + B * kv_read
        r["bytes_per_step"] = step_bytes
        r["roofline_tokens_per_s"] = B * bw / step_bytes if bw else None
        r["mbu"] = step_bytes / r["tpot_s"] / bw if bw else None
        r["prefill_tokens_per_s"] = prompt_tokens / r["ttft_s"]
        r["prefill_mfu"] = hardware.mfu(flops_per_token, r["prefill_tokens_per_s"], device.device_kind, 1)
        rows.append(r)
        roof = f"{r['roofline_tokens_per_s']:,.0f}" if bw else "n/a"
        mbu = f"{100 * r['mbu']:.1f}%" if bw else "n/a"
        print(f"B={B:4d} S={r['cache_len']:5d}  TTFT {1e3 * r['ttft_s']:8.1f} ms  TPOT {1e3 * r['tpot_s']:7.2f} ms  "
              f"{r['tokens_per_s']:10,.0f} tok/s  roofline {roof} tok/s  MBU {mbu}", file=sys.stderr)
    return {**card, "results": rows}


def main(argv):
    ap = argparse.ArgumentParser(prog="python bench/decode.py", description=__doc__.splitlines()[0])
    ap.add_argument("--batch-sizes", default="1,8,32,128", metavar="B,B,...", help="rows decoded together, each run")
    ap.add_argument("--prompt-tokens", type=int, default=None, metavar="N", help="default: the context's rest")
    ap.add_argument("--decode-tokens", type=int, default=None, metavar="N", help="default: min(256, sequence_len / 8)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--bandwidth", type=float, default=None, metavar="BYTES_PER_S",
                    help="HBM bytes/s for the roofline (default: the device's nominal figure)")
    config, args = C.parse_command(argv, ap)
    out = measure(config, [int(b) for b in args.batch_sizes.split(",")], args.prompt_tokens, args.decode_tokens,
                  args.temperature, args.bandwidth)
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
