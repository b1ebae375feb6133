"""The optimizer: Muon for the block matrices, AdamW for the rest, and the schedules.

Parameters are routed by path (`labels`): every matrix under `blocks` → Muon; the others by their top-level name
(`GROUP_OF`): `wte` → AdamW at the embedding lr, `lm_head` → AdamW at the unembedding lr (October's two groups, at the
config's betas and weight decay), and with `optimizer=2026` the record's six groups (`ADAMW_2026`: value embeddings,
resid and x0 scalars, gates, each with its own lr, betas and decay) and Muon's 2026 options (muon.py). Anything else is
an error, so a new parameter cannot silently land in the wrong group. `optax.multi_transform` combines them.

Gradient clipping (`grad_clip`, base_train's 1.0 in October 2025; 0 turns it off) comes first in the chain, on the
global norm of all gradients together, as `torch.nn.utils.clip_grad_norm_` on one device. (On several GPUs the
reference clipped each rank's local gradient before its optimizer averaged them, a bug it later removed with the
clipping itself; jaxchat always clips the global norm.) The train step logs the norm measured before clipping.

Schedules are host-side: each step the trainer computes the lr multiplier and Muon momentum here and passes them to
the jitted step as traced scalars (`lrm`, `momentum`), so nothing recompiles as they change. Every group's update is
linear in its learning rate (AdamW's decoupled weight decay included), so scaling the combined update by `lrm` is
exactly `lr · lrm` for every group.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import optax

from jaxchat import sharding
from jaxchat.muon import coefficients, muon


# Parameters outside the blocks, by their top-level name: their optimizer group. The blocks' matrices are Muon's.
GROUP_OF = {"wte": "embedding", "lm_head": "unembedding", "value_embeds": "value_embeds", "resid_lambdas": "resid",
            "x0_lambdas": "x0", "smear_gate": "gates", "smear_lambda": "gates", "backout_lambda": "gates"}

# The 2026 AdamW groups (nanochat-reference.md §2.1): lr (a function of the config and its derived values, before
# the schedule), betas, weight decay; eps 1e-10 for all.
ADAMW_2026 = {
    "unembedding": (lambda c, d: d.unembedding_lr, (0.8, 0.96), 0.01),
    "embedding": (lambda c, d: d.embedding_lr, (0.8, 0.995), 0.001),
    "value_embeds": (lambda c, d: 0.5 * d.embedding_lr, (0.8, 0.995), 0.01),
    "resid": (lambda c, d: 0.01 * c.scalar_lr * d.batch_lr_scale, (0.8, 0.95), 0.05),
    "x0": (lambda c, d: c.scalar_lr * d.batch_lr_scale, (0.96, 0.95), 0.0),
    "gates": (lambda c, d: 0.2, (0.8, 0.95), 0.0),  # constant: no width or batch scale
}


def label_for(path, leaf) -> str:
    names = sharding.path_names(path)
    if names[0] == "blocks":
        if leaf.ndim != 2:
            raise ValueError(f"block parameter {'/'.join(names)} has shape {leaf.shape}; Muon takes 2-D matrices only")
        return "muon"
    if names[0] in GROUP_OF:
        return GROUP_OF[names[0]]
    raise ValueError(f"no optimizer group for parameter {'/'.join(names)}; add it to jaxchat.optim.GROUP_OF")


def labels(params):
    return jax.tree_util.tree_map_with_path(label_for, params)


def param_spec(path, shape, mesh):
    """A parameter's PartitionSpec on `mesh` by the sharding rules (what sharding.param_shardings gives it)."""
    return sharding.spec_for(sharding.logical_axes(path), shape, mesh)


def make_optimizer(config, derived, mesh=None) -> optax.GradientTransformationExtraArgs:
    """clip_by_global_norm, then multi_transform(Muon, AdamW, AdamW) at the derived learning rates (before the lr
    multiplier).

    `mesh`: the training mesh, so Muon divides its Newton–Schulz work over the devices (muon.py's docstring). Without
    it Muon uses the mesh the step is traced under (`jax.set_mesh`), if any; with neither, or one device, every device
    orthogonalises every matrix, as on one GPU. The optimizer state is the same either way."""

    def adamw(lr, betas=(config.adam_beta1, config.adam_beta2), weight_decay=config.weight_decay):
        return optax.adamw(lr, b1=betas[0], b2=betas[1], eps=config.adam_eps, weight_decay=weight_decay)

    transforms = {
        "muon": muon(
            derived.matrix_lr, momentum=config.muon_momentum_end,
            coefficients=coefficients(config.muon_coefficients, config.muon_ns_steps),
            ns_dtype=jnp.dtype(config.muon_ns_dtype), mesh=mesh, param_spec=param_spec,
            equilibrate_rows=config.get("muon_equilibrate", False), plus=config.get("muon_plus", False),
            normuon_beta2=config.get("muon_normuon_beta2", 0.0), cautious_weight_decay=derived.muon_weight_decay,
        ),
    }
    recipe = config.get("optimizer", "2025")
    if recipe == "2026":
        transforms.update({name: adamw(lr(config, derived), betas, wd) for name, (lr, betas, wd) in ADAMW_2026.items()})
    elif recipe == "2025":
        transforms.update(embedding=adamw(derived.embedding_lr), unembedding=adamw(derived.unembedding_lr))
    else:
        raise ValueError(f"optimizer must be 2025 or 2026, got {recipe!r}")

    def checked_labels(params):
        tree = labels(params)
        missing = sorted({label for label in jax.tree.leaves(tree) if label not in transforms})
        if missing:
            raise ValueError(f"the model has parameters for the optimizer group(s) {', '.join(missing)}, which "
                             f"optimizer={recipe} does not have: set --config.optimizer=2026")
        return tree

    groups = optax.multi_transform(transforms, checked_labels)
    grad_clip = config.get("grad_clip", 0.0)
    if grad_clip < 0:
        raise ValueError(f"grad_clip must be >= 0 (0 turns clipping off), got {grad_clip}")
    # Always a chain, so the optimizer state has one structure whether clipping is on or off (both keep no state).
    clip = optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity()
    return optax.chain(clip, groups)


def lr_multiplier(step: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float,
                  warmup_steps: int = 0) -> float:
    """Linear warmup (`warmup_steps`, else `warmup_ratio` of the run), constant, then linear warmdown to
    `final_lr_frac` over the last `warmdown_ratio` of the run."""
    warmup = warmup_steps or round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress * 1.0 + (1 - progress) * final_lr_frac


def muon_momentum(step: int, start: float = 0.85, end: float = 0.95, warmup_steps: int = 300, *,
                  final: float = 0.0, num_iterations: int = 0, warmdown_ratio: float = 0.0) -> float:
    """Linear from `start` to `end` over `warmup_steps`; with `final` > 0, from `end` to `final` over the lr warmdown
    (the ramp taking precedence, as the reference's: a warmdown starting inside it jumps where the ramp ends)."""
    if step < warmup_steps or not final:
        frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
        return (1 - frac) * start + frac * end
    warmdown = round(warmdown_ratio * num_iterations)
    if warmdown and step >= num_iterations - warmdown:
        return end + (final - end) * (step - (num_iterations - warmdown)) / warmdown
    return end


def muon_weight_decay(step: int, num_iterations: int, weight_decay: float) -> float:
    """Cosine from `weight_decay` at step 0 to 0 at the end."""
    return weight_decay * 0.5 * (1 + math.cos(math.pi * step / num_iterations))


def schedule(config, derived, step: int) -> dict[str, float]:
    """The per-step hyperparameters the jitted train step takes as traced scalars."""
    n = derived.num_iterations
    out = {
        "lrm": lr_multiplier(step, n, config.warmup_ratio, config.warmdown_ratio, config.final_lr_frac,
                             config.get("warmup_steps", 0)),
        "momentum": muon_momentum(step, config.muon_momentum_start, config.muon_momentum_end,
                                  config.muon_momentum_warmup, final=config.get("muon_momentum_final", 0.0),
                                  num_iterations=n, warmdown_ratio=config.warmdown_ratio),
    }
    if derived.muon_weight_decay:
        out["weight_decay"] = muon_weight_decay(step, n, derived.muon_weight_decay)
    return out
