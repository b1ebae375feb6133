"""Continuous batching: one background thread decodes every live request together; rows join and leave between steps.

- A pool of `max_rows` slots shares one KV cache (per layer (max_rows, H_kv, S, D)) whose length S is kept a power-of-
  two bucket of the longest live row (64, 128, ... the context), grown or shrunk one bucket at a time as rows come and
  go: decode reads every cached key, and chats are usually much shorter than the context. Live rows are kept packed at
  the front: a finished row is replaced by the last live row (a jitted row copy), so each step decodes only
  `bucket(live rows)` rows (1, 2, 4, ... max_rows) with the engine's `decode`.
- A new request is prefilled alone at its bucketed prompt length by the engine's `prefill`, which also samples its
  first token, and `insert`ed into the first free slot; the cache is donated to every program that keeps its shape.
  Waiting requests are admitted between steps, all that fit, before the next decode.
- This module only schedules: the programs, the sampler (per-row temperature, top-k, top-p; each row keyed by its seed
  and its sample index, then its own step, so a seeded request draws what `Engine.generate` draws for that sample of
  its prompt, whatever else is in the batch) and the calculator's state machine are the engine's, so the server and
  the CLI cannot drift apart. Text leaves through a `StreamDecoder` per row (never half a character); special tokens
  appear as their names, which is how tool calls reach clients (see schema.py).
- A request may name stop strings: text that could begin one is held back until it cannot, and the first complete
  one ends the row there (the stop string itself is never sent). Rows that asked for logprobs get each token's
  log-probability and the likeliest alternatives with their text (every step computes them: a top-20 over the
  vocabulary costs little beside the step, and one set of programs serves every request).
- `drain(timeout)` is the graceful shutdown: no new requests, the running ones finish within the timeout, the rest
  end cleanly with what they have (`Finished("shutdown")`), never an error.
- `warm_up` compiles every program (prompt buckets; row buckets x attention buckets; the row copy) before `ready` turns
  true, so no request ever waits on XLA; `engine.TRACES` counts traces to prove it.
- The thread talks to the outside only through `submit` (thread-safe and bounded: `QueueFull` once `max_rows +
  queue_size` requests are in) and each request's `sink`, a callable the loop hands `Delta`/`Finished`/`Failed` events
  to. The web app's sink forwards them into an asyncio queue; tests and benchmarks may pass any callable.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import functools
import logging
import os
import threading
import time
import traceback
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxchat import engine as E
from jaxchat.engine import MAX_TOP_LOGPROBS, MIN_CACHE_BUCKET, MIN_PROMPT_BUCKET, Engine, RowState, Sampling, bucket
from jaxchat.model import KVCache
from jaxchat.tokenizer import StreamDecoder

log = logging.getLogger("jaxchat.serve")
THROUGHPUT_WINDOW_S = 10.0
TTFT_WINDOW = 1000  # requests whose time to first token /metrics summarises


class NotReady(RuntimeError):
    """The loop is still compiling, has stopped, or failed to start."""


class Draining(NotReady):
    """The server is shutting down: it finishes what it has and takes nothing new."""


class QueueFull(RuntimeError):
    """Every row is busy and `queue_size` requests are already waiting for one."""


class PromptTooLong(ValueError):
    """The prompt leaves no room in the model's context for a reply."""


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 0.8
    top_k: int = 50  # 0: off
    top_p: float = 1.0  # 1: off
    seed: int = 0
    sample: int = 0  # which of a request's n choices: the row's key is (seed, sample), as in Engine.generate
    stop: tuple[str, ...] = ()  # stop strings
    logprobs: int | None = None  # None: off; else report each token's logprob and this many alternatives


@dataclasses.dataclass(frozen=True)
class TokenLogprob:
    token: int
    logprob: float  # 0.0 for tokens the calculator wrote (certain)
    top: tuple[tuple[int, float], ...]  # the likeliest (token, logprob), likeliest first


@dataclasses.dataclass(frozen=True)
class Delta:
    text: str  # may be "" while a multi-byte character is incomplete or could begin a stop string
    tokens: int
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclasses.dataclass(frozen=True)
class Finished:
    reason: str  # "stop" (end of turn or a stop string), "length" (max_tokens or the context), "shutdown" (drained)
    prompt_tokens: int
    completion_tokens: int
    ttft_s: float  # submission to first token
    elapsed_s: float = 0.0  # submission to this event


@dataclasses.dataclass(frozen=True)
class Failed:
    message: str


Event = Delta | Finished | Failed


class Ticket:
    """A submitted request; `cancel()` frees its row at the next step (a no-op once it has finished)."""

    def __init__(self, prompt: list[int], sampling: SamplingParams, sink: Callable[[Event], None]):
        self.prompt, self.sampling, self.sink = prompt, sampling, sink
        self.submitted = time.perf_counter()
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


def held_tail(text: str, words) -> int:
    """The length of the longest end of `text` that is the beginning (not the whole) of one of `words`: what a stream
    must hold back until the next piece says whether the word follows."""
    return max((k for w in words for k in range(1, min(len(w), len(text) + 1)) if text.endswith(w[:k])), default=0)


class StopText:
    """Finds the first of some stop strings in streamed text, holding back any tail that could begin one."""

    def __init__(self, stops: Sequence[str]):
        self.stops, self.held = tuple(s for s in stops if s), ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text safe to send, whether a stop string ended the stream: then the text is everything before it)."""
        buf = self.held + text
        hits = [i for i in (buf.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.held = ""
            return buf[:min(hits)], True
        keep = held_tail(buf, self.stops)
        self.held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def flush(self) -> str:
        out, self.held = self.held, ""
        return out


@dataclasses.dataclass
class _Row:
    ticket: Ticket
    state: RowState
    decoder: StreamDecoder
    stop: StopText | None = None
    next_input: int = 0
    length: int = 0  # positions of this row the cache holds
    step: int = 1  # the step the next decode samples at: the first token (the admit) was step 0
    completion_tokens: int = 0
    ttft_s: float = 0.0


def _i32(x):
    return np.asarray(x, np.int32)


# ----------------------------------------------------------------------------------------------------------------------
# The loop


class Batcher:
    """The continuous-batching generation backend the web app serves from (see the module docstring)."""

    def __init__(self, engine: Engine, *, max_rows: int = 32, queue_size: int = 256):
        if max_rows < 1 or queue_size < 0:
            raise ValueError(f"need max_rows >= 1 and queue_size >= 0, got {max_rows} and {queue_size}")
        self.engine = engine
        self.tokenizer = engine.tokenizer
        self.cfg = engine.cfg
        self.context_len = engine.cfg.sequence_len
        self.max_rows = bucket(max_rows, 1)  # a power of two, so every row bucket fits
        self.queue_size = queue_size
        self.cache_len = bucket(self.context_len, MIN_PROMPT_BUCKET)  # any prompt bucket fits, then the reply
        self._cache: KVCache | None = None
        self._rows: list[_Row] = []  # row i lives in cache slot i
        self._waiting: collections.deque[Ticket] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._draining = False
        self._cut = False  # drain's deadline passed: the loop ends every remaining request
        self.top_logprobs = min(MAX_TOP_LOGPROBS, self.cfg.vocab_size)
        self.status = "warming_up"  # -> "ok" when compiled and looping, "failed" if warm-up or the thread died
        self.error: str | None = None
        self.warmup_s: float | None = None
        self._started_at = time.time()
        self._m = collections.Counter()
        self._ttfts: collections.deque[float] = collections.deque(maxlen=TTFT_WINDOW)
        self._recent: collections.deque[tuple[float, int]] = collections.deque()  # (time, tokens) per step
        self._peak_rows = 0
        self._busy_s = 0.0

    # -- life cycle

    @property
    def ready(self) -> bool:
        return self.status == "ok" and not self._stopping and not self._draining

    @property
    def draining(self) -> bool:
        return self._draining

    def start(self) -> Batcher:
        """Warm up and serve in a background thread; returns at once (poll `ready`, or `wait_ready`)."""
        if self._thread is not None:
            raise RuntimeError("this Batcher was already started")
        self._thread = threading.Thread(target=self._run, name="jaxchat-batcher", daemon=True)
        self._thread.start()
        return self

    def wait_ready(self, timeout: float | None = None) -> None:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.status == "warming_up":
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the batcher did not finish warming up within {timeout} s")
            time.sleep(0.05)
        if self.status != "ok":
            raise NotReady(f"the batcher failed to start: {self.error}")

    def drain(self, timeout: float) -> dict:
        """Graceful shutdown: refuse new requests (`Draining`), let live and waiting ones run for up to `timeout`
        seconds, then end the rest with `Finished("shutdown")` after the text they have. Returns how many finished on
        their own and how many were cut."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._draining = True
            busy = len(self._rows) + len(self._waiting)
            while (self._rows or self._waiting) and self._loop_alive() and time.monotonic() < deadline:
                self._cond.wait(max(0.0, min(0.1, deadline - time.monotonic())))
            left = len(self._rows) + len(self._waiting)
            if left and self._loop_alive():
                self._cut = True
                self._cond.notify_all()
                while self._cut and self._loop_alive():
                    self._cond.wait(0.1)
        log.info("drained: %d requests finished, %d cut at the %.1f s timeout", busy - left, left, timeout)
        return {"finished": busy - left, "cut": left}

    def _loop_alive(self) -> bool:
        return self.status == "ok" and self._thread is not None and self._thread.is_alive()

    def stop(self, timeout: float | None = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the public door

    def submit(self, prompt: Sequence[int], sampling: SamplingParams, sink: Callable[[Event], None]) -> Ticket:
        """Queue a request. Raises NotReady, PromptTooLong, QueueFull, or ValueError for a bad parameter."""
        if self._draining:
            raise Draining("the server is shutting down and takes no new requests; retry shortly")
        if not self.ready:
            raise NotReady(self._not_ready_reason())
        prompt = [int(t) for t in prompt]
        n = len(prompt)
        if n == 0:
            raise ValueError("the prompt is empty")
        if n >= self.context_len:
            raise PromptTooLong(f"the conversation is {n:,} tokens but this model's context is {self.context_len:,} "
                                f"tokens, and the reply needs at least one: shorten it or drop earlier messages")
        if not all(0 <= t < self.cfg.vocab_size for t in prompt):
            raise ValueError(f"the prompt has a token id outside the model's vocabulary [0, {self.cfg.vocab_size})")
        if sampling.max_tokens < 1 or not 0 <= sampling.temperature or not 0 <= sampling.top_p <= 1:
            raise ValueError(f"invalid sampling parameters {sampling}")
        if sampling.logprobs is not None and not 0 <= sampling.logprobs <= self.top_logprobs:
            raise ValueError(f"top_logprobs must be in [0, {self.top_logprobs}], got {sampling.logprobs}")
        top_k = self.engine.check_top_k(sampling.top_k)
        sampling = dataclasses.replace(sampling, top_k=top_k, max_tokens=min(sampling.max_tokens, self.context_len - n))
        ticket = Ticket(prompt, sampling, sink)
        with self._cond:
            if len(self._rows) + len(self._waiting) >= self.max_rows + self.queue_size:
                self._m["rejected_queue_full"] += 1
                raise QueueFull(f"the server is at capacity ({self.max_rows} generating, {len(self._waiting)} "
                                f"waiting); retry shortly")
            self._waiting.append(ticket)
            self._m["submitted"] += 1
            self._cond.notify()
        return ticket

    def _not_ready_reason(self) -> str:
        if self._stopping:
            return "the server is shutting down"
        if self.status == "failed":
            return f"the generation loop failed: {self.error}"
        return "the model is still warming up (compiling); retry in a few seconds"

    # -- metrics

    def metrics(self) -> dict:
        with self._cond:
            self._forget_old_steps()
            recent_tokens = sum(n for _, n in self._recent)
            ttfts = sorted(self._ttfts)
            m = dict(self._m)
            waiting, active = len(self._waiting), len(self._rows)
        pct = lambda q: ttfts[min(len(ttfts) - 1, int(q * len(ttfts)))] if ttfts else None
        return {
            "status": "draining" if self._draining and self.status == "ok" else self.status,
            "uptime_s": round(time.time() - self._started_at, 3),
            "warmup_s": self.warmup_s,
            "requests_submitted": m.get("submitted", 0),
            "requests_completed": m.get("completed", 0),
            "requests_cancelled": m.get("cancelled", 0),
            "requests_failed": m.get("failed", 0),
            "requests_cut_by_shutdown": m.get("cut", 0),
            "requests_rejected_queue_full": m.get("rejected_queue_full", 0),
            "queue_depth": waiting,
            "queue_size": self.queue_size,
            "active_rows": active,
            "max_rows": self.max_rows,
            "peak_active_rows": self._peak_rows,
            "tokens_generated": m.get("tokens", 0),
            "decode_steps": m.get("steps", 0),
            "tokens_per_s": round(recent_tokens / THROUGHPUT_WINDOW_S, 2),  # over the last window, idle time included
            "tokens_per_busy_s": round(m.get("tokens", 0) / self._busy_s, 2) if self._busy_s else None,
            "ttft_s": {"count": len(ttfts), "mean": sum(ttfts) / len(ttfts) if ttfts else None,
                       "p50": pct(0.5), "p95": pct(0.95), "max": ttfts[-1] if ttfts else None},
        }

    def _forget_old_steps(self) -> None:  # callers hold the lock
        cutoff = time.perf_counter() - THROUGHPUT_WINDOW_S
        while self._recent and self._recent[0][0] < cutoff:
            self._recent.popleft()

    # -- the thread

    def _run(self) -> None:
        try:
            self.warm_up()
        except Exception as e:  # a model that cannot even compile must say why, not hang at "warming up"
            log.error("warm-up failed:\n%s", traceback.format_exc())
            self.error, self.status = f"{type(e).__name__}: {e}", "failed"
            return
        self.status = "ok"
        while not self._stopping:
            try:
                self._iterate()
            except Exception as e:  # noqa: BLE001 -- the loop must outlive any one bad step
                log.error("generation step failed:\n%s", traceback.format_exc())
                self._fail_everything(f"internal error in the generation loop: {type(e).__name__}: {e}")
        self._fail_everything("the server is shutting down")

    def warm_up(self, workers: int | None = None) -> None:
        """Compile every program the loop can run in parallel threads from shapes alone (XLA compiles without the
        GIL, and jit's caches keep the result): the prefill of each prompt bucket and its copy into each cache length
        that holds it; at each cache length the decode of each row bucket and the row copy; the cache's growing and
        shrinking between neighbouring lengths. Then one admit and one decode run for real, so a runtime failure
        (memory) shows now rather than on a request."""
        t0 = time.perf_counter()
        sds = jax.ShapeDtypeStruct
        params = jax.tree.map(lambda x: sds(x.shape, x.dtype), self.engine.params)
        caches = {S: jax.eval_shape(functools.partial(self.engine.new_cache, self.max_rows, S))
                  for S in self._cache_buckets()}
        i32 = lambda *shape: sds(shape, jnp.int32)  # noqa: E731
        sampling = lambda n: Sampling(*(sds((n,), t) for t in (jnp.uint32, jnp.uint32, jnp.float32, jnp.int32,  # noqa: E731
                                                                 jnp.float32)))
        cfg, k, prompts = self.cfg, self.engine.max_top_k, self._buckets(MIN_PROMPT_BUCKET, self._max_prompt_bucket())
        lp = self.top_logprobs
        jobs = [functools.partial(E.prefill.lower, cfg, k, params, i32(1, T), i32(1), sampling(1), lp)
                for T in prompts]
        fresh = {T: jax.eval_shape(lambda T=T: KVCache.zeros(cfg, 1, T)) for T in prompts}
        for S, cache in caches.items():
            jobs += [functools.partial(E.insert.lower, cache, fresh[T], i32(), 1) for T in prompts if T <= S]
            jobs += [functools.partial(E.resize.lower, cache, other) for other in (S // 2, S * 2) if other in caches]
            jobs += [functools.partial(E.decode.lower, cfg, k, params, cache, i32(b), i32(b), sampling(b), lp)
                     for b in self._buckets(1, self.max_rows)]
            jobs.append(functools.partial(E.move_row.lower, cache, i32(), i32()))
        with concurrent.futures.ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool:
            for future in [pool.submit(lambda job=job: job().compile()) for job in jobs]:
                future.result()
        self._cache = self._new_cache()
        self._admit_one(Ticket([self.engine.pad_id], SamplingParams(max_tokens=2, temperature=0.0), lambda _: None))
        self._step()
        jax.block_until_ready(self._cache)
        self._rows, self._m, self._ttfts = [], collections.Counter(), collections.deque(maxlen=TTFT_WINDOW)
        self._cache = self._new_cache()
        self.warmup_s = round(time.perf_counter() - t0, 3)
        log.info("warm-up compiled %d programs in %.1f s", len(jobs), self.warmup_s)

    def _max_prompt_bucket(self) -> int:
        return bucket(self.context_len - 1, MIN_PROMPT_BUCKET)

    def _cache_buckets(self) -> list[int]:
        return self._buckets(min(MIN_CACHE_BUCKET, self.cache_len), self.cache_len)

    @staticmethod
    def _buckets(lo: int, hi: int) -> list[int]:
        out = [lo]
        while out[-1] < hi:
            out.append(out[-1] * 2)
        return out

    def _new_cache(self) -> KVCache:
        return self.engine.new_cache(self.max_rows, self._cache_buckets()[0])

    def _iterate(self) -> None:
        with self._cond:
            while not self._rows and not self._waiting and not self._stopping and not self._cut:
                self._cond.wait()
            if self._stopping:
                return
            if self._cut:
                self._end_everything()
                return
            admitted = []
            while self._waiting and len(self._rows) + len(admitted) < self.max_rows:
                admitted.append(self._waiting.popleft())
        t0 = time.perf_counter()
        produced = 0
        for ticket in admitted:
            if ticket.cancelled:
                self._count("cancelled")
                continue
            produced += self._admit_one(ticket)
        self._drop_cancelled()
        self._compact()  # rows that ended on their first token or were cancelled take no decode step
        if self._rows:
            produced += self._step()
            self._compact()
        with self._cond:
            self._peak_rows = max(self._peak_rows, len(self._rows))
            self._recent.append((time.perf_counter(), produced))
            self._forget_old_steps()
            self._busy_s += time.perf_counter() - t0
            self._cond.notify_all()  # a drain waits for the rows to empty

    def _admit_one(self, ticket: Ticket) -> int:
        s, prompt = ticket.sampling, ticket.prompt
        T = bucket(len(prompt), MIN_PROMPT_BUCKET)
        tokens_1xT = np.full((1, T), self.engine.pad_id, np.int32)
        tokens_1xT[0, :len(prompt)] = prompt
        first, fresh = self.engine.prefill(tokens_1xT, [len(prompt)], Sampling.rows(
            [s.seed % 2**32], [s.sample], [s.temperature], [s.top_k], [s.top_p]), self.top_logprobs)
        # The cache must hold the padded prompt and every live row's next position.
        self._cache = self.engine.fit_cache(self._cache, max([T] + [r.length + 1 for r in self._rows]), self.cache_len)
        self._cache = E.insert(self._cache, fresh, _i32(len(self._rows)), 1)
        row = _Row(ticket, RowState(s.max_tokens), StreamDecoder(self.tokenizer), StopText(s.stop) if s.stop else None,
                   length=len(prompt))
        row.ttft_s = time.perf_counter() - ticket.submitted
        with self._cond:
            self._ttfts.append(row.ttft_s)
        self._rows.append(row)
        self._take_all([row], first)
        return 1

    def _step(self) -> int:
        rows = self._rows
        n = len(rows)
        pad = bucket(n, 1) - n
        # The cache is kept a bucket of the longest live row, not the whole context: decode reads every cached key.
        self._cache = self.engine.fit_cache(self._cache, max(r.length for r in rows) + 1, self.cache_len)
        sampled, self._cache = self.engine.decode(
            self._cache, [r.next_input for r in rows] + [self.engine.pad_id] * pad, [r.step for r in rows] + [0] * pad,
            Sampling.rows([r.ticket.sampling.seed % 2**32 for r in rows] + [0] * pad,
                          [r.ticket.sampling.sample for r in rows] + [0] * pad,
                          [r.ticket.sampling.temperature for r in rows] + [0.0] * pad,
                          [r.ticket.sampling.top_k for r in rows] + [0] * pad,
                          [r.ticket.sampling.top_p for r in rows] + [1.0] * pad), self.top_logprobs)
        for row in rows:
            row.step += 1
            row.length += 1
        self._take_all(rows, sampled)
        self._count("steps")
        return n

    def _take_all(self, rows: list[_Row], sampled: E.Sampled) -> None:
        tokens = np.asarray(sampled.tokens)
        # The logprobs stay on the device unless a row asked for them.
        want = any(r.ticket.sampling.logprobs is not None for r in rows)
        lps = [np.asarray(x) for x in (sampled.logprob, sampled.top_ids, sampled.top_logprobs)] if want else None
        for i, row in enumerate(rows):
            self._take(row, int(tokens[i]), None if lps is None else (lps[0][i], lps[1][i], lps[2][i]))

    def _take(self, row: _Row, sampled: int, lps) -> None:
        """Run the engine's tool/stop state machine on a sampled token and send the row's new text."""
        token, mask = self.engine.calculator.advance(row.state, sampled)  # the one tool state machine, as the CLI's
        row.next_input = token
        stopped = token in self.engine.stop_ids
        text, hit, logprobs = "", False, ()
        if not stopped:
            row.completion_tokens += 1
            text = row.decoder.feed(token)
            k = row.ticket.sampling.logprobs
            if k is not None:
                logprobs = (TokenLogprob(token, 0.0, ((token, 0.0),)) if not mask else TokenLogprob(
                    token, float(lps[0]), tuple(zip(lps[1][:k].tolist(), lps[2][:k].tolist()))),)
        if row.state.done:
            text += row.decoder.flush()
        if row.stop is not None:
            text, hit = row.stop.feed(text)
            if hit:
                row.state.done = True
            elif row.state.done:
                text += row.stop.flush()
        self._count("tokens")
        if text or not stopped:
            self._send(row, Delta(text, 0 if stopped else 1, logprobs))
        if row.state.done:
            self._send(row, Finished("stop" if stopped or hit else "length", len(row.ticket.prompt),
                                     row.completion_tokens, row.ttft_s, time.perf_counter() - row.ticket.submitted))
            if not row.ticket.cancelled:
                self._count("completed")

    def _send(self, row: _Row, event: Event) -> None:
        if row.ticket.cancelled:
            return
        try:
            row.ticket.sink(event)
        except Exception:  # noqa: BLE001 -- a consumer that went away (closed event loop) just ends its row
            log.debug("sink failed; cancelling the request:\n%s", traceback.format_exc())
            row.ticket.cancel()

    def _drop_cancelled(self) -> None:
        for row in self._rows:
            if row.ticket.cancelled and not row.state.done:
                row.state.done = True
                self._count("cancelled")

    def _compact(self) -> None:
        """Free finished rows, moving the last live row into each hole so live rows stay packed at the front."""
        for i in reversed(range(len(self._rows))):
            if not self._rows[i].state.done:
                continue
            last = len(self._rows) - 1
            if i != last:
                self._cache = E.move_row(self._cache, _i32(last), _i32(i))
                self._rows[i] = self._rows[last]
            self._rows.pop()

    def _end_everything(self) -> None:
        """Drain's deadline: every live or waiting request ends now, cleanly, with the text it has."""
        with self._cond:
            waiting = list(self._waiting)
            self._waiting.clear()
        for row in self._rows:
            if not row.state.done and not row.ticket.cancelled:
                text = row.decoder.flush()
                text = (row.stop.feed(text)[0] + row.stop.flush()) if row.stop is not None else text
                if text:
                    self._send(row, Delta(text, 0))
                self._send(row, Finished("shutdown", len(row.ticket.prompt), row.completion_tokens, row.ttft_s,
                                         time.perf_counter() - row.ticket.submitted))
                self._count("cut")
        for ticket in waiting:
            if not ticket.cancelled:
                waited = time.perf_counter() - ticket.submitted
                self._send(_Row(ticket, RowState(0), StreamDecoder(self.tokenizer)),
                           Finished("shutdown", len(ticket.prompt), 0, waited, waited))
                self._count("cut")
        self._rows = []
        self._cache = self._new_cache()
        with self._cond:
            self._cut = False
            self._cond.notify_all()

    def _fail_everything(self, message: str) -> None:
        with self._cond:
            tickets = [r.ticket for r in self._rows] + list(self._waiting)
            self._waiting.clear()
        self._rows = []
        for ticket in tickets:
            if not ticket.cancelled:
                self._count("failed")
                try:
                    ticket.sink(Failed(message))
                except Exception:  # noqa: BLE001
                    pass
        if not self._stopping:
            self._cache = self._new_cache()  # a failed program may have consumed the donated cache

    def _count(self, name: str, n: int = 1) -> None:
        with self._cond:
            self._m[name] += n
