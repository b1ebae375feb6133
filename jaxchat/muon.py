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

Distributed (the reference's DistMuon, in XLA's terms). Under a mesh (`muon(..., mesh=mesh)`, or the mesh the update is
traced under: `jax.set_mesh`, `use_abstract_mesh`) whose distribution axis (`shard_axis`, default "fsdp", else the
first axis with more than one device) has D > 1 devices, the devices divide the Newton–Schulz work instead of each
orthogonalising every matrix whole (which made XLA shard each NS matmul and all-gather its operands: a dozen
all-gathers per matrix per step, 1,500 of d20's 1,622 on 8 devices):
- momentum stays per parameter, elementwise, in the parameter's own sharding (the optimizer state is unchanged);
- the Nesterov updates are cast to the NS dtype and grouped by their *wide* orientation and sharding: a tall matrix is
  transposed first (NS works on the wide side anyway, so this is exactly what `orthogonalize` does inside), so the MLP's
  c_fc (d, 4d) and transposed c_proj (4d, d) form one group. Groups are stacked to (n, m, k), zero-padded to a multiple
  of D (a zero matrix orthogonalises to zero: the padding costs no wall time, each device runs ceil(n/D) anyway);
- one resharding per group moves the stack onto its leading axis (an all-to-all when the parameters are FSDP-sharded,
  a local slice when they are replicated), each device runs batched NS on its n/D matrices, and one resharding per
  group brings the results back to the parameters' own layout (`param_spec(path, shape, mesh)`, default replicated).
Per matrix the arithmetic is the same as without a mesh (same casts, same norm, same iteration), so the two agree to
rounding; with no mesh, or one device on the axis, the update is computed exactly as before, matrix by matrix.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

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


class NorMuonState(NamedTuple):
    momentum_buffer: optax.Updates
    second_moment: optax.Updates  # per matrix, one value per row or column of its smaller side (`normuon_axis`)


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


# The 2026 additions (nanochat-reference.md §2.4), each an option of `muon`, all off for October. Rules on torch's
# (out, in) layout, so in jaxchat's (in, out) kernels the output features are the columns (axis -1).


def equilibrate(x):
    """MuonEq: every output feature (a column here) rescaled to the same norm, ‖X‖_F / sqrt(out), before the
    orthogonalisation."""
    x32 = x.astype(jnp.float32)
    target = jnp.linalg.norm(x32, axis=(-2, -1), keepdims=True) / jnp.sqrt(x.shape[-1])
    cols = jnp.linalg.norm(x32, axis=-2, keepdims=True)
    return (x32 * (target / jnp.maximum(cols, 1e-6))).astype(x.dtype)


def renormalize(x):
    """Muon+: the orthogonalised update rescaled to Frobenius norm sqrt(min(in, out))."""
    return x * (jnp.sqrt(min(x.shape[-2:])) / jnp.maximum(jnp.linalg.norm(x, axis=(-2, -1), keepdims=True), 1e-6))


def normuon_axis(shape) -> int:
    """NorMuon keeps its second moment over the smaller side: one value per output feature when out >= in (the mean
    over each column's inputs, axis -2 here), else one per input (the mean over each row, axis -1)."""
    return -2 if shape[-1] >= shape[-2] else -1


def normuon(x, second_moment, beta2: float):
    """NorMuon (arXiv 2510.05491): each row or column of the update divided by the root of its running mean square,
    the Frobenius norm kept. Returns (update, second moment); no bias correction, as the reference."""
    axis = normuon_axis(x.shape)
    size = x.shape[axis]
    v_mean = jnp.mean(x * x, axis=axis, keepdims=True)
    norm = jnp.sqrt(jnp.sum(v_mean) * size)
    second_moment = second_moment + (1.0 - beta2) * (v_mean - second_moment)
    step = jax.lax.rsqrt(jnp.maximum(second_moment, 1e-10))
    new_norm = jnp.sqrt(jnp.sum(v_mean * step * step) * size)
    return x * step * (norm / jnp.maximum(new_norm, 1e-10)), second_moment


def cautious_decay(update, param, weight_decay):
    """Cautious weight decay: decay only the entries whose update points the same way as the weight (u·p >= 0), so
    decay never fights the gradient step. Returns the term to add to the update direction."""
    return weight_decay * param * (update * param >= 0)


def distribution_axis(mesh, preferred: str | None = "fsdp") -> str | None:
    """The mesh axis Muon divides its matrices over: `preferred` if the mesh has it with more than one device, else the
    first axis that has more than one; None when there is nothing to divide (no mesh, one device)."""
    if mesh is None or getattr(mesh, "empty", False):
        return None
    sizes = dict(mesh.shape)
    if preferred is not None and sizes.get(preferred, 1) > 1:
        return preferred
    return next((name for name, size in sizes.items() if size > 1), None)


def _constrain(x, mesh, spec: P):
    # A concrete mesh gets a NamedSharding; an abstract one (jax.set_mesh, use_abstract_mesh) takes the bare spec.
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec) if isinstance(mesh, Mesh) else spec)


def orthogonalize_sharded(xs, specs, mesh, axis: str, coefficients=NS5, *, dtype=jnp.bfloat16, normalize_scale=1.0,
                          eps=1e-7):
    """`[orthogonalize(x) for x in xs]`, the work divided over the mesh axis `axis`: matrices of one wide shape and
    layout are stacked, padded to a multiple of the axis size, sharded on the stack's leading axis, orthogonalised in a
    batch, and resharded back to `specs` (each matrix's PartitionSpec). Returns the results in the NS dtype."""
    n_dev = mesh.shape[axis]
    groups: dict[tuple, list[int]] = {}
    for i, (x, spec) in enumerate(zip(xs, specs)):
        spec = tuple(spec) + (None,) * (2 - len(spec))
        tall = x.shape[-2] > x.shape[-1]
        key = (x.shape[::-1], spec[::-1]) if tall else (x.shape, spec)
        groups.setdefault(key, []).append(i)
    out = [None] * len(xs)
    for (shape, spec), members in groups.items():
        wide = [xs[i].astype(dtype) for i in members]
        wide = [jnp.swapaxes(x, -1, -2) if x.shape != shape else x for x in wide]
        stack = _constrain(jnp.stack(wide), mesh, P(None, *spec))
        pad = -len(members) % n_dev
        if pad:
            stack = jnp.concatenate([stack, jnp.zeros((pad, *shape), dtype)])
        stack = _constrain(stack, mesh, P(axis, None, None))  # each device now holds ceil(n/D) whole matrices
        ortho = orthogonalize(stack, coefficients, dtype=dtype, normalize_scale=normalize_scale, eps=eps)
        ortho = _constrain(ortho, mesh, P(axis, None, None))  # NS stays on the shares: no resharding inside it
        ortho = _constrain(ortho, mesh, P(None, *spec))[: len(members)]  # back to the parameters' layout
        for j, i in enumerate(members):
            out[i] = jnp.swapaxes(ortho[j], -1, -2) if xs[i].shape != shape else ortho[j]
    return out


def muon(
    learning_rate: float,
    *,
    momentum: float = 0.95,
    nesterov: bool = True,
    coefficients=NS5,
    ns_dtype=jnp.bfloat16,
    mesh=None,
    param_spec: Callable | None = None,
    shard_axis: str | None = "fsdp",
    equilibrate_rows: bool = False,
    plus: bool = False,
    normuon_beta2: float = 0.0,
    cautious_weight_decay: float = 0.0,
) -> optax.GradientTransformationExtraArgs:
    """Muon for a pytree of 2-D (in, out) matrices. `momentum` (and, with cautious weight decay, `weight_decay`) may
    be overridden per step as update arguments.

    `mesh` (a Mesh or AbstractMesh; None: the mesh the update is traced under, if any) divides Newton–Schulz over its
    `shard_axis` (see the module docstring); `param_spec(path, shape, mesh) -> PartitionSpec` gives each parameter's
    layout, so the results go straight back to it (default: replicated).

    The 2026 options, in the order they apply: `equilibrate_rows` (MuonEq, before the orthogonalisation), `plus`
    (Muon+, after it), `normuon_beta2` > 0 (NorMuon's second moment), `cautious_weight_decay` > 0 (scaled by the
    learning rate and the shape factor, as the step)."""
    coefficients = tuple(coefficients)
    polar = coefficients == POLAR_EXPRESS  # the reference normalises its input by ‖X‖·1.01 + 1e-6
    normalize_scale, eps = (1.01, 1e-6) if polar else (1.0, 1e-7)

    def init_fn(params):
        for p in jax.tree.leaves(params):
            if p.ndim != 2:
                raise ValueError(f"Muon takes 2-D matrices only, got a parameter of shape {p.shape}")
        buffers = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
        if not normuon_beta2:
            return MuonState(buffers)
        side = lambda p: jnp.zeros(tuple(1 if i == normuon_axis(p.shape) % 2 else n  # noqa: E731
                                         for i, n in enumerate(p.shape)), jnp.float32)
        return NorMuonState(buffers, jax.tree.map(side, params))

    def update_fn(updates, state, params=None, *, momentum=momentum, weight_decay=cautious_weight_decay,
                  **unused_extra_args):
        del unused_extra_args
        if cautious_weight_decay and params is None:
            raise ValueError("cautious weight decay needs the parameters: tx.update(grads, state, params)")
        mu = jnp.asarray(momentum, jnp.float32)

        def nesterov_step(g, buf):
            g = g.astype(jnp.float32)
            buf = buf + (1.0 - mu) * (g - buf)
            g = g + mu * (buf - g) if nesterov else buf
            return g, buf

        with_paths, treedef = jax.tree_util.tree_flatten_with_path(updates)
        paths = [path for path, _ in with_paths]
        buffers = treedef.flatten_up_to(state.momentum_buffer)
        stepped = [nesterov_step(g, buf) for (_, g), buf in zip(with_paths, buffers)]
        gs = [g for g, _ in stepped]
        to_orthogonalize = [equilibrate(g.astype(ns_dtype)) for g in gs] if equilibrate_rows else gs
        layout = mesh if mesh is not None else jax.sharding.get_abstract_mesh()
        axis = distribution_axis(layout, shard_axis)
        if axis is None:  # one device: each matrix whole, as it always was
            xs = [orthogonalize(g, coefficients, dtype=ns_dtype, normalize_scale=normalize_scale, eps=eps)
                  for g in to_orthogonalize]
        else:
            specs = [param_spec(path, g.shape, layout) if param_spec else P() for path, g in zip(paths, gs)]
            xs = orthogonalize_sharded(to_orthogonalize, specs, layout, axis, coefficients, dtype=ns_dtype,
                                       normalize_scale=normalize_scale, eps=eps)
        xs = [x.astype(jnp.float32) for x in xs]
        if plus:
            xs = [renormalize(x) for x in xs]
        momentum_buffer = treedef.unflatten([buf for _, buf in stepped])
        if normuon_beta2:
            stepped2 = [normuon(x, v, normuon_beta2) for x, v in zip(xs, treedef.flatten_up_to(state.second_moment))]
            xs = [x for x, _ in stepped2]
            new_state = NorMuonState(momentum_buffer, treedef.unflatten([v for _, v in stepped2]))
        else:
            new_state = MuonState(momentum_buffer)
        if cautious_weight_decay:
            wd = jnp.asarray(weight_decay, jnp.float32)
            xs = [x + cautious_decay(x, p.astype(jnp.float32), wd) for x, p in zip(xs, treedef.flatten_up_to(params))]
        new_updates = [-learning_rate * shape_scale(g.shape) * x for g, x in zip(gs, xs)]
        return treedef.unflatten(new_updates), new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
