"""Decode-step attention over a KV cache in two layouts: the design's (B, S, H, D) and (B, H, S, D).

    python bench/attention_layout.py [--batch=64] [--cache=512] [--heads=4] [--head-dim=64] [--dtype=float32]

One query token per row attends over the whole cache bucket, as the engine's decode step does. With the cache stored
(B, S, H, D) the two einsums have their batch dims (B, H) apart, and XLA transposes the whole cache into a (B, H, S, D)
copy on every call; stored (B, H, S, D) they read it in place. This is the evidence behind the note in
bench/RESULTS.md on the engine's cache layout. Last line: one JSON object.
"""
import argparse
import json
import time

import jax
import jax.numpy as jnp


def attention(q_BxHxD, k, v, valid_BxS, layout):
    spec = "bshd" if layout == "BSHD" else "bhsd"
    scores = jnp.einsum(f"bhd,{spec}->bhs", q_BxHxD, k) / jnp.sqrt(q_BxHxD.shape[-1]).astype(q_BxHxD.dtype)
    scores = jnp.where(valid_BxS[:, None, :], scores.astype(jnp.float32), -jnp.inf)
    return jnp.einsum(f"bhs,{spec}->bhd", jax.nn.softmax(scores, axis=-1).astype(v.dtype), v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--cache", type=int, default=512)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--iters", type=int, default=20)
    a = ap.parse_args()
    B, S, H, D, dt = a.batch, a.cache, a.heads, a.head_dim, jnp.dtype(a.dtype)
    keys = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(keys[0], (B, H, D), dt)
    kv_bshd = [jax.random.normal(k, (B, S, H, D), dt) for k in keys[1:]]
    kv_bhsd = [x.transpose(0, 2, 1, 3) for x in kv_bshd]
    valid = jnp.arange(S)[None, :] < (S * 3 // 4)
    valid = jnp.broadcast_to(valid, (B, S))
    out, results = {}, {}
    for layout, (k, v) in (("BSHD", kv_bshd), ("BHSD", kv_bhsd)):
        fn = jax.jit(lambda q, k, v, m, layout=layout: attention(q, k, v, m, layout))
        out[layout] = fn(q, k, v, valid).block_until_ready()
        t0 = time.perf_counter()
        for _ in range(a.iters):
            fn(q, k, v, valid).block_until_ready()
        results[layout] = (time.perf_counter() - t0) / a.iters * 1e3
    assert jnp.allclose(out["BSHD"], out["BHSD"], atol=1e-3)
    device = jax.devices()[0].device_kind
    print(f"{device}: B={B} S={S} H={H} D={D} {a.dtype}: (B,S,H,D) {results['BSHD']:.2f} ms, "
          f"(B,H,S,D) {results['BHSD']:.2f} ms per layer per decode step ({results['BSHD'] / results['BHSD']:.1f}x)")
    print(json.dumps({"device": device, "batch": B, "cache": S, "heads": H, "head_dim": D, "dtype": a.dtype,
                      "bshd_ms": round(results["BSHD"], 3), "bhsd_ms": round(results["BHSD"], 3),
                      "ratio": round(results["BSHD"] / results["BHSD"], 2)}))


if __name__ == "__main__":
    main()
