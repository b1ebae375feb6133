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
import hmac
import json
import re
import socket
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from jaxchat.tokenizer import render_for_completion
from jaxchat.web import schema
from jaxchat.web.batcher import Delta, Failed, Finished, NotReady, PromptTooLong, QueueFull, SamplingParams

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


# ---- the app ---------------------------------------------------------------------------------------------------------


def create_app(backend, *, model_id: str = "jaxchat", defaults: GenerationDefaults = GenerationDefaults(),
               api_keys=()) -> FastAPI:
    app = FastAPI(title="jaxchat", version="1", description="Chat with a jaxchat model; OpenAI-compatible API.")
    ui_html = UI_PATH.read_text(encoding="utf-8")
    created = int(time.time())
    counters = {"invalid_requests": 0}

    # -- errors: every one an OpenAI-style JSON body

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, e: ApiError):
        if e.status == 400:
            counters["invalid_requests"] += 1
        return error_response(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, e: RequestValidationError):
        counters["invalid_requests"] += 1
        message, param = describe_validation_errors(e.errors())
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
        body = {"status": "ok" if ready else ("failed" if backend.status == "failed" else "warming_up"), "ready": ready}
        return JSONResponse(body, status_code=200 if ready else 503)

    @app.get("/v1/models", response_model=schema.ModelList)
    async def models():
        return {"object": "list", "data": [{"id": model_id, "object": "model", "created": created,
                                            "owned_by": "jaxchat"}]}

    @app.get("/metrics", response_model=dict[str, Any])
    async def metrics():
        return {**backend.metrics(), **counters}

    # -- chat

    @app.post("/v1/chat/completions", responses={
        200: {"model": schema.ChatCompletion, "description": "a chat.completion, or with stream=true a "
              "text/event-stream of chat.completion.chunk objects ending with `data: [DONE]`",
              "content": {"text/event-stream": {"schema": {"type": "string"}}}},
        400: _error_doc("invalid request"), 413: _error_doc("request body too large"),
        429: _error_doc("the queue is full"), 503: _error_doc("the model is warming up or stopping")})
    async def chat_completions(body: schema.ChatCompletionRequest):
        prompt = render_prompt(backend.tokenizer, body.messages)
        max_tokens = body.max_completion_tokens or body.max_tokens or defaults.max_tokens
        sampling = SamplingParams(
            max_tokens=max_tokens,
            temperature=defaults.temperature if body.temperature is None else body.temperature,
            top_k=defaults.top_k if body.top_k is None else body.top_k,
            top_p=defaults.top_p if body.top_p is None else body.top_p,
            seed=int.from_bytes(uuid.uuid4().bytes[:4], "little") if body.seed is None else body.seed)
        events: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        ticket = _submit(backend, prompt, sampling, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id}
        if body.stream:
            usage = body.stream_options is not None and body.stream_options.include_usage
            return StreamingResponse(_sse(events, ticket, meta, usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(events, ticket, meta)

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
    if api_keys:
        app.add_middleware(RequireKey, keys=tuple(api_keys))
    return app


API_PREFIXES = ("/v1/", "/metrics")  # what a key guards; the page and /health stay open


def authorized(header: str | None, keys) -> bool:
    """Whether an Authorization header carries one of `keys`; every key is compared, in constant time."""
    scheme, _, given = (header or "").partition(" ")
    given = given.strip().encode()
    matches = [hmac.compare_digest(given, key.encode()) for key in keys]  # no early exit: the time says nothing
    return scheme.lower() == "bearer" and any(matches)


class RequireKey:
    """ASGI middleware: API routes answer 401 (OpenAI's error body) without a valid `Authorization: Bearer` key."""

    def __init__(self, app, keys: tuple[str, ...]):
        self.app, self.keys = app, keys

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"].startswith(API_PREFIXES):
            header = dict(scope.get("headers") or []).get(b"authorization", b"").decode("latin-1")
            if not authorized(header, self.keys):
                message = ("You didn't provide an API key: send it as `Authorization: Bearer <key>`" if not header
                           else "Incorrect API key provided")
                response = error_response(401, message, code="invalid_api_key",
                                          headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _submit(backend, prompt, sampling, sink):
    try:
        return backend.submit(prompt, sampling, sink)
    except QueueFull as e:
        raise ApiError(429, str(e), "rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
    except NotReady as e:
        raise ApiError(503, str(e), "server_error", code="not_ready", headers={"Retry-After": "5"}) from None
    except PromptTooLong as e:
        raise ApiError(400, str(e), param="messages", code="context_length_exceeded") from None
    except ValueError as e:
        raise ApiError(400, str(e)) from None


def _chunk(meta: dict, delta: dict, finish_reason: str | None = None) -> dict:
    return {**meta, "object": "chat.completion.chunk",
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}]}


def _data(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _usage(done: Finished) -> dict:
    return {"prompt_tokens": done.prompt_tokens, "completion_tokens": done.completion_tokens,
            "total_tokens": done.prompt_tokens + done.completion_tokens}


async def _drain(events: asyncio.Queue) -> list:
    """The next event and any already queued behind it: a slow reader gets fewer, larger chunks, never lost text."""
    batch = [await events.get()]
    while not events.empty():
        batch.append(events.get_nowait())
    return batch


async def _sse(events: asyncio.Queue, ticket, meta: dict, include_usage: bool):
    try:
        yield _data(_chunk(meta, {"role": "assistant", "content": ""}))
        while True:
            batch = await _drain(events)
            text = "".join(ev.text for ev in batch if isinstance(ev, Delta))
            if text:
                yield _data(_chunk(meta, {"content": text}))
            end = next((ev for ev in batch if not isinstance(ev, Delta)), None)
            if isinstance(end, Finished):
                yield _data(_chunk(meta, {}, end.reason))
                if include_usage:
                    yield _data({**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(end)})
                yield "data: [DONE]\n\n"
                return
            if isinstance(end, Failed):
                yield _data({"error": {"message": end.message, "type": "server_error", "param": None, "code": None}})
                yield "data: [DONE]\n\n"
                return
    finally:
        ticket.cancel()  # the client went away (or we are done, where this is a no-op)


async def _complete(events: asyncio.Queue, ticket, meta: dict) -> JSONResponse:
    parts = []
    try:
        while True:
            ev = await events.get()
            if isinstance(ev, Delta):
                parts.append(ev.text)
            elif isinstance(ev, Finished):
                message = {"role": "assistant", "content": "".join(parts)}
                return JSONResponse({**meta, "object": "chat.completion", "usage": _usage(ev), "choices": [
                    {"index": 0, "message": message, "finish_reason": ev.reason}]})
            else:
                return error_response(500, ev.message, "server_error")
    finally:
        ticket.cancel()


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


# ---- running it ------------------------------------------------------------------------------------------------------


class ServerThread:
    """uvicorn serving `app` on host:port (0 = a free port) in a daemon thread; for tests and benchmarks."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        import uvicorn

        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = host, self.socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2, backlog=2048)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True,
                                       name="jaxchat-uvicorn")

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()
