"""Load test of the web server: N streaming requests all at once against the same N one after another, over loopback,
with a share of the concurrent clients hanging up mid-stream.

    python bench/serve.py [--config=configs/tiny.py] [--requests=256] [--hangup=0.333] [--max-tokens=128]
                          [--max-batch=64] [--stage=sft]  # serve that checkpoint if it exists; else random weights

The server runs in this process (uvicorn in a thread, the batcher's decode loop in another) and the clients are raw
httpx streams reading Server-Sent Events, so the figures include HTTP, JSON and the asyncio hop, on the same cores.
Random weights are restricted to printable-text tokens, so every request runs to exactly --max-tokens; all requests are
greedy, so each concurrent reply must equal its sequential one token for token (numerics differ between batch sizes
only at the last bit, which can flip a near-tie argmax: the count of identical replies is reported, not assumed).

In the concurrent run every third client (--hangup) closes its connection after a random number of chunks, as a
browser tab does; the server must answer every request 200 without an error event, free their rows, and have no row
active or waiting once the clients are gone.

Reported: aggregate tokens/s (completion tokens received by all clients / wall time from first send to last byte), time
to first token (first content chunk at the client) p50/p95 (every request, those that hang up too), every complete
request's completion_tokens against --max-tokens, server errors, rows left active, and the server's own metrics. Last
line: one JSON object.
"""
import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import httpx  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxchat import config as C  # noqa: E402
from jaxchat import model  # noqa: E402
from jaxchat.engine import Engine  # noqa: E402
from jaxchat.tokenizer import load_for_config  # noqa: E402
from jaxchat.web.app import create_app  # noqa: E402
from jaxchat.web.server import ServerThread  # noqa: E402
from jaxchat.web.batcher import Batcher  # noqa: E402

from random_model import corpus_tokenizer, printable_params  # noqa: E402

WORDS = ("cat dog river mountain apple seven blue quickly under planet music window garden yellow bread teacher "
         "ocean winter number letter").split()


def load_or_build(config, stage: str | None):
    """(cfg, params, tokenizer, what): the stage's checkpoint if asked for and present, else random printable weights
    with the run's tokenizer (or one trained on the generated tiny corpus at the config's vocabulary)."""
    if stage:
        from jaxchat.checkpoint import load_model

        try:
            cfg, params, step, tok = load_model(config, stage)
            return cfg, params, tok, f"checkpoint {config.run}/{stage} step {step}"
        except FileNotFoundError as e:
            print(f"{e}; using random weights", file=sys.stderr)
    cfg = C.model_config(config)
    try:
        tok = load_for_config(config)
    except FileNotFoundError:
        tok = corpus_tokenizer(cfg.vocab_size)
    params = printable_params(cfg, tok, seed=config.seed)
    return cfg, params, tok, "random weights (printable tokens only)"


async def stream_one(client: httpx.AsyncClient, messages, max_tokens: int, hangup_after: int | None = None) -> dict:
    """One streamed request; with `hangup_after`, the client closes the connection after that many content chunks."""
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, text, usage, finish, error, chunks = None, [], None, None, None, 0
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
        async for line in r.aiter_lines() if error is None else _nothing():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                error = chunk["error"]["message"]
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    ttft = ttft if ttft is not None else time.perf_counter() - t0
                    text.append(choice["delta"]["content"])
                    chunks += 1
                finish = choice.get("finish_reason") or finish
            if hangup_after is not None and chunks >= hangup_after:
                break  # leaving the block closes the connection mid-stream
    return {"text": "".join(text), "ttft_s": ttft, "tokens": usage["completion_tokens"] if usage else chunks,
            "finish": finish, "latency_s": time.perf_counter() - t0, "hung_up": hangup_after is not None,
            "error": error}


async def _nothing():
    return
    yield


def summarise(results: list[dict], wall: float) -> dict:
    ttfts = sorted(r["ttft_s"] for r in results if r["ttft_s"] is not None)
    tokens = sum(r["tokens"] for r in results)
    return {"requests": len(results), "completion_tokens": tokens, "wall_s": round(wall, 3),
            "tokens_per_s": round(tokens / wall, 1),
            "ttft_p50_s": round(statistics.median(ttfts), 4),
            "ttft_p95_s": round(ttfts[int(0.95 * (len(ttfts) - 1))], 4),
            "latency_p50_s": round(statistics.median(r["latency_s"] for r in results), 4)}


async def run(url: str, conversations, max_tokens: int, hangups: list) -> tuple[dict, list, dict, list]:
    limits = httpx.Limits(max_connections=len(conversations) + 8, max_keepalive_connections=len(conversations) + 8)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        await stream_one(client, conversations[0], 4)  # open a connection, touch every code path once
        t0 = time.perf_counter()
        sequential = [await stream_one(client, m, max_tokens) for m in conversations]
        seq = summarise(sequential, time.perf_counter() - t0)
        t0 = time.perf_counter()
        concurrent = await asyncio.gather(*(stream_one(client, m, max_tokens, h)
                                            for m, h in zip(conversations, hangups)))
        conc = summarise(concurrent, time.perf_counter() - t0)
    return seq, sequential, conc, concurrent


def wait_idle(url: str, timeout: float = 30.0) -> dict:
    """The server's metrics once no row is active and nothing waits (or at the timeout: then rows were left behind)."""
    deadline = time.monotonic() + timeout
    while True:
        m = httpx.get(url + "/metrics.json").json()
        if (m["active_rows"] == 0 and m["queue_depth"] == 0) or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def main(argv):
    ap = argparse.ArgumentParser(prog="python bench/serve.py", description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--hangup", type=float, default=1 / 3, help="share of concurrent clients that leave mid-stream")
    ap.add_argument("--max-tokens", type=int, default=128, help="per request")
    ap.add_argument("--max-batch", type=int, default=64, help="the batcher's rows")
    ap.add_argument("--stage", default=None, help="serve that checkpoint if it exists (default: random weights)")
    config, args = C.parse_command(argv, ap, default_config="configs/tiny.py")
    n, max_tokens, max_batch = args.requests, args.max_tokens, args.max_batch
    cfg, params, tok, what = load_or_build(config, args.stage)
    rng = np.random.default_rng(0)
    conversations = [[{"role": "user", "content": f"Question {i}: " + " ".join(rng.choice(WORDS, 3 + i % 12))}]
                     for i in range(n)]
    prompt_lens = [len(tok.render_for_completion({"messages": m})) for m in conversations]
    every = round(1 / args.hangup) if args.hangup > 0 else 0
    hangups = [int(rng.integers(1, max(2, max_tokens // 2))) if every and i % every == every - 1 else None
               for i in range(n)]
    if max(prompt_lens) + max_tokens > cfg.sequence_len and "random" in what:
        raise SystemExit(f"--max-tokens={max_tokens} does not fit the context {cfg.sequence_len} after prompts of up "
                         f"to {max(prompt_lens)} tokens")

    batcher = Batcher(Engine(cfg, params, tok), max_rows=max_batch, queue_size=4 * n).start()
    batcher.wait_ready()
    print(f"{what}; {model.num_params(params):,} parameters; warm-up {batcher.warmup_s:.1f} s", file=sys.stderr)
    with ServerThread(create_app(batcher, model_id="bench")) as srv:
        seq, sequential, conc, concurrent = asyncio.run(run(srv.url, conversations, max_tokens, hangups))
        metrics = wait_idle(srv.url)
        statuses = httpx.get(srv.url + "/metrics").text
    batcher.stop()

    complete = [(a, b) for a, b in zip(sequential, concurrent) if not b["hung_up"]]
    delivered = sum(b["tokens"] == max_tokens for _, b in complete)
    identical = sum(a["text"] == b["text"] for a, b in complete)
    errors = [r["error"] for r in sequential + concurrent if r["error"]]
    server_errors = sum(float(line.rsplit(" ", 1)[1]) for line in statuses.splitlines()
                        if line.startswith("jaxchat_requests_total{") and 'status="5' in line)
    left = metrics["active_rows"] + metrics["queue_depth"]
    for name, s in (("sequential", seq), ("concurrent", conc)):
        print(f"{name:>10}: {s['requests']} requests, {s['completion_tokens']:,} tokens in {s['wall_s']:.2f} s = "
              f"{s['tokens_per_s']:,.0f} tok/s; TTFT p50 {1e3 * s['ttft_p50_s']:.1f} ms, p95 "
              f"{1e3 * s['ttft_p95_s']:.1f} ms", file=sys.stderr)
    print(f"speed-up {conc['tokens_per_s'] / seq['tokens_per_s']:.2f}x; {delivered}/{len(complete)} complete "
          f"concurrent replies got all {max_tokens} tokens; {identical}/{len(complete)} identical to their sequential "
          f"run; {n - len(complete)} clients hung up; peak batch {metrics['peak_active_rows']}; errors "
          f"{len(errors)} (5xx {server_errors:.0f}); rows left active {left}; cancelled "
          f"{metrics['requests_cancelled']}", file=sys.stderr)
    device = jax.devices()[0]
    print(json.dumps({"bench": "serve", "device": device.device_kind, "platform": device.platform,
                      "config": config.run, "weights": what, "params": model.num_params(params),
                      "max_batch": batcher.max_rows, "context": cfg.sequence_len, "max_tokens": max_tokens,
                      "prompt_tokens_mean": round(float(np.mean(prompt_lens)), 1), "warmup_s": batcher.warmup_s,
                      "sequential": seq, "concurrent": conc,
                      "speedup": round(conc["tokens_per_s"] / seq["tokens_per_s"], 2),
                      "hung_up": n - len(complete), "errors": len(errors), "server_errors_5xx": server_errors,
                      "rows_left_active": left, "cancelled": metrics["requests_cancelled"],
                      "all_tokens_delivered": delivered == len(complete), "identical_to_sequential": identical,
                      "peak_active_rows": metrics["peak_active_rows"],
                      "server_tokens_per_busy_s": metrics["tokens_per_busy_s"]}))


if __name__ == "__main__":
    main(sys.argv[1:])
