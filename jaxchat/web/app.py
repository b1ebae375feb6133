"""The FastAPI app: the chat page, an OpenAI-compatible chat-completions API, models, health and metrics.

`create_app(backend, model_id=..., defaults=...)` takes an already-built generation backend (a started `Batcher`, or
anything with its `submit`/`ready`/`status`/`metrics`/`tokenizer`), so tests build the app in-process.

- `POST /v1/chat/completions`: OpenAI's request schema (schema.py); `stream: true` answers Server-Sent Events, one
  `chat.completion.chunk` per `data:` line with the new text in `choices[0].delta.content`, then a chunk holding
  `finish_reason`, an optional usage chunk (`stream_options.include_usage`), and `data: [DONE]`. Otherwise one
  `chat.completion` with `usage`. The UI uses exactly this endpoint.
- Every client error is a 4xx with OpenAI's error body `{"error": {"message", "type", "param", "code"}}`: 400 for
  anything wrong in the request (malformed JSON, types, limits, conversation shape, a prompt longer than the context),
  413 for a body over `MAX_BODY_BYTES`, 429 when the queue is full, 503 while warming up. FastAPI's usual 422 is
  replaced by 400 in the OpenAPI document too, so the spec says what the server does.
- The decode loop runs in the backend's thread; each request gets an asyncio queue that the loop feeds through
  `loop.call_soon_threadsafe`. A client that disconnects mid-stream cancels its row.
- With API keys (`api_keys`, serve.py's `--api-key` / `JAXCHAT_API_KEY`), every API route (`/v1/...`, `/metrics`)
  needs `Authorization: Bearer <key>`: 401 with OpenAI's error body otherwise, keys compared in constant time; the
  chat page and `/health` stay open (the page asks for a key when the API answers 401 and keeps it in the browser).
- No client input reaches anything executable: the only evaluator is the calculator, which runs on tokens the model
  sampled, never on prompt tokens, and is itself restricted to arithmetic (sandbox.py).
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import hmac
import json
import re
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxchat.tokenizer import render_for_completion
from jaxchat.web import schema
from jaxchat.web.batcher import (Delta, Draining, Failed, Finished, NotReady, PromptTooLong, QueueFull,
                                 SamplingParams, held_tail)
from jaxchat.web.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from jaxchat.web.metrics import ServerMetrics
from jaxchat.web.ratelimit import RateLimiter, retry_after
from jaxchat.web.requestlog import RequestLog

UI_PATH = Path(__file__).with_name("ui.html")
MAX_BODY_BYTES = 1 << 20  # the largest valid request (32,000 astral characters as \u escapes) is under 0.5 MiB
TOOL_MARKERS = re.compile(r"<\|python_start\|>(.*?)<\|python_end\|>|<\|output_start\|>(.*?)<\|output_end\|>", re.S)


@dataclasses.dataclass(frozen=True)
class GenerationDefaults:
    """What a request gets for the fields it leaves out (the reference server's defaults)."""

    temperature: float = 0.8
    top_k: int = 50
    top_p: float = 1.0
    max_tokens: int = 512


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = (
            status, message, type_, param, code, headers)


def error_response(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                   code: str | None = None, headers: dict | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def _error_doc(description: str) -> dict:
    return {"model": schema.ErrorResponse, "description": description}


def _is_union_tag(part) -> bool:
    # pydantic names the member of a union that failed by its type: "str", "list[TextPart]", ...
    return isinstance(part, str) and (part in ("str", "int", "float", "bool", "none") or "[" in part)


def describe_validation_errors(errors: list[dict]) -> tuple[str, str | None]:
    """pydantic's error list -> one sentence naming the field, and the field as OpenAI's `param`."""
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [x for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":  # loc holds a character offset, not a field
        detail = first.get("ctx", {}).get("error", "")
        return f"the request body is not valid JSON: {detail} (at character {loc[0] if loc else 0})", None
    if not loc and first.get("type") == "missing":
        return "the request body is missing: send a JSON object", None
    if not loc and first.get("type") in ("model_type", "model_attributes_type", "dict_type"):
        return f"the request body must be a JSON object, got {type(first.get('input')).__name__}", None
    cut = next((i for i, x in enumerate(loc) if _is_union_tag(x)), None)
    if cut is not None:  # a union (content: str | list of parts): say what each alternative objected to
        prefix = loc[:cut]
        alternatives = []
        for err in errors:
            eloc = [x for x in err.get("loc", ()) if x != "body"]
            if eloc[:cut] == prefix and len(eloc) > cut:
                where = ".".join(map(str, eloc[cut + 1:]))
                alternatives.append(f"as {eloc[cut]}: {where + ': ' if where else ''}{err['msg']}")
        param = ".".join(map(str, prefix)) or None
        return f"{param}: has the wrong type ({'; '.join(alternatives)})", param
    param = ".".join(map(str, loc)) or None
    if first.get("type") == "extra_forbidden":  # never ignored: a client must learn its field did nothing
        where = f" (in {'.'.join(map(str, loc[:-1]))})" if len(loc) > 1 else ""
        return f"`{loc[-1]}` is not a field this server knows{where}: remove it", param
    msg = first.get("msg", "invalid value").removeprefix("Value error, ")
    more = len(errors) - 1
    tail = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return f"{param + ': ' if param else ''}{msg}{tail}", param


# ---- the conversation -> prompt tokens -------------------------------------------------------------------------------


def assistant_parts(text: str) -> list[dict]:
    """Split streamed assistant text back into tokenizer parts: tool markers become python / python_output parts."""
    parts, pos = [], 0
    for m in TOOL_MARKERS.finditer(text):
        if m.start() > pos:
            parts.append({"type": "text", "text": text[pos:m.start()]})
        kind, body = ("python", m.group(1)) if m.group(1) is not None else ("python_output", m.group(2))
        parts.append({"type": kind, "text": body})
        pos = m.end()
    if pos < len(text):
        parts.append({"type": "text", "text": text[pos:]})
    return parts


def render_prompt(tokenizer, messages: list[schema.ChatMessage]) -> list[int]:
    if messages[-1].role != "user":
        raise ApiError(400, f"the last message must have role 'user' (got {messages[-1].role!r}): the server writes "
                            f"the assistant's reply", param="messages")
    conversation = [{"role": m.role, "content": assistant_parts(m.text) if m.role == "assistant" else m.text}
                    for m in messages]
    try:
        return render_for_completion(tokenizer, {"messages": conversation})
    except ValueError as e:  # alternation, a system message out of place: the tokenizer says exactly what
        raise ApiError(400, f"invalid conversation: {e}", param="messages") from None


# ---- presenting generated text ---------------------------------------------------------------------------------------

PLAIN_TOOLS = {"<|python_start|>": "<<", "<|python_end|>": "=", "<|output_start|>": "", "<|output_end|>": ">>"}


class PlainTools:
    """Streamed text with calculator markers rewritten as GSM8K's `<<expr=result>>` (`calculator_format: "text"`);
    a tail that could begin a marker waits for the next piece."""

    def __init__(self):
        self.held = ""

    def feed(self, text: str, final: bool = False) -> str:
        buf = self.held + text
        for marker, plain in PLAIN_TOOLS.items():
            buf = buf.replace(marker, plain)
        keep = 0 if final else held_tail(buf, PLAIN_TOOLS)
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep]


def token_text(tokenizer, token: int) -> tuple[str, list[int]]:
    raw = tokenizer.token_to_bytes(token)
    return raw.decode("utf-8", errors="replace"), list(raw)


def chat_logprobs(tokenizer, entries) -> list[dict]:
    """The batcher's TokenLogprobs as OpenAI's chat `logprobs.content` items."""
    out = []
    for e in entries:
        text, raw = token_text(tokenizer, e.token)
        top = [dict(zip(("token", "bytes"), token_text(tokenizer, t)), logprob=lp) for t, lp in e.top]
        out.append({"token": text, "logprob": e.logprob, "bytes": raw, "top_logprobs": top})
    return out


def completion_logprobs(tokenizer, entries, offset: int) -> dict:
    """The legacy completions `logprobs` object for some tokens, their text starting at `offset` in the choice."""
    tokens, offsets = [], []
    for e in entries:
        offsets.append(offset)
        tokens.append(token_text(tokenizer, e.token)[0])
        offset += len(tokens[-1])
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "text_offset": offsets,
            "top_logprobs": [{token_text(tokenizer, t)[0]: lp for t, lp in e.top} for e in entries]}


def api_finish_reason(reason: str) -> str:
    # A reply the shutdown cut short is one more reply that ran out of room: OpenAI's enum has nothing closer, and
    # clients validate it. The request log keeps "shutdown".
    return "length" if reason == "shutdown" else reason


# ---- one request's choices in flight ---------------------------------------------------------------------------------


class Choices:
    """A request's choices submitted as rows (n per prompt) and the events the batcher sends them, tagged by choice."""

    def __init__(self, backend, prompts: list[list[int]], samplings: list[SamplingParams], prompt_field: str):
        self.events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.tickets = []
        try:
            for i, (prompt, sampling) in enumerate(zip(prompts, samplings)):
                sink = functools.partial(_forward, loop, self.events, i)
                self.tickets.append(_submit(backend, prompt, sampling, sink, prompt_field))
        except BaseException:
            self.cancel()  # all or nothing: the choices already queued leave with the refusal
            raise
        self.prompt_tokens = sum(len(p) for p in {tuple(p): None for p in prompts})  # a prompt counts once
        self.open = set(range(len(self.tickets)))

    async def batches(self):
        """Lists of (choice, event) as they arrive, until every choice has finished or failed."""
        while self.open:
            batch = [await self.events.get()]
            while not self.events.empty():  # a slow reader gets fewer, larger chunks, never lost text
                batch.append(self.events.get_nowait())
            for i, ev in batch:
                if not isinstance(ev, Delta):
                    self.open.discard(i)
            yield batch

    def cancel(self) -> None:
        for ticket in self.tickets:
            ticket.cancel()


def _forward(loop, queue: asyncio.Queue, i: int, event) -> None:
    loop.call_soon_threadsafe(queue.put_nowait, (i, event))


class Tally:
    """What the request log and the metrics learn from a request's finished choices."""

    def __init__(self, record: dict, metrics: ServerMetrics, limiter: RateLimiter, n: int, prompt_tokens: int):
        self.record, self.metrics, self.limiter = record, metrics, limiter
        self.texts = [""] * n
        self.reasons: list[str | None] = [None] * n
        self.completion_tokens = 0
        record.update(n=n, prompt_tokens=prompt_tokens, completion_tokens=0, finish_reasons=self.reasons)
        metrics.prompt_tokens.inc(prompt_tokens)

    def add(self, i: int, text: str) -> None:
        self.texts[i] += text

    def finished(self, i: int, done: Finished) -> None:
        self.reasons[i] = done.reason
        self.completion_tokens += done.completion_tokens
        self.record["completion_tokens"] = self.completion_tokens
        ttft = self.record.get("ttft_s")
        self.record["ttft_s"] = round(done.ttft_s if ttft is None else min(ttft, done.ttft_s), 6)
        self.metrics.observe_choice(done.ttft_s, done.elapsed_s, done.completion_tokens)
        self.limiter.charge(self.record.get("key", ""), done.completion_tokens)

    def failed(self, i: int, message: str) -> None:
        self.reasons[i] = "error"
        self.record["error"] = message

    def close(self) -> None:
        self.reasons[:] = [r or "cancelled" for r in self.reasons]  # a client that left before the end
        self.record["completions"] = self.texts


# ---- the app ---------------------------------------------------------------------------------------------------------


def create_app(backend, *, model_id: str = "jaxchat", defaults: GenerationDefaults = GenerationDefaults(),
               api_keys=(), limiter: RateLimiter | None = None, request_log: RequestLog | None = None) -> FastAPI:
    app = FastAPI(title="jaxchat", version="1", description="Chat with a jaxchat model; OpenAI-compatible API.")
    ui_html = UI_PATH.read_text(encoding="utf-8")
    created = int(time.time())
    counters = {"invalid_requests": 0}
    metrics = ServerMetrics(backend)
    limiter = limiter or RateLimiter()
    tokenizer = backend.tokenizer

    # -- errors: every one an OpenAI-style JSON body

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        if e.status == 400:
            counters["invalid_requests"] += 1
        _record(request)["error"] = e.message
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        counters["invalid_requests"] += 1
        message, param = describe_validation_errors(e.errors())
        _record(request)["error"] = message
        return error_response(400, message, param=param)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, e: StarletteHTTPException):
        type_ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(e.status_code, str(e.detail), type_, headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, e: Exception):
        return error_response(500, f"internal error: {type(e).__name__}", "server_error")

    # -- pages and status

    @app.get("/", include_in_schema=False)
    async def index():
        return HTMLResponse(ui_html)

    @app.get("/health", response_model=schema.Health, responses={503: {"model": schema.Health}})
    async def health():
        ready = bool(backend.ready)
        if ready or backend.status == "failed":
            status = "ok" if ready else "failed"
        else:
            status = "draining" if getattr(backend, "draining", False) else "warming_up"
        return JSONResponse({"status": status, "ready": ready}, status_code=200 if ready else 503)

    @app.get("/v1/models", response_model=schema.ModelList)
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "jaxchat"}]}

    @app.get("/metrics", response_class=PlainTextResponse, responses={200: {
        "description": "Prometheus text exposition format", "content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def prometheus_metrics():
        return Response(metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/metrics.json", response_model=dict[str, Any])
    async def metrics_json():
        return {**backend.metrics(), **counters}

    # -- generation

    generation_errors = {400: _error_doc("invalid request"), 413: _error_doc("request body too large"),
                         429: _error_doc("the queue is full, or the key's rate limit is reached (see Retry-After)"),
                         503: _error_doc("the model is warming up or the server is shutting down")}

    def sampling_for(body, max_tokens: int, seed: int, sample: int, logprobs: int | None) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=defaults.temperature if body.temperature is None else body.temperature,
            top_k=defaults.top_k if body.top_k is None else body.top_k,
            top_p=defaults.top_p if body.top_p is None else body.top_p,
            seed=seed, sample=sample, stop=body.stops, logprobs=logprobs)

    def start(request: Request, body, prompts: list[list[int]], max_tokens: int, logprobs: int | None,
              log_prompt, prompt_field: str) -> tuple[Choices, Tally, dict]:
        record = _record(request)
        record.update(stream=body.stream, user=body.user, prompt=log_prompt)
        wait = limiter.admit(record.get("key", ""))
        if wait is not None:
            metrics.rate_limited.inc()
            raise ApiError(429, f"rate limit reached ({limiter.describe()}); retry in {retry_after(wait)} s",
                           "rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": retry_after(wait)})
        seed = int.from_bytes(uuid.uuid4().bytes[:4], "little") if body.seed is None else body.seed
        rows = [p for p in prompts for _ in range(body.n)]  # choice i: prompt i // n, sample i % n
        choices = Choices(backend, rows, [sampling_for(body, max_tokens, seed, i % body.n, logprobs)
                                          for i in range(len(rows))], prompt_field)
        limiter.charge(record.get("key", ""), choices.prompt_tokens)
        tally = Tally(record, metrics, limiter, len(rows), choices.prompt_tokens)
        return choices, tally, record

    @app.post("/v1/chat/completions", responses={
        200: {"model": schema.ChatCompletion, "description": "a chat.completion, or with stream=true a "
              "text/event-stream of chat.completion.chunk objects ending with `data: [DONE]`",
              "content": {"text/event-stream": {"schema": SSE_EVENT}}}, **generation_errors})
    async def chat_completions(request: Request, body: schema.ChatCompletionRequest):
        prompt = render_prompt(tokenizer, body.messages)
        max_tokens = body.max_completion_tokens or body.max_tokens or defaults.max_tokens
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        choices, tally, record = start(request, body, [prompt], max_tokens, logprobs,
                                       [m.model_dump(include={"role", "content"}) for m in body.messages], "messages")
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        record["id"] = meta["id"]
        plain = [PlainTools() if body.calculator_format == "text" else None for _ in choices.tickets]
        format_text = lambda i, text, final=False: plain[i].feed(text, final) if plain[i] else text  # noqa: E731
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            opening = [{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None} for i in range(len(choices.tickets))]
            events = _stream(choices, tally, meta, "chat.completion.chunk", usage,
                             _chat_chunks(tally, format_text, tokenizer), opening)
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        result = await _collect(choices, tally, tokenizer, format_text, completion=False)
        if isinstance(result, JSONResponse):
            return result
        return JSONResponse({**meta, "object": "chat.completion", "usage": _usage(choices, tally), "choices": [
            {"index": i, "message": {"role": "assistant", "content": text}, "logprobs": lps,
             "finish_reason": api_finish_reason(reason)} for i, (text, lps, reason) in enumerate(result)]})

    @app.post("/v1/completions", responses={
        200: {"model": schema.TextCompletion, "description": "a text_completion, or with stream=true a "
              "text/event-stream of text_completion objects ending with `data: [DONE]`",
              "content": {"text/event-stream": {"schema": SSE_EVENT}}}, **generation_errors})
    async def completions(request: Request, body: schema.CompletionRequest):
        prompts = [[tokenizer.bos_id, *tokenizer.encode(p)] for p in body.prompts]
        choices, tally, record = start(request, body, prompts, body.max_tokens or COMPLETION_MAX_TOKENS, body.logprobs,
                                       body.prompt, "prompt")
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        record["id"] = meta["id"]
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            events = _stream(choices, tally, meta, "text_completion", usage,
                             _completion_chunks(tally, tokenizer, len(choices.tickets)))
            return StreamingResponse(events, media_type="text/event-stream", headers=SSE_HEADERS)
        result = await _collect(choices, tally, tokenizer, lambda i, text, final=False: text, completion=True)
        if isinstance(result, JSONResponse):
            return result
        return JSONResponse({**meta, "object": "text_completion", "usage": _usage(choices, tally), "choices": [
            {"index": i, "text": text, "logprobs": lps, "finish_reason": api_finish_reason(reason)}
            for i, (text, lps, reason) in enumerate(result)]})

    def _openapi():
        if app.openapi_schema is None:
            spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for path in spec.get("paths", {}).values():
                for operation in path.values():
                    operation.get("responses", {}).pop("422", None)  # validation errors are 400s here
            for name in ("HTTPValidationError", "ValidationError"):
                spec.get("components", {}).get("schemas", {}).pop(name, None)
            if api_keys:  # the guarded routes say so
                spec.setdefault("components", {})["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
                for route, path in spec.get("paths", {}).items():
                    for operation in path.values() if route.startswith(API_PREFIXES) else ():
                        operation["security"] = [{"bearer": []}]
                        operation.setdefault("responses", {})["401"] = {
                            "description": "missing or wrong API key",
                            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}}
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = _openapi
    app.add_middleware(BodyLimit)
    app.add_middleware(RequireKey, keys=tuple(api_keys))
    app.add_middleware(Observe, metrics=metrics, request_log=request_log)  # outermost: it sees every answer
    return app


API_PREFIXES = ("/v1/", "/metrics")  # what a key guards; the page and /health stay open
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
SSE_EVENT = {"type": "object", "required": ["data"], "description": "one Server-Sent Event (OpenAPI 3.1: the schema "
             "of each event)", "properties": {"data": {"type": "string", "description": "a JSON chunk, or [DONE]"}}}
COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def _record(request: Request) -> dict:
    """This request's log record (Observe puts one in every scope; a bare dict where it did not run)."""
    return request.scope.setdefault("jaxchat.record", {})


def key_id(key: str) -> str:
    """How the log and the rate limits name a key: a digest, never the key itself."""
    return "key-" + hashlib.sha256(key.encode()).hexdigest()[:12]


def authorized(header: str | None, keys) -> str | None:
    """The key an Authorization header carries if it is one of `keys` (None otherwise); every key is compared, in
    constant time."""
    scheme, _, given = (header or "").partition(" ")
    given = given.strip().encode()
    matches = [hmac.compare_digest(given, key.encode()) for key in keys]  # no early exit: the time says nothing
    return keys[matches.index(True)] if scheme.lower() == "bearer" and any(matches) else None


class RequireKey:
    """ASGI middleware: API routes answer 401 (OpenAI's error body) without a valid `Authorization: Bearer` key. Names
    the caller for the rate limits and the log: the key's id, or the client's address on a server without keys."""

    def __init__(self, app, keys: tuple[str, ...]):
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(API_PREFIXES):
            record = scope.setdefault("jaxchat.record", {})
            if not self.keys:
                record["key"] = f"client-{(scope.get('client') or ('unknown',))[0]}"
                return await self.app(scope, receive, send)
            header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            key = authorized(header, self.keys)
            if key is None:
                message = ("You didn't provide an API key: send it as `Authorization: Bearer <key>`" if not header
                           else "Incorrect API key provided")
                record["error"] = message
                response = error_response(401, message, code="invalid_api_key",
                                          headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
            record["key"] = key_id(key)
        await self.app(scope, receive, send)


class Observe:
    """ASGI middleware: times every HTTP request to its last byte, counts it in the metrics and, for API routes, writes
    its request log line (the handlers fill in the record as they learn things)."""

    def __init__(self, app, metrics: ServerMetrics, request_log: RequestLog | None):
        self.app, self.metrics, self.request_log = app, metrics, request_log

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        record = scope.setdefault("jaxchat.record", {})
        record.update(id=None, method=scope.get("method"), route=scope["path"], status=None,
                      client=(scope.get("client") or (None,))[0])

        async def observed_send(message):
            if message["type"] == "http.response.start":
                record["status"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, observed_send)
        finally:
            seconds = time.perf_counter() - t0
            status = record["status"] or 500
            self.metrics.observe_request(scope["path"], status, seconds)
            if self.request_log is not None and scope["path"].startswith("/v1/"):
                record.update(status=status, duration_s=round(seconds, 6))
                self.request_log.write(record)


def _submit(backend, prompt, sampling, sink, prompt_field: str):
    try:
        return backend.submit(prompt, sampling, sink)
    except QueueFull as e:
        raise ApiError(429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
    except Draining as e:
        raise ApiError(503, str(e), "server_error", code="shutting_down", headers={"Retry-After": "10"}) from None
    except NotReady as e:
        raise ApiError(503, str(e), "server_error", code="not_ready", headers={"Retry-After": "5"}) from None
    except PromptTooLong as e:
        raise ApiError(400, str(e), param=prompt_field, code="context_length_exceeded") from None
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def _data(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(choices: Choices, tally: Tally) -> dict:
    return {"prompt_tokens": choices.prompt_tokens, "completion_tokens": tally.completion_tokens,
            "total_tokens": choices.prompt_tokens + tally.completion_tokens}


def _error_event(message: str) -> str:
    return _data({"error": {"message": message, "type": "server_error", "param": None, "code": None}})


async def _stream(choices: Choices, tally: Tally, meta: dict, obj: str, include_usage: bool, render, opening=()):
    """A request's Server-Sent Events: the `opening` choice objects, then `render(choice, event)` of each delta and
    finish (None: nothing to send), then the usage chunk if asked for, then `[DONE]`; a failure is an error event."""
    send = lambda choice: _data({**meta, "object": obj, "choices": [choice]})  # noqa: E731
    try:
        for choice in opening:
            yield send(choice)
        async for batch in choices.batches():
            for i, ev in _merge_deltas(batch):
                if isinstance(ev, Failed):
                    tally.failed(i, ev.message)
                    yield _error_event(ev.message)
                    yield "data: [DONE]\n\n"
                    return
                if isinstance(ev, Finished):
                    tally.finished(i, ev)
                choice = render(i, ev)
                if choice is not None:
                    yield send(choice)
        if include_usage:
            yield _data({**meta, "object": obj, "choices": [], "usage": _usage(choices, tally)})
        yield "data: [DONE]\n\n"
    finally:
        choices.cancel()  # the client went away (or we are done, where this is a no-op)
        tally.close()


def _chat_chunks(tally: Tally, format_text, tokenizer):
    """`render` for chat.completion.chunk: the text as `delta.content`, logprobs as `logprobs.content`."""

    def render(i: int, ev):
        if isinstance(ev, Delta):
            text = format_text(i, ev.text)
            lps = {"content": chat_logprobs(tokenizer, ev.logprobs)} if ev.logprobs else None
            reason, delta = None, {"content": text}
            if not (text or lps):
                return None
        else:
            text, lps = format_text(i, "", True), None
            reason, delta = api_finish_reason(ev.reason), {"content": text} if text else {}
        tally.add(i, text)
        return {"index": i, "delta": delta, "logprobs": lps, "finish_reason": reason}

    return render


def _completion_chunks(tally: Tally, tokenizer, n: int):
    """`render` for text_completion chunks: the text, legacy logprobs with offsets into the choice's text."""
    offsets = [0] * n

    def render(i: int, ev):
        if not isinstance(ev, Delta):
            return {"index": i, "text": "", "logprobs": None, "finish_reason": api_finish_reason(ev.reason)}
        tally.add(i, ev.text)
        lps = completion_logprobs(tokenizer, ev.logprobs, offsets[i]) if ev.logprobs else None
        offsets[i] += sum(len(t) for t in lps["tokens"]) if lps else 0
        return {"index": i, "text": ev.text, "logprobs": lps, "finish_reason": None} if ev.text or lps else None

    return render


def _merge_deltas(batch: list) -> list:
    """Consecutive deltas of one choice as one (fewer, larger chunks for a slow reader); order kept."""
    out = []
    for i, ev in batch:
        if out and isinstance(ev, Delta) and out[-1][0] == i and isinstance(out[-1][1], Delta):
            prev = out[-1][1]
            out[-1] = (i, Delta(prev.text + ev.text, prev.tokens + ev.tokens, prev.logprobs + ev.logprobs))
        else:
            out.append((i, ev))
    return out


async def _collect(choices: Choices, tally: Tally, tokenizer, format_text, completion: bool):
    """Every choice's (text, logprobs, finish reason), or the error response if one failed."""
    n = len(choices.tickets)
    texts, entries, reasons = [""] * n, [[] for _ in range(n)], [""] * n
    try:
        async for batch in choices.batches():
            for i, ev in batch:
                if isinstance(ev, Delta):
                    texts[i] += format_text(i, ev.text)
                    entries[i] += ev.logprobs
                elif isinstance(ev, Finished):
                    texts[i] += format_text(i, "", True)
                    reasons[i] = ev.reason
                    tally.finished(i, ev)
                else:
                    tally.failed(i, ev.message)
                    return error_response(500, ev.message, "server_error")
        for i, text in enumerate(texts):
            tally.add(i, text)
    finally:
        choices.cancel()
        tally.close()
    wanted = [t.sampling.logprobs is not None for t in choices.tickets]
    if completion:
        lps = [completion_logprobs(tokenizer, e, 0) if w else None for e, w in zip(entries, wanted)]
    else:
        lps = [{"content": chat_logprobs(tokenizer, e)} if w else None for e, w in zip(entries, wanted)]
    return list(zip(texts, lps, reasons))


class BodyLimit:
    """Answer 413 for a body over `max_bytes` before anything parses it (by Content-Length, or counted while read)."""

    def __init__(self, app, max_bytes: int = MAX_BODY_BYTES):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = error_response(413, f"the request body is over {self.max_bytes:,} bytes")
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            return await too_big(scope, receive, send)
        messages, size = [], 0
        while True:
            message = await receive()
            messages.append(message)
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                return await too_big(scope, receive, send)
            if message["type"] != "http.request" or not message.get("more_body"):
                break

        async def replay():
            return messages.pop(0) if messages else await receive()

        return await self.app(scope, replay, send)
