"""The jaxchat GPT: nanochat's October 2025 model, in Flax NNX.

Notable features (all as the reference):
- rotary embeddings (base 10,000, split halves, tables in bf16), applied *before* QK-norm
- QK-norm: parameter-free RMSNorm of queries and keys over the head dimension
- grouped-query attention: `n_kv_head` divides `n_head` (MHA, GQA, MQA); K/V are broadcast inside
  `jax.nn.dot_product_attention`, never repeated in memory
- ReLU² MLP (4x), no biases anywhere, untied embedding and head
- parameter-free RMSNorm after the embedding, before each sub-block and before the head
- logits soft-capped at 15·tanh(x/15), computed in fp32
- init: fan-in scaled normal (std 1/sqrt(in) · min(1, sqrt(out/in))), embedding N(0, 1), and zeros for the attention and
  MLP output projections and the head, so every block starts as the identity and the first logits are uniform
- fp32 master weights, bf16 compute (each forward casts the weight matrices once, still sharded, so FSDP gathers
  bf16: `compute_params`), fp32 loss

The 2026 recipe's options (nanochat's time-to-GPT-2 model), each a `GPTConfig` field that is off by default: sliding
windows per layer (`window_pattern`), gated value embeddings on alternating layers, smear (the previous token's
embedding mixed in; decode recomputes it from the cache's last token), backout, per-layer resid/x0 scalars, q/k scaled
after QK-norm, the vocabulary padded to a multiple, and the 2026 initialisation (`initialisers`).

Kernels are stored (in, out) as in `x @ W`; the optimizer's shape rules know this (see muon.py).
The training path is functional: `nnx.split` once, then `forward(graphdef, params, ...)` merges inside the jitted loss.
One block loop (`GPT.hidden`) serves training, prefill and decode: given a `KVCache` (per layer (B, H_kv, S, D), the
layout decode reads fastest) the same forward writes the new tokens' K/V and attends over the cache
(`forward_cached`); engine.py builds the generation programs on it.
Memory (config `remat`, `loss_chunk`): per-block rematerialisation (`remat_block`), and a cross-entropy that never
holds the whole batch's logits (`chunked_token_losses`, behind `forward_losses`, the one path of every loss).
`PARAM_AXES` names each parameter's logical axes by its full path; sharding.py maps them onto the mesh.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxchat import sharding

# Logical axes of every parameter, by its full path in the params tree ("*" stands for a layer's index). The model
# never names mesh axes: sharding.py maps these onto the mesh. A parameter missing here is an error, not a guess.
PARAM_AXES = {
    ("wte",): ("vocab", "embed"),
    ("blocks", "*", "attn", "c_q", "kernel"): ("embed", "heads"),
    ("blocks", "*", "attn", "c_k", "kernel"): ("embed", "kv_heads"),
    ("blocks", "*", "attn", "c_v", "kernel"): ("embed", "kv_heads"),
    ("blocks", "*", "attn", "c_proj", "kernel"): ("heads", "embed"),
    ("blocks", "*", "mlp", "c_fc", "kernel"): ("embed", "mlp"),
    ("blocks", "*", "mlp", "c_proj", "kernel"): ("mlp", "embed"),
    ("lm_head", "kernel"): ("embed", "vocab"),
    ("value_embeds", "*"): ("vocab", "embed"),  # split like wte (FSDP on its width): 604M parameters at d24
    ("blocks", "*", "attn", "ve_gate", "kernel"): (None, "kv_heads"),
    ("smear_gate", "kernel"): (None, None),
    ("smear_lambda",): (None,),
    ("backout_lambda",): (None,),
    ("resid_lambdas",): (None,),
    ("x0_lambdas",): (None,),
}


def param_axes(path) -> tuple[str, ...]:
    """The logical axes of the parameter at `path` (a jax key path or a tuple of names)."""
    names = tuple("*" if n.isdigit() else n for n in sharding.path_names(path))
    if names not in PARAM_AXES:
        raise KeyError(f"no logical axes for parameter {'/'.join(names)}; add it to model.PARAM_AXES")
    return PARAM_AXES[names]


@dataclasses.dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int
    sequence_len: int
    rope_base: float = 10000.0
    softcap: float = 15.0
    compute_dtype: str = "bfloat16"
    attention: str = "xla"  # one of ATTENTION_IMPLS
    remat: str = "none"  # one of REMAT_POLICIES: what each block keeps for the backward pass
    loss_chunk: int = 0  # positions of every row per step of the chunked cross-entropy; 0: whole rows at once
    # The 2026 recipe's model (nanochat's time-to-GPT-2 record); each default is October 2025's.
    window_pattern: str = "L"  # tiled over the layers, the last one long: "L" the whole context, "S" a quarter of it
    value_embeds: bool = False  # ResFormer value embeddings, gated, on alternating layers ending with the last
    smear: bool = False  # each token's embedding mixes in the previous token's, through a gate
    backout: bool = False  # a learned share of the middle layer's residual is taken out before the head
    layer_scalars: bool = False  # before block i: x = resid_lambdas[i]·x + x0_lambdas[i]·x0 (x0: the embedding)
    qk_scale: float = 1.0  # q and k are multiplied by it after QK-norm
    vocab_multiple: int = 1  # the embedding and head rows are padded to a multiple of it; logits are cut back
    init: str = "2025"  # or "2026": the record's initialisation
    rope_bf16: bool = True  # the rotary tables rounded to bf16 whatever the compute dtype (October; 2026: not)
    fp8: bool = False  # training matmuls of the block matrices and the head in fp8 (`fp8_matmul`); GPUs only gain

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def padded_vocab(self) -> int:
        return -(-self.vocab_size // self.vocab_multiple) * self.vocab_multiple

    def window(self, layer: int) -> int:
        """Keys before its own a query at this layer sees; 0: all of them. "S" is ceil(T/4/128)·128 (T =
        sequence_len), 512 at 2,048; the last layer is always long."""
        kind = "L" if layer == self.n_layer - 1 else self.window_pattern.upper()[layer % len(self.window_pattern)]
        return 0 if kind == "L" else math.ceil(self.sequence_len / 4 / 128) * 128

    def has_value_embed(self, layer: int) -> bool:
        return self.value_embeds and layer % 2 == (self.n_layer - 1) % 2


def rms_norm(x):
    """Parameter-free RMSNorm in fp32; eps is the input dtype's machine epsilon, as torch's F.rms_norm default."""
    x32 = x.astype(jnp.float32)
    eps = jnp.finfo(x.dtype).eps
    return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)).astype(x.dtype)


def rotary_tables(positions_BxT, head_dim: int, base: float, dtype, table_dtype=jnp.bfloat16):
    """cos/sin of shape (B, T, 1, head_dim/2), rounded to `table_dtype` (October's reference keeps them in bf16 even
    when computing in fp32; its 2026 version keeps them in the compute dtype)."""
    inv_freq = 1.0 / base ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles_BxTxF = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    cos = jnp.cos(angles_BxTxF).astype(table_dtype).astype(dtype)
    sin = jnp.sin(angles_BxTxF).astype(table_dtype).astype(dtype)
    return cos[:, :, None, :], sin[:, :, None, :]


def apply_rotary(x_BxTxHxD, cos, sin):
    """Split-halves rotation: y1 = x1·cos + x2·sin, y2 = −x1·sin + x2·cos (the reference's sign convention)."""
    half = x_BxTxHxD.shape[-1] // 2
    x1, x2 = x_BxTxHxD[..., :half], x_BxTxHxD[..., half:]
    return jnp.concatenate([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], axis=-1)


def relu2(x):
    return jnp.square(jax.nn.relu(x))


def softcapped_logits(cfg, x, lm_head):
    logits = lm_head(rms_norm(x))[..., :cfg.vocab_size].astype(jnp.float32)  # padded rows are never predicted
    return cfg.softcap * jnp.tanh(logits / cfg.softcap)


def embed(cfg, wte, idx_BxT):
    # Gather the fp32 rows first, then cast: the same forward as casting the table, but the backward becomes an fp32
    # scatter-add of the rows' cotangents. Casting the whole table first would make it a bf16 scatter-add, where a
    # frequent token's gradient (summed over thousands of positions) loses ~5% of its value to rounding.
    return rms_norm(wte[idx_BxT].astype(jnp.dtype(cfg.compute_dtype)))


def matmul(x_NxI, w_IxO, fp8: bool = False):
    """`x @ w` over x's leading axes flattened to one (in fp8 when asked). The same numbers; but the autodiff weight
    gradient of a 3-D `x @ w` contracts two axes at once, and XLA's CPU backend then copies each activation gradient
    into a transposed layout first (25 copies, ~170 MB per tiny step): flattened, the tiny step runs 20% faster on one
    core (bench/profile_step.py). GPU backends flatten these matmuls anyway."""
    x_2d = x_NxI.reshape(-1, x_NxI.shape[-1])
    y = fp8_matmul(x_2d, w_IxO) if fp8 else x_2d @ w_IxO
    return y.reshape(*x_NxI.shape[:-1], w_IxO.shape[-1])


# fp8 (the 2026 record's --fp8, as torchao's tensorwise Float8Linear): each operand scaled so its largest magnitude
# lands on its format's largest, e4m3 for activations and weights, e5m2 for gradients; the product is computed as
# dot(dequantised, dequantised), the pattern XLA's GPU GEMM rewriter turns into one cuBLASLt FP8 GEMM on Hopper and
# later (elsewhere it is computed in the activation dtype, with fp8's rounding: the same numbers, no speed).
FP8_MAX = {jnp.dtype(jnp.float8_e4m3fn): 448.0, jnp.dtype(jnp.float8_e5m2): 57344.0}


def fp8_supported(device) -> tuple[bool, str]:
    """(whether `device` has FP8 GEMMs, why): NVIDIA GPUs of compute capability 8.9 and later."""
    if device.platform != "gpu":
        return False, f"no FP8 GEMMs on {device.platform}"
    capability = str(getattr(device, "compute_capability", "0"))
    if tuple(int(p) for p in capability.split(".")[:2]) < (8, 9):
        return False, f"{device.device_kind} (compute capability {capability}) has no FP8 GEMMs; 8.9 and later do"
    return True, f"{device.device_kind} (compute capability {capability})"


def fp8_eligible(d_in: int, d_out: int) -> bool:
    """The layers the record computes in fp8: both sides multiples of 16, the smaller at least 128 (not the gates)."""
    return d_in % 16 == 0 and d_out % 16 == 0 and min(d_in, d_out) >= 128


def _to_fp8(x, dtype):
    scale = FP8_MAX[jnp.dtype(dtype)] / jnp.maximum(jnp.max(jnp.abs(x)).astype(jnp.float32), 1e-12)
    return (x.astype(jnp.float32) * scale).astype(dtype), scale


def _fp8_dot(a8, a_scale, b8, b_scale, out_dtype):
    deq = lambda x8, s: x8.astype(out_dtype) * (1.0 / s).astype(out_dtype)  # noqa: E731
    return jnp.dot(deq(a8, a_scale), deq(b8, b_scale), preferred_element_type=jnp.float32).astype(out_dtype)


@jax.custom_vjp
def fp8_matmul(x_NxI, w_IxO):
    """`x @ w` (2-D) with both operands in e4m3; its backward takes the gradient in e5m2 against the saved fp8
    operands (one byte per activation kept for the backward, not two)."""
    return _fp8_matmul_fwd(x_NxI, w_IxO)[0]


def _fp8_matmul_fwd(x, w):
    x8, sx = _to_fp8(x, jnp.float8_e4m3fn)
    w8, sw = _to_fp8(w, jnp.float8_e4m3fn)
    return _fp8_dot(x8, sx, w8, sw, x.dtype), (x8, sx, w8, sw, jnp.zeros((), w.dtype))


def _fp8_matmul_bwd(res, g):
    x8, sx, w8, sw, w_like = res
    g8, sg = _to_fp8(g, jnp.float8_e5m2)
    return _fp8_dot(g8, sg, w8.T, sw, g.dtype), _fp8_dot(x8.T, sx, g8, sg, w_like.dtype)


fp8_matmul.defvjp(_fp8_matmul_fwd, _fp8_matmul_bwd)


VE_GATE_CHANNELS = 12  # the value-embedding gate reads this many channels of the block's normed input
SMEAR_GATE_CHANNELS = 24  # the smear gate reads this many channels of each token's embedding


def fan_in_normal(key, shape):
    # arXiv 2310.17813 (October's init): scale by fan-in, and shrink further for layers that narrow the width.
    d_in, d_out = shape
    return 1.0 / math.sqrt(d_in) * min(1.0, math.sqrt(d_out / d_in)) * jax.random.normal(key, shape, jnp.float32)


def uniform(lo: float, hi: float):
    return lambda key, shape: jax.random.uniform(key, shape, jnp.float32, lo, hi)


def normal(std: float):
    return lambda key, shape: std * jax.random.normal(key, shape, jnp.float32)


def initialisers(cfg: GPTConfig) -> dict:
    """The weights' initialisers by role; None: zeros (which draws no key, so October's draws stay in order). 2026:
    U(±s) with s = sqrt(3/d) (std 1/sqrt(d)) for q, k, v and the value embeddings, 0.4·s for the MLP's c_fc, the
    embedding N(0, 0.8²), the head N(0, 0.001²); the output projections zero in both."""
    s = math.sqrt(3 / cfg.n_embd)
    added = {"ve": uniform(-s, s), "gate": uniform(0.0, 0.02)}  # the 2026 weights October does not have
    if cfg.init == "2026":
        return {"qkv": uniform(-s, s), "fc": uniform(-0.4 * s, 0.4 * s), "wte": normal(0.8), "head": normal(0.001),
                **added}
    if cfg.init != "2025":
        raise ValueError(f"init must be 2025 or 2026, got {cfg.init!r}")
    # The untrained October model is the embedding alone (zero projections) with a uniform first prediction (zero head).
    return {"qkv": fan_in_normal, "fc": fan_in_normal, "wte": normal(1.0), "head": None, **added}


class Linear(nnx.Module):
    """A bias-free linear layer with an fp32 (in, out) kernel, cast to the activation dtype at use."""

    def __init__(self, d_in: int, d_out: int, init=None, *, fp8: bool = False, rngs: nnx.Rngs):
        shape = (d_in, d_out)
        self.kernel = nnx.Param(jnp.zeros(shape, jnp.float32) if init is None else init(rngs.params(), shape))
        self.fp8 = fp8 and fp8_eligible(d_in, d_out)

    def __call__(self, x):
        return matmul(x, self.kernel[...].astype(x.dtype), self.fp8)


class Attention(nnx.Module):
    def __init__(self, cfg: GPTConfig, layer: int, *, rngs: nnx.Rngs):
        d, hd, init = cfg.n_embd, cfg.head_dim, initialisers(cfg)
        self.cfg, self.window = cfg, cfg.window(layer)
        self.c_q = Linear(d, cfg.n_head * hd, init["qkv"], fp8=cfg.fp8, rngs=rngs)
        self.c_k = Linear(d, cfg.n_kv_head * hd, init["qkv"], fp8=cfg.fp8, rngs=rngs)
        self.c_v = Linear(d, cfg.n_kv_head * hd, init["qkv"], fp8=cfg.fp8, rngs=rngs)
        # Zero-init so each residual branch starts as a no-op.
        self.c_proj = Linear(cfg.n_head * hd, d, fp8=cfg.fp8, rngs=rngs)
        if cfg.has_value_embed(layer):  # per kv head, from the first 12 channels of the block's normed input
            self.ve_gate = Linear(VE_GATE_CHANNELS, cfg.n_kv_head, init["gate"], rngs=rngs)

    def __call__(self, x_BxTxD, cos, sin, kv=None, positions_BxT=None, ve_BxTxE=None):
        """(output, kv). Without a cache (`kv` None): causal attention over the T tokens. With a layer's cache (k, v),
        each (B', H_kv, S, D) with B' >= B: the tokens' K/V are written at `positions_BxT` of rows 0..B-1, and each
        query attends over its row's cached positions up to its own. `ve_BxTxE`: the layer's value embeddings of
        the tokens, added to v through the gate (0..3 per kv head)."""
        cfg = self.cfg
        B, T, _ = x_BxTxD.shape
        q = self.c_q(x_BxTxD).reshape(B, T, cfg.n_head, cfg.head_dim)
        k = self.c_k(x_BxTxD).reshape(B, T, cfg.n_kv_head, cfg.head_dim)
        v = self.c_v(x_BxTxD).reshape(B, T, cfg.n_kv_head, cfg.head_dim)
        if ve_BxTxE is not None:
            gate_BxTxK = 3.0 * jax.nn.sigmoid(self.ve_gate(x_BxTxD[..., :VE_GATE_CHANNELS]))
            v = v + gate_BxTxK[..., None] * ve_BxTxE.reshape(B, T, cfg.n_kv_head, cfg.head_dim)
        q, k = rms_norm(apply_rotary(q, cos, sin)), rms_norm(apply_rotary(k, cos, sin))  # rotary, then QK-norm
        if cfg.qk_scale != 1.0:
            q, k = q * cfg.qk_scale, k * cfg.qk_scale
        if kv is None:
            # GQA: K/V keep n_kv_head heads; the kernels group the queries over them without a copy.
            y = causal_attention(q, k, v, _impl(cfg, q.dtype), self.window)
        else:
            kv = tuple(write_kv(c, new, positions_BxT) for c, new in zip(kv, (k, v)))
            y = cached_attention(q, kv[0][:B], kv[1][:B], positions_BxT, self.window)
        return self.c_proj(y.reshape(B, T, cfg.n_head * cfg.head_dim)), kv


# ----------------------------------------------------------------------------------------------------------------------
# The KV cache. Stored (B, H_kv, S, D) per layer: decode's two attention einsums then read it in place, where the
# (B, S, H_kv, D) layout made XLA transpose the whole cache on every call (decode steps 1.5-1.9x slower on CPU,
# bench/RESULTS.md). One buffer per layer, so a donated cache is updated in place, layer by layer.


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: tuple  # per layer (B, H_kv, S, D) in the compute dtype; GQA/MQA store only the kv heads
    v: tuple
    lengths_B: jax.Array  # int32: valid positions per row; row b's next token goes to position lengths_B[b]
    last_tokens_B: jax.Array  # int32: each row's last token (smear mixes its embedding into the next one's)

    @classmethod
    def zeros(cls, cfg: GPTConfig, batch: int, max_len: int) -> KVCache:
        shape, dtype = (batch, cfg.n_kv_head, max_len, cfg.head_dim), jnp.dtype(cfg.compute_dtype)
        layers = lambda: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.n_layer))  # noqa: E731
        return cls(layers(), layers(), jnp.zeros((batch,), jnp.int32), jnp.zeros((batch,), jnp.int32))

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


def write_kv(cache_BxKxSxD, new_bxTxKxD, positions_bxT):
    """The new tokens' K (or V) written into rows 0..b-1 at their positions. mode="drop": a position past the end of
    the cache (a finished row still being fed) writes nowhere; the default clamping would overwrite its last key."""
    rows_bx1 = jnp.arange(new_bxTxKxD.shape[0])[:, None]
    return cache_BxKxSxD.at[rows_bx1, :, positions_bxT].set(new_bxTxKxD.astype(cache_BxKxSxD.dtype), mode="drop")


def cached_attention(q_BxTxHxD, k_BxKxSxD, v_BxKxSxD, positions_BxT, window: int = 0):
    """Each query attends over the cached keys at positions <= its own (and, with a window, no more than `window`
    before it), which hides the padding of right-padded prompts and anything past a row's length. Scores and softmax
    in fp32. (Explicit positions, never `is_causal`: its mask is top-left aligned, wrong when keys outnumber
    queries.)"""
    B, T, H, D = q_BxTxHxD.shape
    K, S = k_BxKxSxD.shape[1], k_BxKxSxD.shape[2]
    q = q_BxTxHxD.reshape(B, T, K, H // K, D)
    f32 = dict(preferred_element_type=jnp.float32)
    s = jnp.einsum("btkgd,bksd->bkgts", q, k_BxKxSxD, **f32) / math.sqrt(D)
    key_pos, q_pos = jnp.arange(S)[None, None, :], positions_BxT[:, :, None]
    visible_BxTxS = (key_pos <= q_pos) & ((key_pos >= q_pos - window) if window else True)
    p = jax.nn.softmax(jnp.where(visible_BxTxS[:, None, None], s, -jnp.inf), axis=-1)
    y = jnp.einsum("bkgts,bksd->btkgd", p.astype(v_BxKxSxD.dtype), v_BxKxSxD, **f32)
    return y.astype(q_BxTxHxD.dtype).reshape(B, T, H, D)


def _impl(cfg: GPTConfig, dtype) -> str:
    # cuDNN's fused kernel only takes half precision; fp32 runs (CPU tests) use XLA.
    if cfg.attention == "cudnn" and dtype not in (jnp.bfloat16, jnp.float16):
        return "xla"
    return cfg.attention


ATTENTION_IMPLS = ("cudnn", "xla", "chunked")


def causal_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, impl: str, window: int = 0):
    """Causal self-attention (a token sees itself and the `window` before it when window > 0) by one of
    ATTENTION_IMPLS. `is_causal=True` always accompanies a window: an open JAX report shows cuDNN leaking future tokens
    with `is_causal=False` plus `local_window_size`."""
    if impl == "chunked":
        return chunked_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, window)
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation {impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
    return jax.nn.dot_product_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, is_causal=True, implementation=impl,
                                        local_window_size=(window, 0) if window else None)


# XLA's plain attention keeps the (B, H, T, T) probabilities of every layer for the backward: 2.7 GB per d20 layer at
# 32 rows of 2,048. Flash-style kernels (cuDNN) keep only q, k, v, the output and the row logsumexp, and recompute the
# rest. `chunked_attention` does the same in plain JAX, one block of queries at a time: the fallback where cuDNN fails,
# and the dry run's stand-in for cuDNN on CPU (it has cuDNN's memory behaviour, not its speed).
CHUNK = 512


def _scores_block(q_BxQxKxGxD, k_BxTxKxD, q_start, window: int):
    """Scaled fp32 scores (B, K, G, Q, T) of one query block, masked causally (and to the window)."""
    D = q_BxQxKxGxD.shape[-1]
    s = jnp.einsum("bqkgd,btkd->bkgqt", q_BxQxKxGxD, k_BxTxKxD, preferred_element_type=jnp.float32) / math.sqrt(D)
    qpos = q_start + jnp.arange(q_BxQxKxGxD.shape[1])[:, None]
    kpos = jnp.arange(k_BxTxKxD.shape[1])[None, :]
    visible = (kpos <= qpos) & ((qpos - kpos <= window) if window else True)
    return jnp.where(visible, s, -jnp.inf)


def _blocked(x_BxTxKxGxD, chunk):
    B, T = x_BxTxKxGxD.shape[:2]
    return jnp.moveaxis(x_BxTxKxGxD.reshape(B, T // chunk, chunk, *x_BxTxKxGxD.shape[2:]), 1, 0)


def _unblocked(x_NxBxQx___):
    x = jnp.moveaxis(x_NxBxQx___, 0, 1)
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], *x.shape[3:])


def _chunked_forward(q, k, v, window):
    B, T, H, D = q.shape
    K = k.shape[2]
    chunk = math.gcd(T, CHUNK)
    qb = _blocked(q.reshape(B, T, K, H // K, D), chunk)

    def block(args):
        i, q_blk = args
        s = _scores_block(q_blk, k, i * chunk, window)
        lse = jax.nn.logsumexp(s, axis=-1)  # (B, K, G, Q)
        p = jnp.exp(s - lse[..., None])
        out = jnp.einsum("bkgqt,btkd->bqkgd", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return out.astype(q.dtype), lse

    out, lse = jax.lax.map(block, (jnp.arange(T // chunk), qb))
    return _unblocked(out).reshape(B, T, H, D), lse  # lse stays blocked: (N, B, K, G, Q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def chunked_attention(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, window: int = 0):
    return _chunked_forward(q_BxTxHxD, k_BxTxKxD, v_BxTxKxD, window)[0]


def _chunked_fwd(q, k, v, window):
    out, lse = _chunked_forward(q, k, v, window)
    return out, (q, k, v, out, lse)


def _chunked_bwd(window, residuals, dout_BxTxHxD):
    q, k, v, out, lse = residuals
    B, T, H, D = q.shape
    K = k.shape[2]
    chunk = math.gcd(T, CHUNK)
    split = lambda x: _blocked(x.reshape(B, T, K, H // K, D), chunk)  # noqa: E731
    qb, dob, ob = split(q), split(dout_BxTxHxD), split(out)
    def block(carry, args):
        dk, dv = carry
        i, q_blk, do_blk, o_blk, lse_blk = args
        p = jnp.exp(_scores_block(q_blk, k, i * chunk, window) - lse_blk[..., None])  # (B, K, G, Q, T)
        # Matmul inputs in the compute dtype with fp32 accumulation, as flash kernels do; fp32 runs stay fp32.
        f32 = dict(preferred_element_type=jnp.float32)
        dv = dv + jnp.einsum("bkgqt,bqkgd->btkd", p.astype(v.dtype), do_blk, **f32)
        dp = jnp.einsum("bqkgd,btkd->bkgqt", do_blk, v, **f32)
        delta = jnp.einsum("bqkgd,bqkgd->bkgq", do_blk.astype(jnp.float32), o_blk.astype(jnp.float32))
        ds = p * (dp - delta[..., None]) / math.sqrt(D)
        dq_blk = jnp.einsum("bkgqt,btkd->bqkgd", ds.astype(k.dtype), k, **f32)
        dk = dk + jnp.einsum("bkgqt,bqkgd->btkd", ds.astype(q.dtype), q_blk, **f32)
        return (dk, dv), dq_blk.astype(q.dtype)

    zeros = jnp.zeros((B, T, K, D), jnp.float32)
    (dk, dv), dq = jax.lax.scan(block, (zeros, zeros), (jnp.arange(T // chunk), qb, dob, ob, lse))
    return _unblocked(dq).reshape(B, T, H, D), dk.astype(k.dtype), dv.astype(v.dtype)


chunked_attention.defvjp(_chunked_fwd, _chunked_bwd)


def attention_errors(impl: str, B: int, T: int, H: int, H_kv: int, D: int, window: int = 0, seed: int = 0) -> dict:
    """Max error of `impl`'s causal attention in bf16 (the output and the q/k/v gradients, each relative to the
    reference's largest magnitude) against an fp32 XLA reference with an explicit causal (and sliding-window) mask. The reference never uses `local_window_size`, so a
    kernel that lets future tokens through (the open JAX report on cuDNN with `is_causal=False` plus a window) shows
    up as a large error. Raises whatever the implementation raises (cuDNN missing, unsupported shape, ...)."""
    kq, kk, kv, kc = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(kq, (B, T, H, D), jnp.float32)
    k = jax.random.normal(kk, (B, T, H_kv, D), jnp.float32)
    v = jax.random.normal(kv, (B, T, H_kv, D), jnp.float32)
    cot = jax.random.normal(kc, (B, T, H, D), jnp.float32)
    i, j = jnp.arange(T)[:, None], jnp.arange(T)[None, :]
    mask = (j <= i) & ((i - j <= window) if window else True)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v).astype(jnp.float32) * cot)

    def kernel(q, k, v):
        return causal_attention(q, k, v, impl, window)

    def reference(q, k, v):
        return jax.nn.dot_product_attention(q, k, v, mask=mask[None, None], implementation="xla")

    bf16 = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out, ref = jax.jit(kernel)(*bf16), jax.jit(reference)(q, k, v)
    grads = jax.jit(jax.grad(loss(kernel), argnums=(0, 1, 2)))(*bf16)
    ref_grads = jax.jit(jax.grad(loss(reference), argnums=(0, 1, 2)))(q, k, v)
    err = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b)) / jnp.max(jnp.abs(b)))  # noqa: E731
    return {"out": err(out, ref), **{f"d{n}": err(g, r) for n, g, r in zip("qkv", grads, ref_grads)}}


# bf16 rounding of inputs and outputs alone gives relative errors of ~1e-2 (XLA's own bf16 path included); a masking
# bug (a leaked future token) gives errors of order 1.
ATTENTION_TOLERANCE = 0.05


def resolve_attention(requested: str, platform: str) -> tuple[str, str]:
    """(implementation, why) for a config's `attention` field. "auto" picks cuDNN on GPUs only after a small causal
    forward and backward through it matches XLA (cuDNN attention has known failures under CUDA 13), else the chunked
    XLA attention (plain XLA attention would keep every layer's T×T probabilities: d20 would not fit)."""
    if requested != "auto":
        return requested, f"attention={requested} from the config"
    if platform != "gpu":
        return "xla", f"no cuDNN on {platform}"
    try:  # plain causal and with a sliding window (the 2026 model's short layers)
        errors = [attention_errors("cudnn", B=1, T=256, H=4, H_kv=2, D=128, window=w) for w in (0, 64)]
    except Exception as e:  # noqa: BLE001 -- any failure of the kernel means: do not use it
        return "chunked", f"cuDNN attention failed ({type(e).__name__}: {str(e).splitlines()[0][:200]}); using chunked"
    worst = max(max(e.values()) for e in errors)
    if worst > ATTENTION_TOLERANCE:
        return "chunked", f"cuDNN attention disagrees with XLA (max error {worst:.3g}); using chunked"
    return "cudnn", f"cuDNN attention checked against XLA (max error {worst:.3g})"


class MLP(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.c_fc = Linear(cfg.n_embd, 4 * cfg.n_embd, initialisers(cfg)["fc"], fp8=cfg.fp8, rngs=rngs)
        self.c_proj = Linear(4 * cfg.n_embd, cfg.n_embd, fp8=cfg.fp8, rngs=rngs)

    def __call__(self, x):
        return self.c_proj(relu2(self.c_fc(x)))


class Block(nnx.Module):
    def __init__(self, cfg: GPTConfig, layer: int, *, rngs: nnx.Rngs):
        self.attn = Attention(cfg, layer, rngs=rngs)
        self.mlp = MLP(cfg, rngs=rngs)

    def __call__(self, x, cos, sin, kv=None, positions_BxT=None, ve_BxTxE=None):
        y, kv = self.attn(rms_norm(x), cos, sin, kv, positions_BxT, ve_BxTxE)
        x = x + y
        return x + self.mlp(rms_norm(x)), kv


class GPT(nnx.Module):
    def __init__(self, cfg: GPTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        init, vocab = initialisers(cfg), cfg.padded_vocab
        self.wte = nnx.Param(init["wte"](rngs.params(), (vocab, cfg.n_embd)))
        self.blocks = nnx.List([Block(cfg, i, rngs=rngs) for i in range(cfg.n_layer)])
        # October's zero head: the first prediction is uniform, loss starts at exactly ln(vocab).
        self.lm_head = Linear(cfg.n_embd, vocab, init["head"], fp8=cfg.fp8, rngs=rngs)
        if cfg.value_embeds:
            shape = (vocab, cfg.n_kv_head * cfg.head_dim)
            self.value_embeds = nnx.Dict({str(i): nnx.Param(init["ve"](rngs.params(), shape))
                                          for i in range(cfg.n_layer) if cfg.has_value_embed(i)})
        if cfg.smear:
            self.smear_gate = Linear(SMEAR_GATE_CHANNELS, 1, init["gate"], rngs=rngs)
            self.smear_lambda = nnx.Param(jnp.zeros((1,), jnp.float32))
        if cfg.backout:
            self.backout_lambda = nnx.Param(jnp.full((1,), 0.2, jnp.float32))
        if cfg.layer_scalars:  # 2026: a little more residual and x0 early, less late; else the identity
            frac = jnp.arange(cfg.n_layer, dtype=jnp.float32) / max(cfg.n_layer - 1, 1)
            year = cfg.init == "2026"
            self.resid_lambdas = nnx.Param(1.15 - 0.10 * frac if year else jnp.ones((cfg.n_layer,), jnp.float32))
            self.x0_lambdas = nnx.Param(0.20 - 0.15 * frac if year else jnp.zeros((cfg.n_layer,), jnp.float32))

    def __call__(self, idx_BxT, cache: KVCache | None = None, *, last_B=None):
        """(logits, cache): (B, T, V) fp32 logits, or (B, V) at each row's position `last_B` when given (the head is
        the largest matmul at a large vocabulary; prefill and classification need one position per row)."""
        x, cache = self.hidden(idx_BxT, cache)
        if last_B is not None:
            x = jnp.take_along_axis(x, last_B[:, None, None], axis=1)[:, 0]
        return softcapped_logits(self.cfg, x, self.lm_head), cache

    def hidden(self, idx_BxT, cache: KVCache | None = None):
        """(the residual stream after the last block (B, T, D), cache): the one block loop of training, prefill and
        decode. Without a cache the tokens are positions 0..T-1 of their rows. With one, row b's tokens continue it
        at `cache.lengths_B[b]` (rows 0..B-1 of a cache that may hold more), their K/V are written, and those rows'
        lengths in the returned cache grow by T."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.compute_dtype)
        B, T = idx_BxT.shape
        positions_BxT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
        if cache is not None:
            positions_BxT = cache.lengths_B[:B, None] + positions_BxT
        cos, sin = rotary_tables(positions_BxT, cfg.head_dim, cfg.rope_base, dtype,
                                 jnp.bfloat16 if cfg.rope_bf16 else dtype)
        # Rows over every device: the gather would otherwise inherit the table's sharding (sharding.py says why).
        x = sharding.constrain(embed(cfg, self.wte[...], idx_BxT), ("batch", None, None))
        if cfg.smear:
            x = self.smear_in(x, positions_BxT, None if cache is None else cache.last_tokens_B[:B])
        x0, x_backout, ks, vs = x, None, [], []
        for i, block in enumerate(self.blocks):
            if cfg.layer_scalars:
                x = self.resid_lambdas[i].astype(x.dtype) * x + self.x0_lambdas[i].astype(x.dtype) * x0
            ve = None
            if cfg.has_value_embed(i):  # rows over the devices, as the embedding's (the table is split on its width)
                ve = sharding.constrain(self.value_embeds[str(i)][...][idx_BxT].astype(dtype), ("batch", None, None))
            if cache is None:
                x = remat_block(cfg.remat, block, x, cos, sin, ve)
            else:
                x, (k, v) = block(x, cos, sin, (cache.k[i], cache.v[i]), positions_BxT, ve)
                ks.append(k)
                vs.append(v)
            if cfg.backout and i == cfg.n_layer // 2:
                x_backout = x
        if cfg.backout:
            x = x - self.backout_lambda[...].astype(x.dtype) * x_backout
        if cache is None:
            return x, None
        return x, KVCache(tuple(ks), tuple(vs), cache.lengths_B.at[:B].add(T),
                          cache.last_tokens_B.at[:B].set(idx_BxT[:, -1]))

    def smear_in(self, x_BxTxD, positions_BxT, last_tokens_B=None):
        """Each token's embedding plus smear_lambda·sigmoid(gate(its first 24 channels))· the previous token's
        embedding; a row's first token is left alone. With a cache the previous token of the first new one is the
        row's last cached token (its embedding is recomputed from its id)."""
        cfg = self.cfg
        first = (jnp.zeros_like(x_BxTxD[:, :1]) if last_tokens_B is None
                 else embed(cfg, self.wte[...], last_tokens_B[:, None]))
        prev = jnp.concatenate([first, x_BxTxD[:, :-1]], axis=1)
        gate = jax.nn.sigmoid(self.smear_gate(x_BxTxD[..., :SMEAR_GATE_CHANNELS]))
        mix = self.smear_lambda[...].astype(x_BxTxD.dtype) * gate * prev
        return x_BxTxD + jnp.where((positions_BxT > 0)[..., None], mix, 0)


# Per-block rematerialisation: what a block keeps from its forward pass for the backward, the rest is recomputed.
# "none" keeps everything (at d20, ~0.1 GiB per layer per 2,048-token row); "dots" keeps the outputs of the weight
# matmuls (the attention kernel's own saved tensors are recomputed); "full" keeps only the block's input and recomputes
# the whole block in the backward (one more forward pass: ~1/3 more FLOPs).
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def remat_block(remat: str, block, x, cos, sin, ve=None):
    if remat == "none":
        return block(x, cos, sin, ve_BxTxE=ve)[0]
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat {remat!r} is not one of {', '.join(REMAT_POLICIES)}")
    graphdef, state = nnx.split(block)

    def run(state, x, cos, sin, ve):
        return nnx.merge(graphdef, state)(x, cos, sin, ve_BxTxE=ve)[0]

    return jax.checkpoint(run, policy=REMAT_POLICIES[remat])(state, x, cos, sin, ve)


# ----------------------------------------------------------------------------------------------------------------------
# The functional core used by the training step: pure functions of (params, batch).


def init(cfg: GPTConfig, seed: int = 0):
    """Build the model and split it once: (graphdef, params) with params a plain nested dict of fp32 arrays."""
    graphdef, state = nnx.split(GPT(cfg, rngs=nnx.Rngs(seed)))
    return graphdef, nnx.to_pure_dict(state)


def abstract_params(cfg: GPTConfig):
    """(graphdef, params as ShapeDtypeStructs) without allocating a single weight."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: GPT(cfg, rngs=nnx.Rngs(0))))
    return graphdef, nnx.to_pure_dict(state)


@functools.lru_cache(maxsize=16)
def graphdef(cfg: GPTConfig):
    """The model's graph definition (its structure and static config, no weights), made once per config: what the
    programs built from a config alone (engine.py) merge their params dict into."""
    return abstract_params(cfg)[0]


def compute_params(cfg: GPTConfig, params):
    """The weights as the forward uses them: every matrix but the embedding table cast to the compute dtype, once,
    while still sharded, so FSDP all-gathers bf16 (half the bytes, half the gathered copy). The fp32 masters stay with
    the optimizer and get fp32 gradients, summed over the devices in fp32 (`sharded_cast`). The table stays fp32:
    `embed` gathers its rows, then casts, so its backward is an fp32 scatter-add. The values are the ones `Linear`
    would cast at use."""
    dtype = jnp.dtype(cfg.compute_dtype)

    def cast(path, p):
        if sharding.path_names(path)[0] in ("wte", "value_embeds") or p.dtype == dtype:  # gathered, then cast
            return p
        return sharded_cast(p, dtype, param_axes(path))

    return jax.tree_util.tree_map_with_path(cast, params)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def sharded_cast(p, dtype, axes):
    """`p.astype(dtype)` pinned to the parameter's own (sharded) layout, so XLA casts the shard and gathers the cast
    copy. Its backward upcasts the cotangent to p's dtype *before* pinning it to that layout: the devices' partial
    gradients are reduce-scattered in fp32, not summed in bf16 (as a plain cast and constraint would do)."""
    return sharding.constrain(p.astype(dtype), axes)


def _sharded_cast_fwd(p, dtype, axes):
    return sharded_cast(p, dtype, axes), jnp.zeros((), p.dtype)  # the residual only carries p's dtype


def _sharded_cast_bwd(dtype, axes, like, g):
    return (sharding.constrain(g.astype(like.dtype), axes),)


sharded_cast.defvjp(_sharded_cast_fwd, _sharded_cast_bwd)


def compute_model(graphdef, params) -> GPT:
    """The GPT merged from its fp32 params, with its weights as `compute_params` makes them."""
    cfg = nnx.merge(graphdef, params).cfg  # the config is a static attribute of the graph (trace-time only)
    return nnx.merge(graphdef, compute_params(cfg, params))


def forward(graphdef, params, idx_BxT, *, last_B=None):
    """Logits (B, T, V) of tokens at positions 0..T-1, or (B, V) at each row's position `last_B`."""
    return compute_model(graphdef, params)(idx_BxT, last_B=last_B)[0]


def forward_cached(graphdef, params, idx_BxT, cache: KVCache, *, last_B=None):
    """(logits, cache): the tokens continue rows 0..B-1 of the cache (see `GPT.hidden`), attending over every cached
    position (a decode step's cost follows the cache's length: engine.py keeps it a bucket of the live length);
    `last_B` as in `forward`, counted within the new tokens."""
    return compute_model(graphdef, params)(idx_BxT, cache, last_B=last_B)


def forward_losses(graphdef, params, inputs_BxT, targets_BxT):
    """(per-token cross-entropy, valid mask), as `token_losses(forward(...), targets)` but without the full (B, T, V)
    logits when the config chunks the loss (`chunked_token_losses`). Every training loss and the validation bpb use it."""
    gpt = compute_model(graphdef, params)
    x_BxTxD, _ = gpt.hidden(inputs_BxT)
    return chunked_token_losses(gpt.cfg, x_BxTxD, gpt.lm_head.kernel[...], targets_BxT)


def token_losses(logits_BxTxV, targets_BxT):
    """Per-token cross-entropy in nats; targets < 0 (ignored) give 0 and a False in the valid mask."""
    valid_BxT = targets_BxT >= 0
    safe_BxT = jnp.where(valid_BxT, targets_BxT, 0)
    logz_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    picked_BxT = jnp.take_along_axis(logits_BxTxV, safe_BxT[..., None], axis=-1)[..., 0]
    return jnp.where(valid_BxT, logz_BxT - picked_BxT, 0.0), valid_BxT


# The full fp32 logits of a d20 batch and their gradient cost ~1.5 GiB per 2,048-token row (vocab 65,536): more than
# the rest of the step. The chunked loss runs head matmul -> softcap -> logsumexp -> picked logit on `cfg.loss_chunk`
# positions of every row at a time, and its backward recomputes each chunk's logits (jax.checkpoint) instead of keeping
# them, so only one chunk's logits ever exist. Same numbers as the unchunked loss; one more head matmul per token.
#
# Under a mesh the loop runs per device (shard_map) on the device's own rows with the whole head, gathered once: a loop
# over globally sharded rows would all-gather the head and all-reduce its gradient in every iteration (at d20, 16
# chunks x 0.3 GiB of each per micro-batch); here the head's gradient is summed over the devices once, after the loop.
def chunked_token_losses(cfg: GPTConfig, x_BxTxD, head_DxV, targets_BxT):
    """`token_losses(softcapped_logits(cfg, x, head), targets)`, `cfg.loss_chunk` positions at a time (0: at once)."""
    T = x_BxTxD.shape[1]
    fp8 = cfg.fp8 and fp8_eligible(*head_DxV.shape)
    if not cfg.loss_chunk or cfg.loss_chunk >= T:
        logits = softcapped_logits(cfg, x_BxTxD, lambda h: matmul(h, head_DxV.astype(h.dtype), fp8))
        return token_losses(logits, targets_BxT)
    # The head enters in fp32, so the backward sums the chunks' (and the devices') head gradients in fp32, where a bf16
    # head's cotangent would be summed in bf16; casting it back to the compute dtype at use rounds nothing.
    head = head_DxV.astype(jnp.float32)
    losses = functools.partial(_chunked_losses, cfg)
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        rows = jax.sharding.PartitionSpec(sharding.spec_for(("batch",), x_BxTxD.shape[:1], mesh)[0])  # None: replicated
        # check_vma=False: the head's cotangent is summed over the devices once, at the shard_map's edge; with the
        # checks on, JAX marks the head device-varying inside the loop body and sums it there, once per chunk.
        losses = jax.shard_map(losses, mesh=mesh, in_specs=(rows, jax.sharding.PartitionSpec(), rows), out_specs=rows,
                               check_vma=False)
    return losses(x_BxTxD, head, targets_BxT), targets_BxT >= 0


def _chunked_losses(cfg: GPTConfig, x_BxTxD, head_DxV, targets_BxT):
    B, T, D = x_BxTxD.shape
    c = cfg.loss_chunk
    n = -(-T // c)
    if n * c != T:  # pad the positions to whole chunks; padded targets are ignored
        x_BxTxD = jnp.pad(x_BxTxD, ((0, 0), (0, n * c - T), (0, 0)))
        targets_BxT = jnp.pad(targets_BxT, ((0, 0), (0, n * c - T)), constant_values=-1)

    fp8 = cfg.fp8 and fp8_eligible(*head_DxV.shape)

    @jax.checkpoint
    def chunk(args):
        x_BxCxD, t_BxC = args
        logits = softcapped_logits(cfg, x_BxCxD, lambda h: matmul(h, head_DxV.astype(h.dtype), fp8))
        return token_losses(logits, t_BxC)[0]

    chunks = (x_BxTxD.reshape(B, n, c, D).swapaxes(0, 1), targets_BxT.reshape(B, n, c).swapaxes(0, 1))
    return jax.lax.map(chunk, chunks).swapaxes(0, 1).reshape(B, n * c)[:, :T]


def loss_fn(params, graphdef, inputs_BxT, targets_BxT):
    """Mean cross-entropy over the targets that are not ignored (−1)."""
    losses_BxT, valid_BxT = forward_losses(graphdef, params, inputs_BxT, targets_BxT)
    return losses_BxT.sum() / jnp.maximum(valid_BxT.sum(), 1)


def num_params(params) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
