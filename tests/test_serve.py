"""The web server, through the official `openai` client against uvicorn on 127.0.0.1, on tiny models with a real trained
tokenizer: replies equal the engine's (greedy and seeded sampling), streaming equals non-streaming, concurrent requests
are decoded together and each still equals its own run, emoji and calculator calls stream intact and round-trip, every
bad request is a 4xx JSON error, the queue is bounded, nothing recompiles after warm-up, and `python serve.py` serves a
saved checkpoint. The other serve tests (browser, fuzzing) import their backends from here."""
from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
import subprocess
import sys
import threading
import time

import fixtures_model
import httpx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat import engine, model
from jaxchat.config import model_config
from test_engine import CLI_CONFIG
from jaxchat.tokenizer import Tokenizer, render_for_completion
from jaxchat.web.app import GenerationDefaults, create_app
from jaxchat.web.server import ServerThread
from jaxchat.web.batcher import Batcher, Delta, Finished, NotReady, QueueFull, SamplingParams

openai = pytest.importorskip("openai", reason="pip install -r requirements-dev.txt (the openai client)")

VOCAB = 300
CONTEXT = 128
CFG = model.GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, sequence_len=CONTEXT,
                      compute_dtype="float32")
MAX_ROWS = 16  # every backend shares this and CFG, so they share one set of compiled programs
TEXT = ["the cat sat on the mat and the dog sat on the log. " * 20, "hello there, how are you today? " * 20]
EMOJI = "é🙂世"  # 2-, 4- and 3-byte characters, every byte its own token
TOOL_REPLY = f"{EMOJI}<|python_start|>7*6<|python_end|><|output_start|>42<|output_end|>!"


@functools.cache
def tokenizer() -> Tokenizer:
    return Tokenizer.train(TEXT, vocab_size=VOCAB)


def _printable(tok) -> np.ndarray:
    """Tokens that are printable ASCII text: a random model restricted to them writes readable text and never emits a
    special token (their logits stay at 0 while the allowed ones spread around it)."""
    n_ordinary = VOCAB - 9
    return np.array([i < n_ordinary and all(32 <= c < 127 for c in tok.token_to_bytes(i)) for i in range(VOCAB)])


def random_params(seed=1, scale=0.3, cfg=CFG):
    _, params = fixtures_model.random_params(cfg, seed, scale)
    params["lm_head"]["kernel"] = jnp.where(jnp.asarray(_printable(tokenizer())), params["lm_head"]["kernel"], 0.0)
    return params


def chain(*segments) -> dict[int, int]:
    """A bigram script through the given token ids / texts / special names, each id at most once as a source."""
    tok = tokenizer()
    ids = []
    for s in segments:
        ids += [tok.special_id(s)] if s.startswith("<|") else tok.encode(s)
    script = dict(zip(ids[:-1], ids[1:]))
    assert len(script) == len(ids) - 1, f"the script repeats a token: {ids}"
    return script


def scripted_params(script: dict[int, int]):
    """Weights whose next token depends only on the current one (see test_engine.scripted_params)."""
    from test_engine import scripted_params as build

    return build(CFG, script)


def tool_script(looping: bool = False) -> dict[int, int]:
    """Reply é🙂世, a calculator call 7*6 (the engine forces <|output_start|>42<|output_end|>), then "!" and the end of
    the turn; `looping` instead goes on with " la la la ..." until the token limit (a long visible stream)."""
    tok = tokenizer()
    script = chain("<|assistant_start|>", EMOJI, "<|python_start|>", "7*6", "<|python_end|>")
    if looping:
        la = tok.encode(" la")
        script.update(chain("<|output_end|>", "!", " la"))
        script[la[-1]] = la[0]
    else:
        script.update(chain("<|output_end|>", "!", "<|assistant_end|>"))
    return script


@functools.cache
def backend(kind: str, max_rows: int = MAX_ROWS, queue_size: int = 64) -> Batcher:
    """A started, warmed-up batcher: "random" (never stops, readable ASCII), "tool" (the scripted calculator reply),
    "looping" (the calculator reply, then an endless " la")."""
    params = {"random": random_params, "tool": lambda: scripted_params(tool_script()),
              "looping": lambda: scripted_params(tool_script(looping=True))}[kind]()
    b = Batcher(engine.Engine(CFG, params, tokenizer()), max_rows=max_rows, queue_size=queue_size).start()
    b.wait_ready(timeout=600)
    return b


def start_server(kind: str, **defaults) -> ServerThread:
    app = create_app(backend(kind), model_id=f"jaxchat-test-{kind}", defaults=GenerationDefaults(**defaults))
    return ServerThread(app).__enter__()


def client(srv) -> openai.OpenAI:
    return openai.OpenAI(base_url=srv.url + "/v1", api_key="not-needed", max_retries=0, timeout=60)


def prompt_ids(messages) -> list[int]:
    return render_for_completion(tokenizer(), {"messages": messages})


def engine_reply(kind: str, messages, max_tokens: int, **kw) -> str:
    """The reference: Engine.generate on the same weights, decoded."""
    eng = backend(kind).engine
    p = prompt_ids(messages)
    rows, _ = eng.generate_batch(p, max_tokens=max_tokens, **kw)
    return tokenizer().decode(rows[0][len(p):])


@pytest.fixture(scope="module")
def random_server():
    srv = start_server("random", max_tokens=24)
    yield srv
    srv.__exit__(None, None, None)


@pytest.fixture(scope="module")
def tool_server():
    srv = start_server("tool")
    yield srv
    srv.__exit__(None, None, None)


HELLO = [{"role": "user", "content": "hello there"}]


# ---- decoding a prefix of the rows ----------------------------------------------------------------------------------


def test_decoding_a_prefix_of_the_rows_equals_decoding_them_alone_and_leaves_the_rest():
    graphdef, params = fixtures_model.random_params(CFG, 1, 0.3)
    rng = np.random.default_rng(0)
    k = [jnp.asarray(rng.normal(size=(4, CFG.n_kv_head, 64, CFG.head_dim)), jnp.float32) for _ in range(CFG.n_layer)]
    cache = model.KVCache(tuple(k), tuple(-x for x in k), jnp.asarray([5, 9, 3, 7], jnp.int32), jnp.zeros(4, jnp.int32))
    prefix = model.KVCache(tuple(x[:2] for x in k), tuple(-x[:2] for x in k), cache.lengths_B[:2],
                           jnp.zeros(2, jnp.int32))
    tokens = jnp.asarray([[11], [22]], jnp.int32)
    decode = jax.jit(model.forward_cached, static_argnums=0)
    want_logits, want = decode(graphdef, params, tokens, prefix)
    got_logits, got = decode(graphdef, params, tokens, cache)
    np.testing.assert_allclose(np.asarray(got_logits), np.asarray(want_logits), rtol=1e-5, atol=1e-5)
    for layer in range(CFG.n_layer):
        np.testing.assert_allclose(np.asarray(got.k[layer][:2]), np.asarray(want.k[layer]), rtol=1e-6)
        np.testing.assert_array_equal(np.asarray(got.k[layer][2:]), np.asarray(k[layer][2:]))
    np.testing.assert_array_equal(np.asarray(got.lengths_B), [6, 10, 3, 7])


@pytest.mark.parametrize("n_kv_head", [4, 2, 1], ids=["mha", "gqa", "mqa"])
def test_server_greedy_equals_greedy_by_full_forward(n_kv_head):
    """The batcher's path (one prompt prefilled into a slot of a shared cache, row buckets, attention buckets, rows
    joining at different times) decodes exactly what full forward passes over the growing sequences give."""
    from test_engine import greedy_by_full_forward

    cfg = model.GPTConfig(vocab_size=VOCAB, n_layer=2, n_head=4, n_kv_head=n_kv_head, n_embd=64, sequence_len=64,
                          compute_dtype="float32")
    graphdef, params = fixtures_model.random_params(cfg, n_kv_head, 0.3)
    params["lm_head"]["kernel"] = jnp.where(jnp.asarray(_printable(tokenizer())), params["lm_head"]["kernel"], 0.0)
    b = Batcher(engine.Engine(cfg, params, tokenizer()), max_rows=4, queue_size=8).start()
    try:
        b.wait_ready(timeout=600)
        prompts = [prompt_ids([{"role": "user", "content": text}]) for text in ("hi", "the cat sat on the mat", "how")]
        budgets = [30, 20, 40]
        texts, done = [[] for _ in prompts], [threading.Event() for _ in prompts]

        def sink(i):
            return lambda e: done[i].set() if isinstance(e, Finished) else texts[i].append(getattr(e, "text", ""))

        for i, (p, m) in enumerate(zip(prompts, budgets)):
            b.submit(p, SamplingParams(max_tokens=m, temperature=0.0), sink(i))
            time.sleep(0.05 * i)  # rows join a batch already decoding
        assert all(d.wait(120) for d in done)
    finally:
        b.stop()
    want = greedy_by_full_forward(graphdef, params, prompts, budgets)
    assert ["".join(t) for t in texts] == [tokenizer().decode(w[len(p):]) for w, p in zip(want, prompts)]


# ---- the OpenAI API through the official client ----------------------------------------------------------------------


def test_non_streaming_completion_equals_the_engines_greedy_reply(random_server):
    r = client(random_server).chat.completions.create(model="anything", messages=HELLO, temperature=0, max_tokens=20)
    assert r.object == "chat.completion" and r.model == "jaxchat-test-random" and r.id.startswith("chatcmpl-")
    choice = r.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert choice.message.content == engine_reply("random", HELLO, 20, temperature=0.0)
    assert r.usage.prompt_tokens == len(prompt_ids(HELLO)) and r.usage.completion_tokens == 20
    assert r.usage.total_tokens == r.usage.prompt_tokens + 20


def test_streaming_equals_non_streaming_and_reports_usage(random_server):
    c = client(random_server)
    full = c.chat.completions.create(messages=HELLO, model="m", temperature=0, max_tokens=30).choices[0].message.content
    chunks = list(c.chat.completions.create(messages=HELLO, model="m", temperature=0, max_tokens=30, stream=True,
                                            stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full and len(text) > 0
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 30
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) > 1  # it streamed, not one blob


def test_seeded_sampling_equals_the_engine_and_top_p_zero_is_greedy(random_server):
    c = client(random_server)
    kw = dict(model="m", messages=HELLO, max_tokens=24)
    sampled = c.chat.completions.create(temperature=1.0, seed=123, extra_body={"top_k": 20}, **kw)
    assert sampled.choices[0].message.content == engine_reply("random", HELLO, 24, temperature=1.0, top_k=20, seed=123)
    again = c.chat.completions.create(temperature=1.0, seed=123, extra_body={"top_k": 20}, **kw)
    assert again.choices[0].message.content == sampled.choices[0].message.content
    other = c.chat.completions.create(temperature=1.0, seed=124, extra_body={"top_k": 20}, **kw)
    assert other.choices[0].message.content != sampled.choices[0].message.content
    nucleus0 = c.chat.completions.create(temperature=1.0, top_p=0.0, seed=5, **kw).choices[0].message.content
    assert nucleus0 == engine_reply("random", HELLO, 24, temperature=0.0)


def test_concurrent_streams_are_decoded_together_and_each_equals_its_own_run(random_server):
    conversations = [[{"role": "user", "content": f"question {i}: " + "how are you " * (i % 5)}] for i in range(16)]
    peak_before = backend("random").metrics()["peak_active_rows"]
    steps_before = backend("random").metrics()["decode_steps"]

    async def one(c, messages):
        stream = await c.chat.completions.create(model="m", messages=messages, temperature=0, max_tokens=40,
                                                 stream=True)
        return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

    async def all_at_once():
        async with openai.AsyncOpenAI(base_url=random_server.url + "/v1", api_key="x", max_retries=0) as c:
            return await asyncio.gather(*(one(c, m) for m in conversations))

    texts = asyncio.run(all_at_once())
    m = backend("random").metrics()
    for messages, text in zip(conversations, texts):
        assert text == engine_reply("random", messages, 40, temperature=0.0)
    assert m["peak_active_rows"] >= max(peak_before, 4), "the requests were not decoded together"
    assert m["decode_steps"] - steps_before < 16 * 39 / 2, "fewer shared steps than sequential decoding would take"


def test_emoji_and_calculator_calls_stream_intact_and_round_trip(tool_server):
    c = client(tool_server)
    chunks = list(c.chat.completions.create(model="m", messages=HELLO, temperature=0.8, max_tokens=100, stream=True,
                                            stream_options={"include_usage": True}))
    pieces = [ch.choices[0].delta.content for ch in chunks if ch.choices and ch.choices[0].delta.content]
    assert all("\ufffd" not in p for p in pieces), f"a character was split: {pieces}"
    assert "".join(pieces) == TOOL_REPLY
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "stop"
    # The reply goes back as the client got it; the markers become the special tokens again (usage shows the ids).
    history = HELLO + [{"role": "assistant", "content": TOOL_REPLY}, {"role": "user", "content": "and 2+2?"}]
    r = c.chat.completions.create(model="m", messages=history, temperature=0, max_tokens=100)
    parts = [{"type": "text", "text": EMOJI}, {"type": "python", "text": "7*6"},
             {"type": "python_output", "text": "42"}, {"type": "text", "text": "!"}]
    want = prompt_ids(HELLO + [{"role": "assistant", "content": parts}, {"role": "user", "content": "and 2+2?"}])
    assert r.usage.prompt_tokens == len(want)
    assert r.choices[0].message.content == TOOL_REPLY and r.choices[0].finish_reason == "stop"
    # a system message is folded into the first user turn, as in training
    system = [{"role": "system", "content": "be brief"}]
    r = c.chat.completions.create(model="m", temperature=0, messages=system + HELLO)
    assert r.usage.prompt_tokens == len(prompt_ids([{"role": "user", "content": "be brief\n\nhello there"}]))


def test_models_health_metrics_and_the_page(random_server):
    models = client(random_server).models.list()
    assert [m.id for m in models.data] == ["jaxchat-test-random"]
    with httpx.Client(base_url=random_server.url) as h:
        assert h.get("/health").json() == {"status": "ok", "ready": True}
        m = h.get("/metrics.json").json()
        for key in ("requests_submitted", "tokens_generated", "tokens_per_s", "queue_depth", "active_rows", "ttft_s",
                    "invalid_requests", "peak_active_rows"):
            assert key in m, key
        assert m["requests_completed"] >= 1 and m["ttft_s"]["p50"] > 0
        page = h.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "/v1/chat/completions" in page.text and "<title>jaxchat</title>" in page.text
        spec = h.get("/openapi.json").json()
        assert "422" not in json.dumps(spec["paths"]) and "400" in spec["paths"]["/v1/chat/completions"]["post"][
            "responses"]


# ---- validation: every mistake is a 4xx JSON error saying what was wrong --------------------------------------------

U = {"role": "user", "content": "hi"}
A = {"role": "assistant", "content": "hello"}


def body(**kw):
    return json.dumps({"messages": [U], **kw})


BAD_REQUESTS = {
    "malformed json": ("{not json", 400, "not valid JSON"),
    "truncated json": ('{"messages": [', 400, "not valid JSON"),
    "a list, not an object": ("[]", 400, "must be a JSON object"),
    "no body": ("", 400, ""),
    "messages missing": ("{}", 400, "messages"),
    "no messages": (json.dumps({"messages": []}), 400, "at least 1"),
    "unknown role": (json.dumps({"messages": [{"role": "tool", "content": "x"}]}), 400, "role"),
    "content not text": (json.dumps({"messages": [{"role": "user", "content": 5}]}), 400, "content"),
    "image part": (json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "text": "x"}]}]}),
                   400, "content"),
    "empty content": (json.dumps({"messages": [{"role": "user", "content": ""}]}), 400, "empty"),
    "lone surrogate": ('{"messages": [{"role": "user", "content": "a\\ud800"}]}', 400, "surrogate"),
    "message too long": (json.dumps({"messages": [{"role": "user", "content": "a" * 8001}]}), 400, "8,000"),
    "conversation too long": (json.dumps({"messages": [U, {"role": "assistant", "content": "b" * 8000}] * 2
                                          + [{"role": "user", "content": "c" * 8000}, A,
                                             {"role": "user", "content": "d" * 8000}]}), 400, "32,000"),
    "too many messages": (json.dumps({"messages": [U, A] * 250 + [U]}), 400, "500"),
    "temperature too high": (body(temperature=2.01), 400, "temperature"),
    "temperature negative": (body(temperature=-0.1), 400, "temperature"),
    "temperature as a string": (body(temperature="0.5"), 400, "temperature"),
    "temperature NaN": ('{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', 400, "temperature"),
    "top_k too high": (body(top_k=201), 400, "top_k"),
    "top_k negative": (body(top_k=-1), 400, "top_k"),
    "top_k fractional": (body(top_k=2.5), 400, "top_k"),
    "top_p above 1": (body(top_p=1.5), 400, "top_p"),
    "max_tokens zero": (body(max_tokens=0), 400, "max_tokens"),
    "max_tokens too high": (body(max_tokens=4097), 400, "max_tokens"),
    "stream not a bool": (body(stream="yes"), 400, "stream"),
    "n above the limit": (body(n=9), 400, "n"),
    "n zero": (body(n=0), 400, "n"),
    "five stop strings": (body(stop=["a", "b", "c", "d", "e"]), 400, "at most 4 stop strings"),
    "an empty stop string": (body(stop=[""]), 400, "1 to 256 characters"),
    "stop not text": (body(stop=5), 400, "stop"),
    "top_logprobs without logprobs": (body(top_logprobs=2), 400, "needs logprobs"),
    "top_logprobs above 20": (body(logprobs=True, top_logprobs=21), 400, "top_logprobs"),
    "tools": (body(tools=[{"type": "function", "function": {"name": "f"}}]), 400, "`tools` is not supported"),
    "tool_choice": (body(tool_choice="auto"), 400, "`tool_choice` is not supported"),
    "response_format json": (body(response_format={"type": "json_object"}), 400, "`response_format` is not supported"),
    "presence_penalty": (body(presence_penalty=0.5), 400, "`presence_penalty` is not supported"),
    "frequency_penalty": (body(frequency_penalty=-1), 400, "`frequency_penalty` is not supported"),
    "logit_bias": (body(logit_bias={"50256": -100}), 400, "`logit_bias` is not supported"),
    "an unknown field": (body(temprature=0.5), 400, "`temprature` is not a field"),
    "an unknown message field": (json.dumps({"messages": [{**U, "tool_call_id": "x"}]}), 400, "tool_call_id"),
    "calculator_format unknown": (body(calculator_format="html"), 400, "calculator_format"),
    "ends with the assistant": (json.dumps({"messages": [U, A]}), 400, "last message"),
    "roles do not alternate": (json.dumps({"messages": [U, U]}), 400, "alternate"),
    "system not first": (json.dumps({"messages": [U, A, {"role": "system", "content": "s"}, U]}), 400, "system"),
    "longer than the context": (json.dumps({"messages": [{"role": "user", "content": "zq xj " * 200}]}), 400,
                                "context"),
    "nested 100k deep": ("[" * 100_000 + "]" * 100_000, 400, ""),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_every_bad_request_is_a_400_with_an_openai_error_body(random_server, name):
    text, status, needle = BAD_REQUESTS[name]
    with httpx.Client(base_url=random_server.url, timeout=30) as h:
        r = h.post("/v1/chat/completions", content=text, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert needle.lower() in error["message"].lower(), error


def test_other_client_errors_are_json_too(random_server):
    with httpx.Client(base_url=random_server.url, timeout=30) as h:
        big = h.post("/v1/chat/completions", content=b"x" * (2 << 20), headers={"content-type": "application/json"})
        assert big.status_code == 413 and "bytes" in big.json()["error"]["message"]
        assert h.get("/nope").status_code == 404 and h.get("/nope").json()["error"]["type"] == "not_found_error"
        assert h.get("/v1/chat/completions").status_code == 405
        form = h.post("/v1/chat/completions", content="messages=hi",
                      headers={"content-type": "application/x-www-form-urlencoded"})
        assert 400 <= form.status_code < 500 and "error" in form.json()
        # the server is still fine
        assert h.get("/health").json()["ready"] is True


def test_the_ui_context_limit_is_a_clear_400_with_the_openai_client(random_server):
    with pytest.raises(openai.BadRequestError) as e:
        client(random_server).chat.completions.create(
            model="m", messages=[{"role": "user", "content": "zq xj " * 200}])
    assert e.value.code == "context_length_exceeded" and "context is 128 tokens" in str(e.value)


# ---- capacity, readiness, cancellation, compilation ------------------------------------------------------------------


def test_queue_is_bounded():
    b = Batcher(backend("random").engine, max_rows=MAX_ROWS, queue_size=2).start()
    b.wait_ready(timeout=600)
    try:
        p = prompt_ids(HELLO)
        tickets = [b.submit(p, SamplingParams(max_tokens=100), lambda ev: None) for _ in range(MAX_ROWS + 2)]
        with pytest.raises(QueueFull, match="at capacity"):
            b.submit(p, SamplingParams(max_tokens=100), lambda ev: None)
        assert b.metrics()["requests_rejected_queue_full"] == 1
        for t in tickets:
            t.cancel()
        deadline = time.monotonic() + 30
        while b.metrics()["active_rows"] or b.metrics()["queue_depth"]:
            assert time.monotonic() < deadline, b.metrics()
            time.sleep(0.02)
        assert b.metrics()["requests_cancelled"] == MAX_ROWS + 2
    finally:
        b.stop()
    with pytest.raises(NotReady, match="shutting down"):
        b.submit(p, SamplingParams(max_tokens=1), lambda ev: None)


class _StubBackend:
    """Refuses every request the way a full or warming-up batcher does."""

    def __init__(self, error):
        self.error, self.ready, self.status, self.tokenizer = error, False, "warming_up", tokenizer()

    def submit(self, *a):
        raise self.error

    def metrics(self):
        return {}


def test_full_queue_is_429_and_warming_up_is_503():
    from fastapi.testclient import TestClient

    full = TestClient(create_app(_StubBackend(QueueFull("the server is at capacity"))))
    r = full.post("/v1/chat/completions", json={"messages": [U]})
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "queue_full" and "capacity" in r.json()["error"]["message"]
    warming = TestClient(create_app(_StubBackend(NotReady("the model is still warming up"))))
    r = warming.post("/v1/chat/completions", json={"messages": [U], "stream": True})
    assert r.status_code == 503 and "warming up" in r.json()["error"]["message"]
    assert warming.get("/health").status_code == 503 and warming.get("/health").json()["ready"] is False


def test_a_client_that_disconnects_frees_its_row(random_server):
    b = backend("random")
    cancelled = b.metrics()["requests_cancelled"]
    with httpx.Client(base_url=random_server.url, timeout=30) as h:
        with h.stream("POST", "/v1/chat/completions",
                      json={"messages": [U], "stream": True, "max_tokens": 100, "temperature": 0}) as r:
            next(r.iter_lines())
    deadline = time.monotonic() + 30
    while b.metrics()["requests_cancelled"] == cancelled or b.metrics()["active_rows"]:
        assert time.monotonic() < deadline, b.metrics()
        time.sleep(0.02)


def test_nothing_recompiles_after_warm_up(random_server):
    before = dict(engine.TRACES)
    c = client(random_server)
    rng = np.random.default_rng(0)
    for i in range(12):  # prompts across every prompt bucket, varied sampling, several at once
        words = " ".join(rng.choice(["cat", "dog", "sat", "mat", "log", "hello", "how"], int(rng.integers(1, 60))))
        threads = [threading.Thread(target=c.chat.completions.create, kwargs=dict(
            model="m", messages=[{"role": "user", "content": words[:200 - 16 * j]}], max_tokens=int(rng.integers(1, 9)),
            temperature=float(rng.choice([0.0, 0.7, 1.5])), top_p=float(rng.choice([0.5, 1.0])), seed=i,
            extra_body={"top_k": int(rng.choice([0, 1, 50, 200]))})) for j in range(int(rng.integers(1, 4)))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert dict(engine.TRACES) == before


def test_batcher_direct_use_streams_events_in_order():
    events = []
    done = threading.Event()

    def sink(ev):
        events.append(ev)
        if not isinstance(ev, Delta):
            done.set()

    backend("tool").submit(prompt_ids(HELLO), SamplingParams(max_tokens=6, temperature=0.0), sink)
    assert done.wait(30)
    assert [type(e) for e in events] == [Delta] * 6 + [Finished]
    assert events[-1].reason == "length" and events[-1].completion_tokens == 6
    assert [e.text for e in events[:-1]] == ["", "é", "", "", "", "🙂"]  # one token per byte; whole characters only


# ---- the CLI ---------------------------------------------------------------------------------------------------------


def test_serve_cli_without_a_checkpoint_names_the_training_command(tmp_path, monkeypatch, capsys):
    import serve

    monkeypatch.setenv("JAXCHAT_HOME", str(tmp_path / "home"))
    (tmp_path / "servetiny.py").write_text(CLI_CONFIG)
    assert serve.main([f"--config={tmp_path / 'servetiny.py'}", "--stage=sft"]) == 2
    assert f"python train.py --config={tmp_path / 'servetiny.py'} --stage=sft" in capsys.readouterr().err


def save_checkpoint(tmp_path, make_params, config_text: str = CLI_CONFIG, run: str = "servetiny"):
    """A run `run` under tmp_path/home with this module's tokenizer and an sft checkpoint at step 3 of
    `make_params(cfg)`; returns (config path, environment for a subprocess)."""
    from jaxchat import paths
    from jaxchat.checkpoint import Checkpointer
    from jaxchat.config import load_config_file

    home = tmp_path / "home"
    config_path = tmp_path / f"{run}.py"
    config_path.write_text(config_text)
    old = os.environ.get("JAXCHAT_HOME")
    os.environ["JAXCHAT_HOME"] = str(home)
    try:
        config = load_config_file(str(config_path))
        tokenizer().save(paths.tokenizer_dir(run))
        params = make_params(model_config(config))
        with Checkpointer(paths.run_dir(run, "sft") / "checkpoints", async_save=False) as ckpt:
            ckpt.save(3, params=params, opt_state={"count": jnp.zeros((), jnp.int32)}, rng=jax.random.key(0),
                      data_state={}, config=config.to_dict())
    finally:
        os.environ.pop("JAXCHAT_HOME") if old is None else os.environ.__setitem__("JAXCHAT_HOME", old)
    return config_path, {**os.environ, "JAXCHAT_HOME": str(home)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc, url: str, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(url + "/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, "serve.py never became ready"
        time.sleep(0.25)


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_serve_cli_serves_a_saved_checkpoint(tmp_path):
    from test_engine import scripted_params as build

    config_path, env = save_checkpoint(tmp_path, lambda cfg: build(cfg, chain("<|assistant_start|>", "cat",
                                                                              "<|assistant_end|>")))
    port = free_port()
    proc = subprocess.Popen([sys.executable, "serve.py", f"--config={config_path}", "--port", str(port),
                             "--max-batch", "1", "--log-level", "warning"], env=env, stderr=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(proc, url)
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        assert [m.id for m in c.models.list().data] == ["jaxchat-servetiny-sft-3"]
        r = c.chat.completions.create(model="m", messages=HELLO)
        assert r.choices[0].message.content == "cat" and r.choices[0].finish_reason == "stop"
    finally:
        proc.terminate()
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert "ready: jaxchat-servetiny-sft-3" in err
    assert proc.returncode == 0, err  # SIGTERM drains and exits cleanly
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]  # the request log, on stdout
    chat = [x for x in lines if x["route"] == "/v1/chat/completions"]
    assert len(chat) == 1 and chat[0]["status"] == 200 and chat[0]["completion_tokens"] == 1


# ---- API keys -------------------------------------------------------------------------------------------------------


def test_api_keys_guard_every_api_route_and_leave_the_page_and_health_open():
    app = create_app(backend("random"), model_id="keyed", defaults=GenerationDefaults(max_tokens=4),
                     api_keys=["sk-first", "sk-second"])
    with ServerThread(app) as srv:
        routes = [("GET", "/v1/models", None), ("GET", "/metrics", None), ("GET", "/metrics.json", None),
                  ("POST", "/v1/chat/completions", {"messages": HELLO, "max_tokens": 2}),
                  ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": 2})]
        for method, path, body in routes:
            for headers, status in [({}, 401), ({"Authorization": "Bearer sk-wrong"}, 401),
                                    ({"Authorization": "sk-first"}, 401), ({"Authorization": "Bearer sk-first"}, 200),
                                    ({"Authorization": "Bearer sk-second"}, 200)]:
                r = httpx.request(method, srv.url + path, json=body, headers=headers, timeout=60)
                assert r.status_code == status, (path, headers, r.text)
                if status == 401:
                    assert r.json()["error"]["code"] == "invalid_api_key" and r.headers["www-authenticate"] == "Bearer"
        assert httpx.get(srv.url + "/health").status_code == 200 and httpx.get(srv.url + "/").status_code == 200
        spec = httpx.get(srv.url + "/openapi.json").json()
        assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
        assert spec["paths"]["/v1/chat/completions"]["post"]["security"] == [{"bearer": []}]
        assert "security" not in spec["paths"]["/health"]["get"]
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-second", max_retries=0, timeout=60)
        assert c.chat.completions.create(model="keyed", messages=HELLO, max_tokens=2).choices[0].message.content
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_serve_warns_when_listening_on_the_network_without_a_key():
    import serve

    assert serve.is_loopback("127.0.0.1") and serve.is_loopback("::1") and serve.is_loopback("localhost")
    assert not serve.is_loopback("0.0.0.0") and not serve.is_loopback("example.org")
