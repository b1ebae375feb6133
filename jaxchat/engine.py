"""Generation: the one sampler, the jitted prefill/decode programs over the model's cached forward, the calculator.

Everything that generates goes through here: the chat CLI, the chat evaluations, RL rollouts, the trainer's samples
(`Engine.generate`) and the server (web/batcher.py schedules rows over the same programs).

- The cache is `model.KVCache` (per layer (B, H_kv, S, D), lengths per row); the forward is `model.forward_cached`,
  the training forward's own block loop. S and the prompt length are bucketed to powers of two (and the number of
  prompts too), so a handful of compiled programs cover every request; `TRACES` counts traces to prove it.
- `prefill` runs each prompt once and samples its N rows' first tokens; `insert` copies its K/V into those N rows of
  the cache (nanochat's "prefill once, clone"). `decode` feeds one token to each of the first b rows and attends over
  the whole cache, which generation keeps a power-of-two bucket of the longest live row (`resize`, once per bucket):
  a step costs what the live length needs, never a copy of part of the cache. The cache is donated throughout.
- One sampler (`sample_tokens`): per row temperature (0 = argmax), top-k (a static bound for `lax.top_k`, the row's k
  traced) and top-p, all traced, so changing them never recompiles; a batch with every row greedy skips top-k. Each
  row's key is its seed folded with its sample index and then its step, so a seeded request draws the same tokens
  whatever else shares the batch.
- `Calculator` is the tool's state machine: tokens between `<|python_start|>` and `<|python_end|>` are evaluated by
  `sandbox.use_calculator` and the result is forced in as `<|output_start|>result<|output_end|>` (mask 0).
- With a mesh, the weights are replicated on its devices and the cache's rows are split over them, as are the rows of
  `last_logits` and `token_stats` (categorical and CORE scoring): evaluations use every local device.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Iterator
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxchat import model, sharding
from jaxchat.model import GPTConfig, KVCache
from jaxchat.sandbox import use_calculator

MIN_PROMPT_BUCKET = 16
MIN_CACHE_BUCKET = 64
DEFAULT_MAX_TOP_K = 256  # static bound of lax.top_k; a row's top_k is any traced value in [1, this]
MAX_TOP_LOGPROBS = 20  # the most alternatives a step reports (OpenAI's top_logprobs limit); the server asks for these
STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")
TRACES: collections.Counter = collections.Counter()  # program name -> times traced (a Python side effect at trace time)


def bucket(n: int, minimum: int) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


# ----------------------------------------------------------------------------------------------------------------------
# The sampler


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Sampling:
    """Per-row sampling parameters, all traced (B,) arrays."""

    seed: jax.Array  # uint32
    sample: jax.Array  # uint32: the row's sample index among its prompt's rows
    temperature: jax.Array  # float32; 0: greedy
    top_k: jax.Array  # int32; 0: off
    top_p: jax.Array  # float32; 1: off

    @classmethod
    def rows(cls, seed, sample, temperature, top_k, top_p) -> Sampling:
        """From per-row host values (lists or arrays), as the programs take them."""
        return cls(np.asarray(seed, np.uint32), np.asarray(sample, np.uint32), np.asarray(temperature, np.float32),
                   np.asarray(top_k, np.int32), np.asarray(top_p, np.float32))


def _sample_one(k_static: int, logits_V, key, temperature, top_k, top_p):
    # Temperature-scaled; full softmax when top_k = 0 and top_p = 1, else the `k_static` likeliest cut to the row's top
    # k, then to its nucleus (p normalised over the whole vocabulary; the likeliest token always stays).
    scaled_V = logits_V / jnp.maximum(temperature, 1e-6)  # the max only keeps temperature 0 finite
    vals_K, idx_K = jax.lax.top_k(scaled_V, k_static)
    probs_K = jnp.exp(vals_K - jax.nn.logsumexp(scaled_V))
    rank_K = jnp.arange(k_static)
    in_nucleus_K = (top_p >= 1.0) | ((jnp.cumsum(probs_K) - probs_K) < top_p)
    keep_K = (in_nucleus_K & ((top_k <= 0) | (rank_K < top_k))) | (rank_K == 0)
    key_k, key_full = jax.random.split(key)
    truncated = idx_K[jax.random.categorical(key_k, jnp.where(keep_K, vals_K, -jnp.inf))]
    full = jax.random.categorical(key_full, scaled_V)
    return jnp.where((top_k <= 0) & (top_p >= 1.0), full, truncated).astype(jnp.int32)


class Sampled(NamedTuple):
    """What a step drew per row: the tokens and, when asked for (`top_logprobs` not None), their log-probabilities
    under the model (log-softmax of its logits, before temperature or truncation: what the model thinks, not what
    the sampler was allowed) with the K likeliest alternatives, likeliest first."""

    tokens: jax.Array  # (B,) int32
    logprob: jax.Array | None = None  # (B,) float32
    top_ids: jax.Array | None = None  # (B, K) int32
    top_logprobs: jax.Array | None = None  # (B, K) float32


def sample_step(logits_BxV, steps_B, s: Sampling, max_top_k: int, top_logprobs: int | None) -> Sampled:
    tokens_B = sample_tokens(logits_BxV, steps_B, s, max_top_k)
    if top_logprobs is None:
        return Sampled(tokens_B)
    logp_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp_BxV, top_logprobs)
    logprob_B = jnp.take_along_axis(logp_BxV, tokens_B[:, None], axis=-1)[:, 0]
    return Sampled(tokens_B, logprob_B, top_ids.astype(jnp.int32), top_lp)


def sample_tokens(logits_BxV, steps_B, s: Sampling, max_top_k: int):
    """One token per row. Rows at temperature 0 take the argmax; when all do, nothing else is computed."""
    greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)

    def sampled():
        keys = jax.vmap(lambda seed, i, step: jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), i), step))
        keys_B = keys(s.seed, s.sample, steps_B)
        one = functools.partial(_sample_one, min(max_top_k, logits_BxV.shape[-1]))
        drawn_B = jax.vmap(one)(logits_BxV, keys_B, s.temperature, s.top_k, s.top_p)
        return jnp.where(s.temperature > 0, drawn_B, greedy_B)

    return jax.lax.cond(jnp.all(s.temperature <= 0), lambda: greedy_B, sampled)


# ----------------------------------------------------------------------------------------------------------------------
# The jitted programs (cfg and the top-k bound are static; everything per request is traced)


@functools.partial(jax.jit, static_argnames=("cfg", "max_top_k", "top_logprobs"))
def prefill(cfg: GPTConfig, max_top_k: int, params, tokens_PxT, lengths_P, s: Sampling,
            top_logprobs: int | None = None):
    """Run P right-padded prompts once into a cache of their own (P rows, T positions) and sample the first token of
    each of their R = P·N rows (N = R/P samples per prompt; R: the rows `s` describes). Returns (`Sampled` for R rows,
    that cache), which `insert` copies into the generation cache."""
    TRACES["prefill"] += 1
    P, T = tokens_PxT.shape
    n = s.seed.shape[0] // P
    logits_PxV, fresh = model.forward_cached(model.graphdef(cfg), params, tokens_PxT, KVCache.zeros(cfg, P, T),
                                             last_B=lengths_P - 1)
    fresh = KVCache(fresh.k, fresh.v, lengths_P, tokens_PxT[jnp.arange(P), lengths_P - 1])  # right-padded rows
    return sample_step(jnp.repeat(logits_PxV, n, axis=0), jnp.zeros((P * n,), jnp.int32), s, max_top_k,
                       top_logprobs), fresh


@functools.partial(jax.jit, static_argnames=("n",), donate_argnames=("cache",))
def insert(cache: KVCache, fresh: KVCache, row0, n: int = 1):
    """Each of `fresh`'s rows copied into n consecutive rows of the cache from `row0` (positions 0..T-1): nanochat's
    "prefill once, clone". One slice write per layer (consecutive rows; arbitrary ones would take a scatter)."""
    TRACES["insert"] += 1
    at = (row0, 0, 0, 0)

    def copy(big, small):
        return jax.lax.dynamic_update_slice(big, jnp.repeat(small, n, axis=0), at)

    rows = lambda big, small: jax.lax.dynamic_update_slice(big, jnp.repeat(small, n), (row0,))  # noqa: E731
    return KVCache(tuple(map(copy, cache.k, fresh.k)), tuple(map(copy, cache.v, fresh.v)),
                   rows(cache.lengths_B, fresh.lengths_B), rows(cache.last_tokens_B, fresh.last_tokens_B))


@functools.partial(jax.jit, static_argnames=("max_len",))
def resize(cache: KVCache, max_len: int) -> KVCache:
    """The cache with room for `max_len` positions: padded, or cut to its first `max_len` (which must hold every live
    position). Decode attends over the whole cache, so generation keeps it a power-of-two bucket of the live length:
    a copy each time that bucket changes, where attending over a slice of a larger cache copies the slice every step
    (on this CPU a 64-row step over half of a 512-position cache took 4x the whole cache's time)."""
    TRACES["resize"] += 1
    S = cache.max_len

    def fit(x):
        return jnp.pad(x, ((0, 0), (0, 0), (0, max_len - S), (0, 0))) if max_len > S else x[:, :, :max_len]

    return KVCache(tuple(map(fit, cache.k)), tuple(map(fit, cache.v)), cache.lengths_B, cache.last_tokens_B)


@functools.partial(jax.jit, static_argnames=("cfg", "max_top_k", "top_logprobs"), donate_argnames=("cache",))
def decode(cfg: GPTConfig, max_top_k: int, params, cache: KVCache, tokens_b, steps_b, s: Sampling,
           top_logprobs: int | None = None):
    """Feed one token to each of the first b rows and sample the next (`Sampled`); every row's position must be inside
    the cache."""
    TRACES["decode"] += 1
    logits_bxV, cache = model.forward_cached(model.graphdef(cfg), params, tokens_b[:, None], cache,
                                             last_B=jnp.zeros_like(tokens_b))
    return sample_step(logits_bxV, steps_b, s, max_top_k, top_logprobs), cache


@functools.partial(jax.jit, donate_argnames=("cache",))
def move_row(cache: KVCache, src, dst):
    """Row `src` copied over row `dst` (a server keeps its live rows packed at the front)."""
    TRACES["move_row"] += 1
    move = lambda x: x.at[dst].set(x[src])  # noqa: E731
    return KVCache(tuple(map(move, cache.k)), tuple(map(move, cache.v)), move(cache.lengths_B),
                   move(cache.last_tokens_B))


@functools.lru_cache(maxsize=32)
def _zeros(cfg: GPTConfig, batch: int, max_len: int, kv_sharding, rows_sharding):
    """A program making an empty cache where it will live (no host copy, no device-to-device move)."""
    out = None if kv_sharding is None else KVCache((kv_sharding,) * cfg.n_layer, (kv_sharding,) * cfg.n_layer,
                                                   rows_sharding, rows_sharding)
    return jax.jit(lambda: KVCache.zeros(cfg, batch, max_len), out_shardings=out)


@functools.partial(jax.jit, static_argnames=("cfg",))
def last_logits(cfg: GPTConfig, params, tokens_BxT, lengths_B):
    """Logits (B, V) at each right-padded row's last token (categorical evaluation)."""
    TRACES["last_logits"] += 1
    return model.forward(model.graphdef(cfg), params, tokens_BxT, last_B=lengths_B - 1)


@functools.partial(jax.jit, static_argnames=("cfg",))
def token_stats(cfg: GPTConfig, params, tokens_BxT):
    """Per position (B, T): the loss of each token given those before it, and whether it was the argmax (CORE's
    scores); 0 and False at position 0. Only (B, T) leaves the devices, never (B, T, V) logits."""
    TRACES["token_stats"] += 1
    logits_BxTxV = model.forward(model.graphdef(cfg), params, tokens_BxT)[:, :-1]
    nxt_BxT = tokens_BxT[:, 1:]
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits_BxTxV, axis=-1), nxt_BxT[..., None], axis=-1)[..., 0]
    match = jnp.argmax(logits_BxTxV, axis=-1) == nxt_BxT
    return jnp.pad(nll, ((0, 0), (1, 0))), jnp.pad(match, ((0, 0), (1, 0)))


# ----------------------------------------------------------------------------------------------------------------------
# The calculator tool


@dataclasses.dataclass
class RowState:
    """Per-row generation state: tokens still to force (tool output), the python block being collected."""

    max_tokens: int
    generated: int = 0
    done: bool = False
    in_python: bool = False
    python_tokens: list = dataclasses.field(default_factory=list)
    forced: collections.deque = dataclasses.field(default_factory=collections.deque)


class Calculator:
    """The tool's state machine over one row's tokens, and when a row stops."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.stop_ids = {tokenizer.special_id(name) for name in STOP_TOKENS}
        names = ("python_start", "python_end", "output_start", "output_end")
        self.python_start, self.python_end, self.output_start, self.output_end = (
            tokenizer.special_id(f"<|{name}|>") for name in names)

    def advance(self, row: RowState, sampled: int) -> tuple[int, int]:
        """Choose row's token (forced tool output first), update its tool and stop state; return (token, mask)."""
        if row.done:
            return sampled, 0  # filler: the row's cache position is past its end and its output is complete
        forced = bool(row.forced)
        token = row.forced.popleft() if forced else sampled
        row.generated += 1
        if token in self.stop_ids or row.generated >= row.max_tokens:
            row.done = True
        if token == self.python_start:
            row.in_python, row.python_tokens = True, []
        elif token == self.python_end and row.in_python:
            row.in_python = False
            if row.python_tokens:
                result = use_calculator(self.tokenizer.decode(row.python_tokens))
                if result is not None:
                    row.forced.extend([self.output_start, *self.tokenizer.encode(str(result)), self.output_end])
            row.python_tokens = []
        elif row.in_python:
            row.python_tokens.append(token)
        return token, 0 if forced else 1


# ----------------------------------------------------------------------------------------------------------------------
# The host loop


class StepOutput(NamedTuple):
    """One token column: `tokens[b]`, `masks[b]` (1 sampled, 0 forced) and `active[b]` (False once row b finished
    before this step: its token is filler to ignore)."""

    tokens: list[int]
    masks: list[int]
    active: list[bool]


def _per_prompt(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} prompts; give one value or one per prompt")
        return list(value)
    return [value] * n


class Engine:
    """Generation with one model's weights (a params dict, `model.init`/checkpoint layout) and a Tokenizer.

    The weights are cast to the compute dtype once here, so decode reads bf16 rather than casting fp32 every step.
    With a `mesh` they are replicated on its devices and every cache's rows are split over them (rows that do not
    divide evenly stay replicated)."""

    def __init__(self, cfg: GPTConfig, params, tokenizer, *, mesh=None, max_top_k: int = DEFAULT_MAX_TOP_K,
                 min_prompt_bucket: int = MIN_PROMPT_BUCKET, min_cache_bucket: int = MIN_CACHE_BUCKET):
        dtype = jnp.dtype(cfg.compute_dtype)
        cfg = dataclasses.replace(cfg, fp8=False)  # fp8 is for training; inference and evaluation stay in bf16
        self.cfg, self.tokenizer, self.mesh = cfg, tokenizer, mesh
        params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
        self.params = params if mesh is None else jax.device_put(params, sharding.replicated(mesh))
        self.max_top_k = min(max_top_k, cfg.vocab_size)
        self.min_prompt_bucket, self.min_cache_bucket = min_prompt_bucket, min_cache_bucket
        self.calculator = Calculator(tokenizer)
        self.stop_ids = self.calculator.stop_ids
        self.pad_id = tokenizer.bos_id

    # -- the programs, bound to this engine's weights

    def rows_sharding(self, shape):
        """Where an array whose leading axis is rows lives: split over the mesh's devices, or None (default device)."""
        if self.mesh is None:
            return None
        spec = sharding.spec_for(("batch",) + (None,) * (len(shape) - 1), shape, self.mesh)
        return jax.sharding.NamedSharding(self.mesh, spec)

    def new_cache(self, batch: int, max_len: int) -> KVCache:
        shape = (batch, self.cfg.n_kv_head, max_len, self.cfg.head_dim)
        return _zeros(self.cfg, batch, max_len, self.rows_sharding(shape), self.rows_sharding((batch,)))()

    def _rows(self, x):
        return x if self.mesh is None else jax.device_put(x, self.rows_sharding(np.shape(x)))

    def prefill(self, tokens_PxT, lengths_P, s: Sampling, top_logprobs: int | None = None):
        return prefill(self.cfg, self.max_top_k, self.params, self._rows(np.asarray(tokens_PxT, np.int32)),
                       np.asarray(lengths_P, np.int32), s, self.check_top_logprobs(top_logprobs))

    def decode(self, cache: KVCache, tokens_b, steps_b, s: Sampling, top_logprobs: int | None = None):
        return decode(self.cfg, self.max_top_k, self.params, cache, np.asarray(tokens_b, np.int32),
                      np.asarray(steps_b, np.int32), s, self.check_top_logprobs(top_logprobs))

    def fit_cache(self, cache: KVCache, live: int, most: int) -> KVCache:
        """The cache resized to the bucket of `live` positions (at most `most`), one power of two at a time (so a
        server compiles only the neighbouring sizes)."""
        want = min(most, bucket(live, self.min_cache_bucket))
        while cache.max_len != want:
            cache = resize(cache, cache.max_len * 2 if want > cache.max_len else cache.max_len // 2)
        return cache

    def last_logits(self, tokens_BxT, lengths_B) -> np.ndarray:
        """(B, V) float32 logits at each row's last token, on the host (rows split over the mesh, if any)."""
        tokens = self._rows(np.asarray(tokens_BxT, np.int32))
        return np.asarray(last_logits(self.cfg, self.params, tokens, self._rows(np.asarray(lengths_B, np.int32))),
                          np.float32)

    def token_stats(self, tokens_BxT) -> tuple[np.ndarray, np.ndarray]:
        """`token_stats` on the host: (loss, match) per position (B, T), rows split over the mesh, if any."""
        nll, match = token_stats(self.cfg, self.params, self._rows(np.asarray(tokens_BxT, np.int32)))
        return np.asarray(nll), np.asarray(match)

    # -- validation

    def _check_prompts(self, prompts) -> list[list[int]]:
        if not prompts:
            raise ValueError("no prompts given")
        if isinstance(prompts[0], (int, np.integer)):
            prompts = [prompts]  # one prompt
        out = []
        for i, p in enumerate(prompts):
            p = [int(t) for t in p]
            if not p:
                raise ValueError(f"prompt {i} is empty; start it with the <|bos|> token ({self.tokenizer.bos_id})")
            bad = [t for t in p if not 0 <= t < self.cfg.vocab_size]
            if bad:
                raise ValueError(f"prompt {i} has token id {bad[0]} outside the model's vocabulary "
                                 f"[0, {self.cfg.vocab_size})")
            out.append(p)
        return out

    def check_top_k(self, top_k) -> int:
        """A request's top_k as the programs take it (0: no truncation), or ValueError above the static bound."""
        if top_k is None or top_k <= 0 or top_k >= self.cfg.vocab_size:
            return 0
        if top_k > self.max_top_k:
            raise ValueError(f"top_k={top_k} is above this engine's bound {self.max_top_k}; "
                             f"build it with Engine(..., max_top_k={top_k}) or lower top_k")
        return int(top_k)

    def check_top_logprobs(self, k: int | None) -> int | None:
        if k is not None and not 0 <= k <= min(MAX_TOP_LOGPROBS, self.cfg.vocab_size):
            raise ValueError(f"top_logprobs must be in [0, {min(MAX_TOP_LOGPROBS, self.cfg.vocab_size)}], got {k}")
        return k

    # -- generation

    def generate(self, prompts, num_samples: int = 1, max_tokens=None, temperature=1.0, top_k=None, top_p=1.0,
                 seed=42) -> Iterator[StepOutput]:
        """Yield one `StepOutput` per step until every row is finished.

        `prompts` is one token list, or a list of token lists (unrelated requests batched together). Rows are
        prompt-major: row p·num_samples + s is sample s of prompt p. `max_tokens`, `temperature`, `top_k`, `top_p`
        and `seed` take one value or one per prompt; max_tokens=None fills the model's sequence_len.
        """
        prompts = self._check_prompts(prompts)
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        n_prompts, n = len(prompts), num_samples
        lengths = [len(p) for p in prompts]
        max_toks = [self.cfg.sequence_len - length if m is None else int(m)
                    for m, length in zip(_per_prompt(max_tokens, n_prompts, "max_tokens"), lengths)]
        for i, (m, length) in enumerate(zip(max_toks, lengths)):
            if m < 1:
                raise ValueError(f"prompt {i} has {length} tokens, leaving no room for max_tokens={m} "
                                 f"(sequence_len {self.cfg.sequence_len}); shorten it or pass max_tokens")
        temps = [float(t) for t in _per_prompt(temperature, n_prompts, "temperature")]
        top_ps = [float(p) for p in _per_prompt(top_p, n_prompts, "top_p")]
        if any(t < 0 for t in temps) or not all(0 <= p <= 1 for p in top_ps):
            raise ValueError(f"need temperature >= 0 and 0 <= top_p <= 1, got {temps} and {top_ps}")
        top_ks = [self.check_top_k(k) for k in _per_prompt(top_k, n_prompts, "top_k")]
        seeds = [int(s) % 2**32 for s in _per_prompt(seed, n_prompts, "seed")]

        # Buckets: the number of prompts, the prompt length and the cache length are powers of two.
        P = bucket(n_prompts, 1)
        T = bucket(max(lengths), self.min_prompt_bucket)
        S = bucket(max(length + m for length, m in zip(lengths, max_toks)), self.min_cache_bucket)
        tokens_PxT = np.full((P, T), self.pad_id, np.int32)
        lengths_P = np.ones((P,), np.int32)  # padding prompts: one <|bos|>, their rows start finished
        for i, p in enumerate(prompts):
            tokens_PxT[i, :len(p)] = p
            lengths_P[i] = len(p)
        B, pad = P * n, P - n_prompts
        per_row = lambda values, filler: np.repeat(np.asarray(values + [filler] * pad), n)  # noqa: E731
        s = Sampling.rows(per_row(seeds, 0), np.tile(np.arange(n), P), per_row(temps, 0.0), per_row(top_ks, 0),
                          per_row(top_ps, 1.0))
        rows = [RowState(max_toks[b // n]) for b in range(n_prompts * n)]
        rows += [RowState(0, done=True) for _ in range(pad * n)]

        (next_B, *_), fresh = self.prefill(tokens_PxT, lengths_P, s)
        # The cache grows with the longest unfinished row, a power-of-two bucket at a time (`resize`): decode reads
        # every cached key, so early steps of a long budget cost what their length needs.
        cache = insert(self.new_cache(B, min(S, bucket(T, self.min_cache_bucket))), fresh, np.int32(0), n)
        step = 0
        while True:
            sampled = np.asarray(next_B)
            column, masks, active = [], [], []
            for b, row in enumerate(rows):
                was_active = not row.done
                token, mask = self.calculator.advance(row, int(sampled[b]))
                column.append(token)
                masks.append(mask)
                active.append(was_active)
            yield StepOutput(column[:n_prompts * n], masks[:n_prompts * n], active[:n_prompts * n])
            if all(row.done for row in rows):
                return
            step += 1
            live = max(lengths[b // n] for b, row in enumerate(rows) if not row.done) + step
            cache = self.fit_cache(cache, live, S)
            (next_B, *_), cache = self.decode(cache, column, np.full((B,), step), s)

    def generate_batch(self, prompts, num_samples: int = 1, max_tokens=None, temperature=1.0, top_k=None,
                       top_p=1.0, seed=42) -> tuple[list[list[int]], list[list[int]]]:
        """(token lists, masks): each row is its prompt plus its output, without the terminal stop token; masks are 0
        for the prompt and forced tokens. Rows are prompt-major (see `generate`)."""
        prompts = self._check_prompts(prompts)
        n = num_samples
        results = [list(prompts[b // n]) for b in range(len(prompts) * n)]
        masks = [[0] * len(r) for r in results]
        for tokens, token_masks, active in self.generate(prompts, n, max_tokens, temperature, top_k, top_p, seed):
            for b, (token, mask, live) in enumerate(zip(tokens, token_masks, active)):
                if live and token not in self.stop_ids:
                    results[b].append(token)
                    masks[b].append(mask)
        return results, masks
