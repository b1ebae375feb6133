"""serve.py for deployments: rate limits, Prometheus metrics, the request log, the graceful drain, and the OpenAI
fields clients send (stop, seed, n, logprobs, max_completion_tokens, user, unsupported fields, /v1/completions,
calculator calls as plain text), through the official `openai` client where a client would use it. Backends and weights
come from test_serve (tiny models, a real trained tokenizer)."""
from __future__ import annotations

import io
import json
import signal
import subprocess
import sys
import threading
import time

import httpx
import jax
import numpy as np
import pytest

from jaxchat.web.app import GenerationDefaults, create_app
from jaxchat.web.batcher import Batcher, Delta, Draining, Finished, SamplingParams, StopText
from jaxchat.web.ratelimit import RateLimiter
from jaxchat.web.requestlog import RequestLog
from jaxchat.web.server import ServerThread
from test_engine import CLI_CONFIG
from test_serve import (EMOJI, HELLO, REPO, backend, client, free_port, prompt_ids, random_params,
                        save_checkpoint, tokenizer, wait_healthy)

openai = pytest.importorskip("openai", reason="pip install -r requirements-dev.txt (the openai client)")
prometheus_parser = pytest.importorskip("prometheus_client.parser")


@pytest.fixture(scope="module")
def server():
    log = io.StringIO()
    app = create_app(backend("random"), model_id="deploy", defaults=GenerationDefaults(max_tokens=16),
                     request_log=RequestLog(log))
    with ServerThread(app) as srv:
        srv.log = log
        yield srv


@pytest.fixture(scope="module")
def tool_server():
    with ServerThread(create_app(backend("tool"), model_id="tool")) as srv:
        yield srv


def log_lines(srv) -> list[dict]:
    return [json.loads(line) for line in srv.log.getvalue().splitlines()]


def wait_for(predicate, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


# ---- stop strings, seeds, n, logprobs, max_completion_tokens --------------------------------------------------------


def test_stop_text_holds_back_what_could_begin_a_stop_string():
    s = StopText(["END", "xy"])
    assert s.feed("abE") == ("ab", False)  # "E" could begin END
    assert s.feed("Nd") == ("ENd", False)
    assert s.feed("x") == ("", False)
    assert s.feed("q E") == ("xq ", False)
    assert s.feed("ND tail") == ("", True)  # ends before the stop string, which is never sent
    s = StopText(["b", "abc"])
    assert s.feed("zabc") == ("z", True)  # the stop string that starts first wins
    s = StopText(["<|x"])
    assert s.feed("a<|") == ("a", False) and s.flush() == "<|"  # at the end, the held tail is text after all


def test_stop_strings_end_the_reply_before_them(server):
    c = client(server)
    full = c.chat.completions.create(model="m", messages=HELLO, temperature=0, max_tokens=16).choices[0].message.content
    stop = full[5:8]
    want = full[:full.index(stop)]
    r = c.chat.completions.create(model="m", messages=HELLO, temperature=0, max_tokens=16, stop=[stop, "\x00never"])
    assert r.choices[0].message.content == want and r.choices[0].finish_reason == "stop"
    chunks = list(c.chat.completions.create(model="m", messages=HELLO, temperature=0, max_tokens=16, stop=stop,
                                            stream=True))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == want
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_the_same_seed_gives_the_same_text_and_n_choices_are_the_engines_samples(server):
    c = client(server)
    kw = dict(model="m", messages=HELLO, temperature=1.0, max_tokens=12, extra_body={"top_k": 0})
    a, b, other = (c.chat.completions.create(seed=s, **kw).choices[0].message.content for s in (7, 7, 8))
    assert a == b and a != other
    r = c.chat.completions.create(seed=7, n=3, **kw)
    assert [ch.index for ch in r.choices] == [0, 1, 2] and r.choices[0].message.content == a
    p = prompt_ids(HELLO)
    rows, _ = backend("random").engine.generate_batch(p, num_samples=3, max_tokens=12, temperature=1.0, top_k=0, seed=7)
    assert [ch.message.content for ch in r.choices] == [tokenizer().decode(row[len(p):]) for row in rows]
    assert r.usage.prompt_tokens == len(p) and r.usage.completion_tokens == 36  # the prompt counts once
    chunks = list(c.chat.completions.create(seed=7, n=3, stream=True, **kw))
    texts = ["".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices and ch.choices[0].index == i)
             for i in range(3)]
    assert texts == [ch.message.content for ch in r.choices]


def test_logprobs_are_the_models_and_the_greedy_token_is_the_likeliest(server):
    r = client(server).chat.completions.create(model="m", messages=HELLO, temperature=0, max_tokens=6, logprobs=True,
                                              top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == 6 == r.usage.completion_tokens
    assert "".join(t.token for t in content) == r.choices[0].message.content
    # against the full forward: log-softmax of the logits after the prompt and each token before
    eng, p = backend("random").engine, prompt_ids(HELLO)
    ids = list(p)
    for t in content:
        logits = eng.last_logits(np.asarray([ids]), [len(ids)])[0]
        logp = np.asarray(jax.nn.log_softmax(logits))
        order = np.argsort(-logp)[:3]
        assert [x.token for x in t.top_logprobs] == [tokenizer().decode([int(i)]) for i in order]
        assert t.top_logprobs[0].token == t.token and len(t.top_logprobs) == 3
        np.testing.assert_allclose([t.logprob] + [x.logprob for x in t.top_logprobs],
                                   [logp[order[0]]] + list(logp[order]), atol=1e-4)
        assert bytes(t.bytes).decode() == t.token
        ids.append(int(order[0]))
    # no top_logprobs: each token's own, no alternatives; streaming carries them chunk by chunk
    chunks = list(client(server).chat.completions.create(model="m", messages=HELLO, temperature=0, max_tokens=6,
                                                         logprobs=True, stream=True))
    streamed = [t for ch in chunks if ch.choices and ch.choices[0].logprobs for t in ch.choices[0].logprobs.content]
    assert [t.logprob for t in streamed] == pytest.approx([t.logprob for t in content], abs=1e-6)
    assert all(t.top_logprobs == [] for t in streamed)


def test_max_completion_tokens_wins_and_neutral_openai_fields_are_accepted(server):
    c = client(server)
    r = c.chat.completions.create(model="m", messages=HELLO, max_tokens=9, max_completion_tokens=3, user="alice",
                                  presence_penalty=0, frequency_penalty=0.0, logit_bias={}, tools=[],
                                  response_format={"type": "text"})
    assert r.usage.completion_tokens == 3
    line = [x for x in log_lines(server) if x.get("user") == "alice"][-1]
    assert line["completion_tokens"] == 3 and line["status"] == 200


@pytest.mark.parametrize("field,value", [("presence_penalty", 0.5), ("frequency_penalty", 1.0),
                                         ("logit_bias", {"1": 5}), ("response_format", {"type": "json_object"})])
def test_unsupported_fields_are_a_400_naming_them_through_the_client(server, field, value):
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(model="m", messages=HELLO, max_tokens=2, **{field: value})
    assert f"`{field}` is not supported" in str(e.value) and e.value.body["param"] == field
    with pytest.raises(openai.BadRequestError) as e:
        client(server).chat.completions.create(
            model="m", messages=HELLO, tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert "`tools` is not supported by this server (no function calling)" in str(e.value)


# ---- text completions ------------------------------------------------------------------------------------------------


def test_text_completions_continue_the_prompt_after_bos(server):
    c = client(server)
    r = c.completions.create(model="m", prompt="the cat sat", max_tokens=8, temperature=0)
    eng, tok = backend("random").engine, tokenizer()
    p = [tok.bos_id, *tok.encode("the cat sat")]
    rows, _ = eng.generate_batch(p, max_tokens=8, temperature=0.0)
    assert r.object == "text_completion" and r.choices[0].text == tok.decode(rows[0][len(p):])
    assert r.choices[0].finish_reason == "length" and r.usage.prompt_tokens == len(p)
    streamed = list(c.completions.create(model="m", prompt="the cat sat", max_tokens=8, temperature=0, stream=True))
    assert "".join(ch.choices[0].text for ch in streamed if ch.choices) == r.choices[0].text
    assert c.completions.create(model="m", prompt="the cat sat", temperature=0).usage.completion_tokens == 16  # OpenAI
    many = c.completions.create(model="m", prompt=["the cat sat", "hello"], n=2, max_tokens=4, temperature=0,
                                logprobs=2)
    assert [ch.index for ch in many.choices] == [0, 1, 2, 3] and many.choices[0].text == many.choices[1].text
    assert many.choices[0].text.startswith(r.choices[0].text[:3])
    lp = many.choices[2].logprobs
    assert len(lp.tokens) == 4 == len(lp.token_logprobs) == len(lp.top_logprobs)
    assert "".join(lp.tokens) == many.choices[2].text and lp.text_offset[0] == 0
    assert all(len(alts) <= 2 for alts in lp.top_logprobs)
    with pytest.raises(openai.BadRequestError, match="echo"):
        c.completions.create(model="m", prompt="x", echo=True)
    with pytest.raises(openai.BadRequestError, match="choices"):
        c.completions.create(model="m", prompt=["a", "b", "c"], n=3)


# ---- calculator calls as plain text ----------------------------------------------------------------------------------


def test_calculator_calls_as_markers_or_as_plain_text(tool_server):
    c = client(tool_server)
    markers = c.chat.completions.create(model="m", messages=HELLO, temperature=0).choices[0].message.content
    assert markers == f"{EMOJI}<|python_start|>7*6<|python_end|><|output_start|>42<|output_end|>!"
    text = c.chat.completions.create(model="m", messages=HELLO, temperature=0,
                                     extra_body={"calculator_format": "text"}).choices[0].message.content
    assert text == f"{EMOJI}<<7*6=42>>!"
    chunks = list(c.chat.completions.create(model="m", messages=HELLO, temperature=0, stream=True,
                                            extra_body={"calculator_format": "text"}))
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == text


# ---- rate limits -----------------------------------------------------------------------------------------------------


def test_rate_limiter_buckets_refill_per_key():
    now = [0.0]
    lim = RateLimiter(requests_per_minute=2, tokens_per_minute=60, clock=lambda: now[0])
    assert lim.admit("a") is None and lim.admit("a") is None
    assert lim.admit("a") == pytest.approx(30.0)  # one request per 30 s refills
    assert lim.admit("b") is None  # every key its own allowance
    now[0] = 30.0
    assert lim.admit("a") is None
    lim.charge("a", 150)  # a long reply: the key's 60 tokens go to -90, in debt
    now[0] = 90.0  # the request bucket is full again, the token one at -90 + 60 = -30: 31 s to hold one token
    assert lim.admit("a") == pytest.approx(31.0)
    now[0] = 121.0
    assert lim.admit("a") is None
    with pytest.raises(ValueError, match="positive"):
        RateLimiter(requests_per_minute=0)


def test_rate_limits_answer_429_with_retry_after_per_key():
    app = create_app(backend("random"), model_id="limited", defaults=GenerationDefaults(max_tokens=2),
                     api_keys=["sk-a", "sk-b"], limiter=RateLimiter(requests_per_minute=2))
    with ServerThread(app) as srv:
        a = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-a", max_retries=0, timeout=60)
        for _ in range(2):
            a.chat.completions.create(model="m", messages=HELLO)
        with pytest.raises(openai.RateLimitError) as e:
            a.chat.completions.create(model="m", messages=HELLO)
        assert e.value.response.headers["retry-after"] == "30" and e.value.code == "rate_limit_exceeded"
        b = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-b", max_retries=0, timeout=60)
        assert b.chat.completions.create(model="m", messages=HELLO).usage.completion_tokens == 2
        metrics = httpx.get(srv.url + "/metrics", headers={"Authorization": "Bearer sk-a"}).text
        assert "jaxchat_rate_limited_total 1.0" in metrics
    tokens = create_app(backend("random"), defaults=GenerationDefaults(max_tokens=24),
                        limiter=RateLimiter(tokens_per_minute=20))
    with ServerThread(tokens) as srv:  # no keys: the limit is per client address
        c = client(srv)
        assert c.chat.completions.create(model="m", messages=HELLO).usage.total_tokens > 20  # admitted, now in debt
        with pytest.raises(openai.RateLimitError) as e:
            c.chat.completions.create(model="m", messages=HELLO)
        assert int(e.value.response.headers["retry-after"]) >= 1


# ---- metrics and the request log -------------------------------------------------------------------------------------


def scrape(srv) -> dict:
    text = httpx.get(srv.url + "/metrics").text
    out = {}
    for family in prometheus_parser.text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def test_prometheus_metrics_parse_and_move_with_traffic(server):
    r = httpx.get(server.url + "/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    before = scrape(server)
    chat = ("jaxchat_requests_total", (("route", "/v1/chat/completions"), ("status", "200")))
    bad = ("jaxchat_requests_total", (("route", "/v1/chat/completions"), ("status", "400")))
    client(server).chat.completions.create(model="m", messages=HELLO, max_tokens=5)
    httpx.post(server.url + "/v1/chat/completions", json={"messages": []})
    after = scrape(server)
    assert after[chat] == before.get(chat, 0) + 1 and after[bad] == before.get(bad, 0) + 1
    for name, grew_by in [("jaxchat_tokens_generated_total", 5), ("jaxchat_completion_tokens_total", 5),
                          ("jaxchat_time_to_first_token_seconds_count", 1),
                          ("jaxchat_time_per_output_token_seconds_count", 1)]:
        assert after[(name, ())] >= before.get((name, ()), 0) + grew_by, name
    hist = ("jaxchat_request_duration_seconds_count", (("route", "/v1/chat/completions"),))
    assert after[hist] >= before.get(hist, 0) + 2
    for gauge in ("jaxchat_queue_depth", "jaxchat_active_rows", "jaxchat_max_rows"):
        assert (gauge, ()) in after
    assert after[("jaxchat_status", (("status", "ok"),))] == 1.0
    httpx.get(server.url + "/no/such/page")
    assert ("jaxchat_requests_total", (("route", "other"), ("status", "404"))) in scrape(server)


def test_one_request_log_line_per_request_without_the_text_unless_asked(server):
    client(server).chat.completions.create(model="m", messages=[{"role": "user", "content": "secret words"}],
                                           max_tokens=4, user="log-test")
    line = [x for x in log_lines(server) if x.get("user") == "log-test"][-1]
    assert line["route"] == "/v1/chat/completions" and line["status"] == 200 and line["id"].startswith("chatcmpl-")
    assert line["prompt_tokens"] > 0 and line["completion_tokens"] == 4 and line["finish_reasons"] == ["length"]
    assert 0 < line["ttft_s"] <= line["duration_s"] and line["stream"] is False and line["n"] == 1
    assert "secret" not in json.dumps(line) and "prompt" not in line and "completions" not in line
    assert line["key"].startswith("client-127.0.0.1")
    out = io.StringIO()
    with ServerThread(create_app(backend("random"), defaults=GenerationDefaults(max_tokens=3), api_keys=["sk-z"],
                                 request_log=RequestLog(out, log_prompts=True))) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="sk-z", max_retries=0, timeout=60)
        text = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "secret words"}], stream=True) if ch.choices)
        httpx.get(srv.url + "/v1/models")  # no key
    lines = [json.loads(x) for x in out.getvalue().splitlines()]
    assert [(x["route"], x["status"]) for x in lines] == [("/v1/chat/completions", 200), ("/v1/models", 401)]
    assert lines[0]["prompt"] == [{"role": "user", "content": "secret words"}] and lines[0]["completions"] == [text]
    assert lines[0]["key"].startswith("key-") and "sk-z" not in out.getvalue() and lines[0]["stream"] is True
    assert "API key" in lines[1]["error"]


def test_a_stream_the_client_leaves_is_logged_as_cancelled(server):
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=60,
                      json={"messages": HELLO, "stream": True, "max_tokens": 100, "user": "leaver"}) as r:
        next(r.iter_lines())
    wait_for(lambda: any(x.get("user") == "leaver" for x in log_lines(server)))
    line = [x for x in log_lines(server) if x.get("user") == "leaver"][-1]
    assert line["finish_reasons"] == ["cancelled"] and line["status"] == 200


# ---- the graceful drain ----------------------------------------------------------------------------------------------


def test_batcher_drain_lets_short_requests_finish_and_ends_the_rest_cleanly():
    b = Batcher(backend("random").engine, max_rows=4, queue_size=8).start()
    b.wait_ready(timeout=600)
    events = {i: [] for i in range(6)}
    p = prompt_ids(HELLO)
    slow = lambda i: lambda ev: (time.sleep(0.01), events[i].append(ev))  # noqa: E731 -- a slow model's pace
    for i in range(6):  # 4 rows and 2 waiting; 0 and 1 are short, the rest would take ~5 s
        b.submit(p, SamplingParams(max_tokens=3 if i < 2 else 10_000, temperature=0.0),
                 events[i].append if i < 2 else slow(i))
    result = b.drain(timeout=2.0)
    assert result == {"finished": 2, "cut": 4}
    for i, evs in events.items():
        assert isinstance(evs[-1], Finished) and all(isinstance(e, Delta) for e in evs[:-1]), evs[-1]
        assert evs[-1].reason == ("length" if i < 2 else "shutdown")
    assert events[0][-1].completion_tokens == 3 and events[2][-1].completion_tokens > 3
    with pytest.raises(Draining, match="shutting down"):
        b.submit(p, SamplingParams(max_tokens=1), lambda ev: None)
    assert b.metrics()["active_rows"] == 0 and b.metrics()["status"] == "draining"
    b.stop()


DRAIN_CONFIG = CLI_CONFIG.replace('= 300, 64, "float32"', '= 300, 512, "float32"')  # room for 400-token replies
assert DRAIN_CONFIG != CLI_CONFIG
# serve.py with every decode step slowed to ~30 ms (a bigger model on a slower machine): streams take seconds
SLOW_SERVE = ("import sys, time; import jaxchat.engine as E; decode = E.Engine.decode; "
              "E.Engine.decode = lambda self, *a, **k: (time.sleep(0.03), decode(self, *a, **k))[1]; "
              "import serve; sys.exit(serve.main(sys.argv[1:]))")


def test_sigterm_drains_finishes_short_streams_ends_long_ones_cleanly_and_exits_0(tmp_path):
    config_path, env = save_checkpoint(tmp_path, lambda cfg: random_params(cfg=cfg), DRAIN_CONFIG, run="draintiny")
    port, url = free_port(), None
    proc = subprocess.Popen([sys.executable, "-c", SLOW_SERVE, f"--config={config_path}", "--port", str(port),
                             "--max-batch", "8", "--drain-timeout", "3", "--log-level", "warning"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    url = f"http://127.0.0.1:{port}"
    results, started = {}, threading.Barrier(9, timeout=120)

    def stream(i: int, max_tokens: int):
        chunks, done = [], False
        with httpx.stream("POST", url + "/v1/chat/completions", timeout=120, json={
                "messages": HELLO, "stream": True, "max_tokens": max_tokens, "temperature": 0,
                "stream_options": {"include_usage": True}}) as r:
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunks.append(json.loads(line[6:]))
                if len(chunks) == 2:
                    started.wait()  # its first token is out
        results[i] = (r.status_code, chunks, done)

    try:
        wait_healthy(proc, url)
        threads = [threading.Thread(target=stream, args=(i, 30 if i < 4 else 400)) for i in range(8)]
        for t in threads:
            t.start()
        started.wait()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        refused = httpx.post(url + "/v1/chat/completions", json={"messages": HELLO, "max_tokens": 2}, timeout=30)
        health = httpx.get(url + "/health", timeout=30)
        for t in threads:
            t.join(60)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err[-3000:]
    assert refused.status_code == 503 and refused.headers["retry-after"] == "10", refused.text
    assert refused.json()["error"]["code"] == "shutting_down"
    assert health.status_code == 503 and health.json()["status"] == "draining"
    for i in range(8):
        status, chunks, done = results[i]
        assert status == 200 and done, (i, chunks[-3:])  # every stream ends with [DONE], none with an error
        assert not any("error" in c for c in chunks)
        finish = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
        usage = chunks[-1]["usage"]
        assert finish == ["length"], (i, finish)
        if i < 4:
            assert usage["completion_tokens"] == 30  # finished within the drain timeout: complete
        else:
            assert 2 <= usage["completion_tokens"] < 400  # cut cleanly at the timeout
    lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    reasons = sorted(x["finish_reasons"][0] for x in lines if x["status"] == 200)
    assert reasons == ["length"] * 4 + ["shutdown"] * 4
    assert "drained: 4 requests finished, 4 ended at the timeout" in err

