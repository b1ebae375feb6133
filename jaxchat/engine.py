"""Inference: a static-shape KV cache, jitted prefill and decode, per-row sampling, and the calculator tool loop.

Notable features:
- `KVCache` is a small dataclass pytree: k, v of shape (L, B, S, H_kv, D) in the compute dtype (GQA/MQA store only the
  kv heads) and per-row lengths (B,) int32. S and the prompt length are bucketed to powers of two (and the number of
  prompts too), so a handful of compiled programs cover every request; `TRACES` counts traces to prove it.
- The cached forward applies `model.py`'s own pure pieces (project_qkv, relu2_mlp, softcapped_logits, embed) to the
  params dict, adding only the cache writes and masks; tests hold it to `model.forward`.
- Rows are independent: right-padded prompts of different lengths, per-row positions (RoPE at `lengths_b + t`), keys
  masked by position (`j <= pos`, which also hides the padding and anything beyond a row's length), cache writes as a
  scatter that drops out-of-range rows instead of clamping (so a finished row can never overwrite valid keys).
- Prefill runs once per prompt and its K/V are repeated into the N sample rows (nanochat's "prefill once, clone");
  every row samples its own first token. Both jitted programs donate the cache.
- Sampling per row with explicit PRNG keys (one key per row, folded with the step), temperature 0 = argmax, top-k via
  `jax.lax.top_k` with a static upper bound; temperature and top-k are traced arrays, so changing them never recompiles.
- The host loop yields token columns as they come (streaming), stops rows on `<|assistant_end|>`/`<|bos|>`, and runs the
  calculator tool: tokens between `<|python_start|>` and `<|python_end|>` are evaluated by `sandbox.use_calculator` and
  the result is forced in as `<|output_start|>result<|output_end|>` with mask 0.
- Decode attends over a power-of-two bucket of the longest unfinished row (at most the cache), so a step's cost
  follows the live length in steps of two, with a handful of compiled variants.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np

from jaxchat import model
from jaxchat.model import GPTConfig
from jaxchat.sandbox import use_calculator

MIN_PROMPT_BUCKET = 16
MIN_CACHE_BUCKET = 64
DEFAULT_MAX_TOP_K = 256  # static bound of lax.top_k; a row's top_k is any traced value in [1, this]
STOP_TOKENS = ("<|assistant_end|>", "<|bos|>")
TRACES: collections.Counter = collections.Counter()  # program name -> times traced (a Python side effect at trace time)


# ----------------------------------------------------------------------------------------------------------------------
# The cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k_LxBxSxHxD: jax.Array
    v_LxBxSxHxD: jax.Array
    lengths_B: jax.Array  # int32: valid positions per row; the next token of row b goes to position lengths_B[b]

    @classmethod
    def zeros(cls, cfg: GPTConfig, batch: int, max_len: int) -> KVCache:
        shape = (cfg.n_layer, batch, max_len, cfg.n_kv_head, cfg.head_dim)
        dtype = jnp.dtype(cfg.compute_dtype)
        return cls(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k_LxBxSxHxD.shape[2]


def bucket(n: int, minimum: int) -> int:
    """The smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, int(n) - 1).bit_length())


# ----------------------------------------------------------------------------------------------------------------------
# The cached forward: pure functions over model.py's params dict (kernels are (in, out)).


def _dense(p):
    return lambda x: x @ p["kernel"].astype(x.dtype)


def _embed(cfg: GPTConfig, params, tokens_BxT):
    return model.embed(cfg, params["wte"], tokens_BxT)


def _qkv(cfg: GPTConfig, p_attn, x_BxTxD, cos, sin):
    c_q, c_k, c_v = (_dense(p_attn[name]) for name in ("c_q", "c_k", "c_v"))
    return model.project_qkv(cfg, x_BxTxD, c_q, c_k, c_v, cos, sin)


def _attend(cfg: GPTConfig, p_attn, q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask):
    B, T = q_BxTxHxD.shape[:2]
    # Explicit mask: is_causal aligns to the wrong corner when queries < keys (environment.md).
    y = jax.nn.dot_product_attention(q_BxTxHxD, k_BxSxKxD, v_BxSxKxD, mask=mask, implementation="xla")
    return _dense(p_attn["c_proj_attn"])(y.reshape(B, T, cfg.n_head * cfg.head_dim))


def _mlp(p_mlp, x):
    return model.relu2_mlp(x, _dense(p_mlp["c_fc"]), _dense(p_mlp["c_proj_mlp"]))


def _head(cfg: GPTConfig, params, x):
    return model.softcapped_logits(cfg, x, _dense(params["lm_head"]))


def _blocks(params):
    return [params["blocks"][i] for i in range(len(params["blocks"]))]


def forward_prefill(cfg: GPTConfig, params, tokens_BxT, lengths_B, all_logits: bool = False):
    """Prompts from position 0, right-padded. Returns (logits, k, v): logits (B, V) at each row's last valid token
    (or (B, T, V) everywhere when `all_logits`), k/v (L, B, T, H_kv, D)."""
    dtype = jnp.dtype(cfg.compute_dtype)
    B, T = tokens_BxT.shape
    positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    cos, sin = model.rotary_tables(positions_BxT, cfg.head_dim, cfg.rope_base, dtype)
    # Plain causal: a valid query i < length only sees keys j <= i, so the padding needs no mask of its own.
    mask = jnp.tril(jnp.ones((T, T), jnp.bool_))[None, None]
    x = _embed(cfg, params, tokens_BxT)
    ks, vs = [], []
    for p in _blocks(params):
        q, k, v = _qkv(cfg, p["attn"], model.rms_norm(x), cos, sin)
        x = x + _attend(cfg, p["attn"], q, k, v, mask)
        x = x + _mlp(p["mlp"], model.rms_norm(x))
        ks.append(k)
        vs.append(v)
    if not all_logits:  # the head is the biggest matmul at large vocab: run it on the last token only
        x = jnp.take_along_axis(x, (lengths_B - 1)[:, None, None], axis=1)[:, 0]
    return _head(cfg, params, x), jnp.stack(ks), jnp.stack(vs)


def forward_decode(cfg: GPTConfig, params, cache: KVCache, tokens_b, attend_len: int | None = None):
    """One new token for each of the first b = len(tokens_b) rows (all rows, normally) at position `cache.lengths_B`:
    writes its K/V, attends over the row's cache. Returns (logits (b, V), cache with lengths_B[:b] + 1); rows b..
    are untouched.

    A server decodes a power-of-two bucket of its live rows packed at the front of a larger cache, without slicing
    them out and back in (a copy of b rows of every layer, twice per step). `attend_len` (static; default the whole
    cache) limits attention to the first positions, every row's position being below it: decode cost follows the
    keys read, so a server passes a bucket of its longest live row rather than the full context."""
    dtype = jnp.dtype(cfg.compute_dtype)
    b, S = tokens_b.shape[0], attend_len or cache.max_len
    pos_b = cache.lengths_B[:b]
    cos, sin = model.rotary_tables(pos_b[:, None], cfg.head_dim, cfg.rope_base, dtype)
    mask_bx1x1xS = (jnp.arange(S)[None, :] <= pos_b[:, None])[:, None, None, :]
    rows_b = jnp.arange(b)
    k_all, v_all = cache.k_LxBxSxHxD, cache.v_LxBxSxHxD
    x = _embed(cfg, params, tokens_b[:, None])
    for layer, p in enumerate(_blocks(params)):
        q, k, v = _qkv(cfg, p["attn"], model.rms_norm(x), cos, sin)
        # mode="drop": a row past the end of the cache (finished, still being fed) writes nowhere; the default
        # clamping would overwrite its last valid key instead.
        k_all = k_all.at[layer, rows_b, pos_b].set(k[:, 0], mode="drop")
        v_all = v_all.at[layer, rows_b, pos_b].set(v[:, 0], mode="drop")
        x = x + _attend(cfg, p["attn"], q, k_all[layer, :b, :S], v_all[layer, :b, :S], mask_bx1x1xS)
        x = x + _mlp(p["mlp"], model.rms_norm(x))
    return _head(cfg, params, x[:, 0]), KVCache(k_all, v_all, cache.lengths_B.at[:b].add(1))


# ----------------------------------------------------------------------------------------------------------------------
# Sampling


def sample_tokens(logits_BxV, keys_B, temperature_B, top_k_B, max_top_k: int):
    """Per row: temperature 0 → argmax; top_k > 0 → sample among the top k; else sample the full softmax.
    `keys_B` are raw uint32 PRNG keys (B, 2); temperature and top_k are traced (B,) arrays."""
    k_static = min(max_top_k, logits_BxV.shape[-1])

    def one(logits_V, key, temperature, top_k):
        scaled_V = logits_V / jnp.maximum(temperature, 1e-6)  # the max only keeps temperature 0 finite
        vals_K, idx_K = jax.lax.top_k(scaled_V, k_static)
        key_k, key_full = jax.random.split(key)
        in_top_K = jnp.arange(k_static) < top_k
        from_top_k = idx_K[jax.random.categorical(key_k, jnp.where(in_top_K, vals_K, -jnp.inf))]
        from_all = jax.random.categorical(key_full, scaled_V)
        sampled = jnp.where(top_k > 0, from_top_k, from_all)
        return jnp.where(temperature > 0, sampled, jnp.argmax(logits_V)).astype(jnp.int32)

    return jax.vmap(one)(logits_BxV, keys_B, temperature_B, top_k_B)


def _step_keys(keys_B, step):
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys_B, step)


@jax.jit
def row_keys(seeds_B, sample_index_B):
    """One raw PRNG key per row: PRNGKey(seed of its prompt) folded with its sample index."""
    TRACES["row_keys"] += 1
    return jax.vmap(lambda s, i: jax.random.fold_in(jax.random.PRNGKey(s), i))(seeds_B, sample_index_B)


# ----------------------------------------------------------------------------------------------------------------------
# The jitted programs (cfg and the top-k bound are static; everything per request is traced)


@functools.partial(jax.jit, static_argnames=("cfg", "max_top_k"), donate_argnames=("cache",))
def prefill(cfg: GPTConfig, max_top_k: int, params, cache: KVCache, tokens_PxT, lengths_P, keys_B, temperature_B,
            top_k_B):
    """Prefill P prompts once, repeat their K/V into the cache's B = P·N rows, sample each row's first token."""
    TRACES["prefill"] += 1
    P, T = tokens_PxT.shape
    n = cache.k_LxBxSxHxD.shape[1] // P
    logits_PxV, k_LxPxTxHxD, v_LxPxTxHxD = forward_prefill(cfg, params, tokens_PxT, lengths_P)
    dtype = cache.k_LxBxSxHxD.dtype
    k_all = cache.k_LxBxSxHxD.at[:, :, :T].set(jnp.repeat(k_LxPxTxHxD, n, axis=1).astype(dtype))
    v_all = cache.v_LxBxSxHxD.at[:, :, :T].set(jnp.repeat(v_LxPxTxHxD, n, axis=1).astype(dtype))
    logits_BxV = jnp.repeat(logits_PxV, n, axis=0)
    next_B = sample_tokens(logits_BxV, _step_keys(keys_B, 0), temperature_B, top_k_B, max_top_k)
    return next_B, KVCache(k_all, v_all, jnp.repeat(lengths_P, n).astype(jnp.int32))


@functools.partial(jax.jit, static_argnames=("cfg", "max_top_k", "attend_len"), donate_argnames=("cache",))
def decode_step(cfg: GPTConfig, max_top_k: int, params, cache: KVCache, tokens_B, keys_B, step, temperature_B, top_k_B,
                attend_len: int | None = None):
    """Feed one token per row, sample the next one per row. `attend_len` (static): attend over the first positions
    only; every unfinished row's position must be below it."""
    TRACES["decode"] += 1
    logits_BxV, cache = forward_decode(cfg, params, cache, tokens_B, attend_len)
    return sample_tokens(logits_BxV, _step_keys(keys_B, step), temperature_B, top_k_B, max_top_k), cache


# ----------------------------------------------------------------------------------------------------------------------
# The host loop


@dataclasses.dataclass
class RowState:
    """Per-row generation state: tokens still to force (tool output), the python block being collected."""

    max_tokens: int
    generated: int = 0
    done: bool = False
    in_python: bool = False
    python_tokens: list = dataclasses.field(default_factory=list)
    forced: collections.deque = dataclasses.field(default_factory=collections.deque)


class StepOutput(tuple):
    """One token column: `tokens[b]`, `masks[b]` (1 sampled, 0 forced) and `active[b]` (False once row b finished
    before this step: its token is filler to ignore). Unpacks as `tokens, masks, active`."""

    def __new__(cls, tokens: list[int], masks: list[int], active: list[bool]):
        return super().__new__(cls, (tokens, masks, active))

    tokens = property(lambda self: self[0])
    masks = property(lambda self: self[1])
    active = property(lambda self: self[2])


def _per_prompt(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != n:
            raise ValueError(f"{name} has {len(value)} values for {n} prompts; give one value or one per prompt")
        return list(value)
    return [value] * n


class Engine:
    """Generation over a params dict (`model.init`/checkpoint layout) and a Tokenizer.

    Params are cast to the compute dtype once here, so decode reads bf16 weights rather than casting fp32 every step.
    """

    def __init__(self, cfg: GPTConfig, params, tokenizer, *, max_top_k: int = DEFAULT_MAX_TOP_K,
                 min_prompt_bucket: int = MIN_PROMPT_BUCKET, min_cache_bucket: int = MIN_CACHE_BUCKET):
        dtype = jnp.dtype(cfg.compute_dtype)
        self.cfg = cfg
        self.params = jax.tree.map(lambda x: jnp.asarray(x, dtype), params)
        self.tokenizer = tokenizer
        self.max_top_k = min(max_top_k, cfg.vocab_size)
        self.min_prompt_bucket, self.min_cache_bucket = min_prompt_bucket, min_cache_bucket
        self.stop_ids = {tokenizer.special_id(name) for name in STOP_TOKENS}
        self.python_start = tokenizer.special_id("<|python_start|>")
        self.python_end = tokenizer.special_id("<|python_end|>")
        self.output_start = tokenizer.special_id("<|output_start|>")
        self.output_end = tokenizer.special_id("<|output_end|>")
        self.pad_id = tokenizer.bos_id

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
                raise ValueError(f"prompt {i} has token id {bad[0]} outside the model's vocabulary [0, {self.cfg.vocab_size})")
            out.append(p)
        return out

    def _top_k(self, top_k) -> int:
        if top_k is None or top_k <= 0 or top_k >= self.cfg.vocab_size:
            return 0  # no truncation
        if top_k > self.max_top_k:
            raise ValueError(f"top_k={top_k} is above this engine's bound {self.max_top_k}; "
                             f"build it with Engine(..., max_top_k={top_k}) or lower top_k")
        return int(top_k)

    # -- generation

    def generate(self, prompts, num_samples: int = 1, max_tokens=None, temperature=1.0, top_k=None,
                 seed=42) -> Iterator[StepOutput]:
        """Yield one `StepOutput` per step until every row is finished.

        `prompts` is one token list, or a list of token lists (unrelated requests batched together). Rows are
        prompt-major: row p·num_samples + s is sample s of prompt p. `max_tokens`, `temperature`, `top_k` and `seed`
        take one value or one per prompt; max_tokens=None fills the model's sequence_len.
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
        if any(t < 0 for t in temps):
            raise ValueError(f"temperature must be >= 0, got {min(temps)}")
        top_ks = [self._top_k(k) for k in _per_prompt(top_k, n_prompts, "top_k")]
        seeds = [int(s) for s in _per_prompt(seed, n_prompts, "seed")]

        # Buckets: the number of prompts, the prompt length and the cache length are powers of two.
        P = bucket(n_prompts, 1)
        T = bucket(max(lengths), self.min_prompt_bucket)
        S = bucket(max(length + m for length, m in zip(lengths, max_toks)), self.min_cache_bucket)
        tokens_PxT = np.full((P, T), self.pad_id, np.int32)
        lengths_P = np.ones((P,), np.int32)  # padding prompts: one <|bos|>, their rows start finished
        for i, p in enumerate(prompts):
            tokens_PxT[i, :len(p)] = p
            lengths_P[i] = len(p)
        B = P * n
        pad = P - n_prompts
        keys_B = row_keys(np.repeat(np.asarray([s % 2**32 for s in seeds] + [0] * pad, np.uint32), n),
                          np.tile(np.arange(n, dtype=np.uint32), P))
        temperature_B = np.repeat(np.asarray(temps + [0.0] * pad, np.float32), n)
        top_k_B = np.repeat(np.asarray(top_ks + [0] * pad, np.int32), n)
        rows = [RowState(max_toks[b // n]) for b in range(n_prompts * n)]
        rows += [RowState(0, done=True) for _ in range(pad * n)]

        cache = KVCache.zeros(self.cfg, B, S)
        next_B, cache = prefill(self.cfg, self.max_top_k, self.params, cache, tokens_PxT, lengths_P, keys_B,
                                temperature_B, top_k_B)
        step = 0
        while True:
            sampled = np.asarray(next_B)
            column, masks, active = [], [], []
            for b, row in enumerate(rows):
                was_active = not row.done
                token, mask = self.advance(row, int(sampled[b]))
                column.append(token)
                masks.append(mask)
                active.append(was_active)
            yield StepOutput(column[:n_prompts * n], masks[:n_prompts * n], active[:n_prompts * n])
            if all(row.done for row in rows):
                return
            step += 1
            # Attend over a power-of-two bucket of the longest unfinished row, not the whole cache: decode reads
            # every key it attends over, so early steps of a long budget cost what their length needs.
            live = max(lengths[b // n] for b, row in enumerate(rows) if not row.done) + step
            attend = min(S, bucket(live, self.min_cache_bucket))
            next_B, cache = decode_step(self.cfg, self.max_top_k, self.params, cache, np.asarray(column, np.int32),
                                        keys_B, np.int32(step), temperature_B, top_k_B, attend_len=attend)

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

    def generate_batch(self, prompts, num_samples: int = 1, max_tokens=None, temperature=1.0, top_k=None,
                       seed=42) -> tuple[list[list[int]], list[list[int]]]:
        """(token lists, masks): each row is its prompt plus its output, without the terminal stop token; masks are 0
        for the prompt and forced tokens. Rows are prompt-major (see `generate`)."""
        prompts = self._check_prompts(prompts)
        n = num_samples
        results = [list(prompts[b // n]) for b in range(len(prompts) * n)]
        masks = [[0] * len(r) for r in results]
        for tokens, token_masks, active in self.generate(prompts, n, max_tokens, temperature, top_k, seed):
            for b, (token, mask, live) in enumerate(zip(tokens, token_masks, active)):
                if live and token not in self.stop_ids:
                    results[b].append(token)
                    masks[b].append(mask)
        return results, masks
