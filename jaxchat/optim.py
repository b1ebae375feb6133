"""The optimizer: Muon for the block matrices, AdamW for the embedding and the head, and the schedules.

Parameters are routed by path (`labels`): every matrix under `blocks` → Muon; `wte` → AdamW at the embedding lr;
`lm_head` → AdamW at the unembedding lr. Anything else is an error, so a new parameter cannot silently land in the
wrong group. `optax.multi_transform` combines the three.

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

import jax
import jax.numpy as jnp
import optax

from jaxchat import sharding
from jaxchat.muon import coefficients, muon


def label_for(path, leaf) -> str:
    names = sharding.path_names(path)
    if names[0] == "blocks":
        if leaf.ndim != 2:
            raise ValueError(f"block parameter {'/'.join(names)} has shape {leaf.shape}; Muon takes 2-D matrices only")
        return "muon"
    if names[0] == "wte":
        return "embedding"
    if names[0] == "lm_head":
        return "unembedding"
    raise ValueError(f"no optimizer group for parameter {'/'.join(names)}; add it to jaxchat.optim.label_for")


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

    def adamw(lr):
        return optax.adamw(
            lr, b1=config.adam_beta1, b2=config.adam_beta2, eps=config.adam_eps, weight_decay=config.weight_decay
        )

    transforms = {
        "muon": muon(
            derived.matrix_lr, momentum=config.muon_momentum_end,
            coefficients=coefficients(config.muon_coefficients, config.muon_ns_steps),
            ns_dtype=jnp.dtype(config.muon_ns_dtype), mesh=mesh, param_spec=param_spec,
        ),
        "embedding": adamw(derived.embedding_lr),
        "unembedding": adamw(derived.unembedding_lr),
    }
    groups = optax.multi_transform(transforms, labels)
    grad_clip = config.get("grad_clip", 0.0)
    if grad_clip < 0:
        raise ValueError(f"grad_clip must be >= 0 (0 turns clipping off), got {grad_clip}")
    # Always a chain, so the optimizer state has one structure whether clipping is on or off (both keep no state).
    clip = optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity()
    return optax.chain(clip, groups)


def lr_multiplier(step: int, num_iterations: int, warmup_ratio: float, warmdown_ratio: float, final_lr_frac: float) -> float:
    """Linear warmup, constant, then linear warmdown to `final_lr_frac` over the last `warmdown_ratio` of the run."""
    warmup = round(warmup_ratio * num_iterations)
    warmdown = round(warmdown_ratio * num_iterations)
    if step < warmup:
        return (step + 1) / warmup
    if step <= num_iterations - warmdown:
        return 1.0
    progress = (num_iterations - step) / warmdown
    return progress * 1.0 + (1 - progress) * final_lr_frac


def muon_momentum(step: int, start: float = 0.85, end: float = 0.95, warmup_steps: int = 300) -> float:
    frac = min(step / warmup_steps, 1.0) if warmup_steps > 0 else 1.0
    return (1 - frac) * start + frac * end


def schedule(config, derived, step: int) -> dict[str, float]:
    """The per-step hyperparameters the jitted train step takes as traced scalars."""
    return {
        "lrm": lr_multiplier(step, derived.num_iterations, config.warmup_ratio, config.warmdown_ratio, config.final_lr_frac),
        "momentum": muon_momentum(step, config.muon_momentum_start, config.muon_momentum_end, config.muon_momentum_warmup),
    }
