"""The training step: a pure function of (params, optimizer state, batch, hyperparameters), jitted once.

Gradient accumulation runs inside the jit as a `lax.scan` over the micro-batches of one optimizer step, so a step is a
single program no matter how many micro-batches it takes. The per-step hyperparameters (`lrm`, `momentum`) arrive as
traced scalars. params and optimizer state are donated: XLA updates them in place instead of holding two copies.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp
import optax

from jaxchat import model


def batch_keys(batch) -> tuple[str, ...]:
    """The order a batch's arrays are passed to the loss: inputs, targets, then any extras (e.g. RL's advantages)
    by name."""
    return ("inputs", "targets", *sorted(k for k in batch if k not in ("inputs", "targets")))


def _accumulate_grads(graphdef, params, micro_batches, loss_fn):
    grad_fn = jax.value_and_grad(loss_fn)

    def micro_step(grads_acc, xs):
        loss, grads = grad_fn(params, graphdef, *xs)
        return jax.tree.map(jnp.add, grads_acc, grads), loss

    zeros = jax.tree.map(jnp.zeros_like, params)
    grads, losses_A = jax.lax.scan(micro_step, zeros, micro_batches)
    n = micro_batches[0].shape[0]
    # The mean of micro-batch means, as the reference (loss / grad_accum per micro-step).
    return jax.tree.map(lambda g: g / n, grads), losses_A.mean()


def train_step(graphdef, tx, params, opt_state, batch, hparams, loss_fn=model.loss_fn):
    grads, loss = _accumulate_grads(graphdef, params, tuple(batch[k] for k in batch_keys(batch)), loss_fn)
    # Muon's weight decay arrives per step only where a recipe schedules it (cautious weight decay, 2026).
    extra = {"weight_decay": hparams["weight_decay"]} if "weight_decay" in hparams else {}
    updates, opt_state = tx.update(grads, opt_state, params, momentum=hparams["momentum"], **extra)
    updates = jax.tree.map(lambda u: u * hparams["lrm"], updates)
    params = optax.apply_updates(params, updates)
    # The global norm of the raw gradient, before the optimizer's clipping (optim.make_optimizer): what clipping saw.
    grad_norm = optax.tree.norm(grads)
    return params, opt_state, {"loss": loss, "grad_norm": grad_norm}


def jit_train_step(graphdef, tx, *, param_shardings, state_shardings, batch_sharding, loss_fn=model.loss_fn,
                   row_keys: tuple[str, ...] = ()):
    """The jitted step with explicit shardings in and out, params and optimizer state donated. `row_keys` name extra
    per-row (A, B) batch arrays the loss takes after inputs and targets (RL's advantages)."""
    mesh = batch_sharding.mesh

    def step(params, opt_state, batch, hparams):
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):  # so the model can pin its activations' sharding
            return train_step(graphdef, tx, params, opt_state, batch, hparams, loss_fn=loss_fn)

    row_sharding = jax.sharding.NamedSharding(batch_sharding.mesh, jax.sharding.PartitionSpec(*batch_sharding.spec[:2]))
    batch_shardings = {"inputs": batch_sharding, "targets": batch_sharding, **{k: row_sharding for k in row_keys}}
    return jax.jit(
        step,
        in_shardings=(param_shardings, state_shardings, batch_shardings, None),
        out_shardings=(param_shardings, state_shardings, None),
        donate_argnums=(0, 1),
    )


def init_state(cfg: model.GPTConfig, seed: int, tx, *, param_shardings, state_shardings):
    """Initialise params and optimizer state directly in their shardings (no full copy on one device first)."""

    def init():
        _, params = model.init(cfg, seed)
        return params, tx.init(params)

    return jax.jit(init, out_shardings=(param_shardings, state_shardings))()
