"""Web chat + OpenAI-compatible API for a trained checkpoint.

    python serve.py --config=configs/tiny.py [--stage=sft] [--step=N] [--host 127.0.0.1] [--port 8000]
                    [-t 0.8] [-k 50] [-m 512] [--max-batch 32] [--queue-size 256] [--api-key KEY ...]
                    [--rate-limit-requests N] [--rate-limit-tokens N] [--request-log PATH] [--log-prompts]
                    [--drain-timeout 30] [--config.field=value ...]

Open http://127.0.0.1:8000/ for the chat page; point any OpenAI client at http://127.0.0.1:8000/v1 (chat completions,
and text completions for a base checkpoint). The server listens at once but answers generation requests (and /health)
only after every program is compiled; the console says when. Prometheus scrapes /metrics; every API request is one JSON
line in the request log (stdout by default); SIGTERM drains: nothing new is admitted, the requests in flight get
--drain-timeout seconds to finish and the rest end cleanly, then the process exits 0.
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import sys
import threading

from jaxchat.config import parse_command


def parse_cli(argv: list[str]):
    ap = argparse.ArgumentParser(prog="python serve.py", description="Serve a jaxchat model: web chat + OpenAI API.")
    ap.add_argument("--stage", default="sft", help="checkpoint stage: base, mid, sft, rl (default sft)")
    ap.add_argument("-s", "--step", type=int, default=None, help="checkpoint step (default: the newest)")
    ap.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0 exposes it to the network)")
    ap.add_argument("-p", "--port", type=int, default=8000)
    ap.add_argument("-t", "--temperature", type=float, default=0.8, help="default when a request leaves it out")
    ap.add_argument("-k", "--top-k", type=int, default=50, help="default when a request leaves it out (0 = off)")
    ap.add_argument("-m", "--max-tokens", type=int, default=512, help="default reply length limit per request")
    ap.add_argument("--max-batch", type=int, default=32,
                    help="rows decoded together (rounded up to a power of two); sizes the KV cache")
    ap.add_argument("--queue-size", type=int, default=256, help="requests that may wait for a row before 429s")
    ap.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    ap.add_argument("--api-key", action="append", default=[], metavar="KEY",
                    help="require `Authorization: Bearer KEY` on the API (repeatable; also JAXCHAT_API_KEY, "
                         "comma-separated); the chat page asks for it")
    ap.add_argument("--rate-limit-requests", type=float, default=None, metavar="N",
                    help="requests per minute per API key (per client address without keys); 429 beyond")
    ap.add_argument("--rate-limit-tokens", type=float, default=None, metavar="N",
                    help="prompt + completion tokens per minute per API key (per client address without keys)")
    ap.add_argument("--request-log", default="-", metavar="PATH",
                    help="one JSON line per API request: a file to append to, - for stdout (default), none for off")
    ap.add_argument("--log-prompts", action="store_true",
                    help="also write the prompts and completions' text to the request log (off: only counts)")
    ap.add_argument("--drain-timeout", type=float, default=30.0, metavar="S",
                    help="on SIGTERM, seconds the requests in flight get to finish before they are ended (default 30)")
    config, args = parse_command(argv, ap)
    args.api_key += [k.strip() for k in os.environ.get("JAXCHAT_API_KEY", "").split(",") if k.strip()]
    if not 0 <= args.temperature <= 2 or not 0 <= args.top_k <= 200 or not 1 <= args.max_tokens <= 4096:
        ap.error("defaults must respect the API's limits: temperature 0-2, top-k 0-200, max tokens 1-4096")
    for name in ("rate_limit_requests", "rate_limit_tokens"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if args.drain_timeout < 0:
        ap.error("--drain-timeout must be >= 0")
    return config, args


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> int:
    from jaxchat.chat import load_for_cli

    loaded = load_for_cli(parse_cli, sys.argv[1:] if argv is None else argv)
    if loaded is None:
        return 2
    config, args, cfg, params, step, tokenizer = loaded

    import uvicorn

    from jaxchat.engine import Engine
    from jaxchat.web.app import GenerationDefaults, create_app
    from jaxchat.web.batcher import Batcher
    from jaxchat.web.ratelimit import RateLimiter
    from jaxchat.web.requestlog import RequestLog
    from jaxchat.web.server import DrainingServer

    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    model_id = f"jaxchat-{config.run}-{args.stage}-{step}"
    batcher = Batcher(Engine(cfg, params, tokenizer), max_rows=args.max_batch, queue_size=args.queue_size).start()
    defaults = GenerationDefaults(temperature=args.temperature, top_k=args.top_k, max_tokens=args.max_tokens)
    request_log = None if args.request_log == "none" else RequestLog(args.request_log, log_prompts=args.log_prompts)
    app = create_app(batcher, model_id=model_id, defaults=defaults, api_keys=args.api_key, request_log=request_log,
                     limiter=RateLimiter(args.rate_limit_requests, args.rate_limit_tokens))
    if not args.api_key and not is_loopback(args.host):
        print(f"warning: listening on {args.host} without an API key: anyone who can reach the port can use the "
              "model; pass --api-key (or set JAXCHAT_API_KEY)", file=sys.stderr)
    url = f"http://{'[' + args.host + ']' if ':' in args.host else args.host}:{args.port}"

    def announce():
        try:
            batcher.wait_ready()
        except Exception as e:  # noqa: BLE001 -- reported; /health says "failed"
            print(f"error: {e}", file=sys.stderr)
            return
        print(f"ready: {model_id} at {url}/ (API {url}/v1, warm-up {batcher.warmup_s:.1f} s)", file=sys.stderr)

    print(f"warming up (compiling {batcher.max_rows}-row decode and every prompt bucket)...", file=sys.stderr)
    threading.Thread(target=announce, daemon=True).start()
    # uvicorn's access log would repeat the request log, without the tokens
    server = DrainingServer(uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                                           access_log=request_log is None, timeout_graceful_shutdown=10),
                            batcher, args.drain_timeout)
    try:
        server.run()
    finally:
        batcher.stop()
        if request_log is not None:
            request_log.close()
    if server.drained is not None:
        print(f"drained: {server.drained['finished']} requests finished, {server.drained['cut']} ended at the "
              f"timeout; bye", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
