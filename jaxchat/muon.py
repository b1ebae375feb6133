"""Muon as an optax GradientTransformation: momentum, then orthogonalize each matrix update.

Per 2-D parameter with gradient G (reference: nanochat `muon.py`, from modded-nanogpt):
1. Nesterov momentum by lerp, no bias correction: buf ← μ·buf + (1−μ)·G; g = (1−μ)·G + μ·buf.
2. Newton–Schulz in bf16: X = g / (‖g‖_F + 1e-7), then per step A = X Xᵀ, B = b·A + c·A², X = a·X + B X, with the Gram
   matrix taken on the smaller side. The quintic's coefficients (3.4445, −4.7750, 2.0315) push every singular value
   into roughly [0.7, 1.2] in 5 steps, which is all Muon needs: an approximately semi-orthogonal update.
3. update = −lr · sqrt(max(1, out/in)) · X.

Orientation: the rules are defined on (out, in) = torch's Linear layout. jaxchat's kernels are (in, out) (`x @ W`), so
`out = shape[-1]` and `in = shape[-2]`; the MLP's c_fc (d → 4d) gets the 2x learning rate, its c_proj (4d → d) 1x.
Newton–Schulz itself is transpose-equivariant, so only the scale factor depends on the layout.

The momentum μ is an `update` argument (`tx.update(g, s, p, momentum=0.9)`): the host ramps it 0.85 → 0.95 over the
first steps and passes it as a traced scalar, so changing it never recompiles. The coefficient schedule is a tuple of
(a, b, c) triples, one per step, so Polar Express's per-step coefficients drop in unchanged.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

NS5 = ((3.4445, -4.7750, 2.0315),) * 5

# Polar Express (arXiv 2505.16932), as the reference's later versions use; pair with `normalize_scale=1.01`.
POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)



def coefficients(name: str, steps: int = 5):
    """The per-step (a, b, c) schedule: the quintic repeated `steps` times, or Polar Express (exactly 5 steps)."""
    if name == "ns5":
        return ((3.4445, -4.7750, 2.0315),) * steps
    if name == "polar_express":
        if steps != len(POLAR_EXPRESS):
            raise ValueError(f"Polar Express coefficients are computed for {len(POLAR_EXPRESS)} steps, got muon_ns_steps={steps}")
        return POLAR_EXPRESS
    raise ValueError(f"muon_coefficients must be 'ns5' or 'polar_express', got {name!r}")


class MuonState(NamedTuple):
    momentum_buffer: optax.Updates


def orthogonalize(g, coefficients=NS5, *, dtype=jnp.bfloat16, normalize_scale=1.0, eps=1e-7):
    """Approximate the semi-orthogonal polar factor U Vᵀ of a (..., m, n) matrix by Newton–Schulz iterations."""
    x = g.astype(dtype)
    tall = x.shape[-2] > x.shape[-1]
    if tall:  # iterate on the wide orientation so the Gram matrix X Xᵀ is the small one
        x = jnp.swapaxes(x, -1, -2)
    norm = jnp.linalg.norm(x.astype(jnp.float32), axis=(-2, -1), keepdims=True)
    x = (x / (norm * normalize_scale + eps).astype(dtype)).astype(dtype)
    for a, b, c in coefficients:
        gram = x @ jnp.swapaxes(x, -1, -2)
        poly = b * gram + c * (gram @ gram)
        x = a * x + poly @ x
    return jnp.swapaxes(x, -1, -2) if tall else x


def shape_scale(shape) -> float:
    """sqrt(max(1, out/in)) for an (in, out) kernel."""
    d_in, d_out = shape[-2], shape[-1]
    return max(1.0, d_out / d_in) ** 0.5


def muon(
    learning_rate: float,
    *,
    momentum: float = 0.95,
    nesterov: bool = True,
    coefficients=NS5,
    ns_dtype=jnp.bfloat16,
) -> optax.GradientTransformationExtraArgs:
    """Muon for a pytree of 2-D (in, out) matrices. `momentum` may be overridden per step as an update argument."""
    coefficients = tuple(coefficients)
    normalize_scale = 1.01 if coefficients == POLAR_EXPRESS else 1.0

    def init_fn(params):
        for p in jax.tree.leaves(params):
            if p.ndim != 2:
                raise ValueError(f"Muon takes 2-D matrices only, got a parameter of shape {p.shape}")
        return MuonState(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))

    def update_fn(updates, state, params=None, *, momentum=momentum, **unused_extra_args):
        del params, unused_extra_args
        mu = jnp.asarray(momentum, jnp.float32)

        def step(g, buf):
            g = g.astype(jnp.float32)
            buf = buf + (1.0 - mu) * (g - buf)
            g = g + mu * (buf - g) if nesterov else buf
            x = orthogonalize(g, coefficients, dtype=ns_dtype, normalize_scale=normalize_scale)
            return -learning_rate * shape_scale(g.shape) * x.astype(jnp.float32), buf

        grads, treedef = jax.tree.flatten(updates)
        buffers = treedef.flatten_up_to(state.momentum_buffer)
        results = [step(g, buf) for g, buf in zip(grads, buffers)]
        new_updates = treedef.unflatten([u for u, _ in results])
        return new_updates, MuonState(treedef.unflatten([buf for _, buf in results]))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
