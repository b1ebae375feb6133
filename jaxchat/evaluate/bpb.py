"""Validation bits per byte: a loss that does not depend on the tokenizer.

bpb = total nats / (ln 2 · total bytes), summed over every target token that has bytes: special tokens (0 bytes in
`token_bytes`) and masked targets (−1) count in neither sum (nanochat-reference.md §6.1). The per-batch sums are
jitted; the host adds them up in float64 so a long evaluation loses no precision.
"""
from __future__ import annotations

import math
from collections.abc import Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jaxchat import model


def batch_nats_and_bytes(graphdef, params, inputs_BxT, targets_BxT, token_bytes_V):
    # The training loss's own path: no full (B, T, V) logits at the training batch size when the loss is chunked.
    losses_BxT, valid_BxT = model.forward_losses(graphdef, params, inputs_BxT, targets_BxT)
    bytes_BxT = jnp.where(valid_BxT, token_bytes_V[jnp.where(valid_BxT, targets_BxT, 0)], 0)
    counted_BxT = bytes_BxT > 0
    return jnp.sum(jnp.where(counted_BxT, losses_BxT, 0.0)), jnp.sum(bytes_BxT)


def bits_per_byte(total_nats: float, total_bytes: int) -> float:
    return total_nats / (math.log(2) * total_bytes) if total_bytes > 0 else float("inf")


def make_evaluator(graphdef, token_bytes: np.ndarray, mesh=None):
    """A function (params, batches) -> bpb that compiles once for the batch shape. Under the training `mesh` the
    forward is traced as the train step's is, so its activations stay split over the rows (sharding.constrain)."""

    def nats_and_bytes(p, x, y, tb):
        if mesh is None:
            return batch_nats_and_bytes(graphdef, p, x, y, tb)
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            return batch_nats_and_bytes(graphdef, p, x, y, tb)

    fn = jax.jit(nats_and_bytes)
    token_bytes_V = jnp.asarray(token_bytes, jnp.int32)

    def evaluate(params, batches: Iterable[dict], place=lambda b: b) -> float:
        total_nats, total_bytes = 0.0, 0
        for batch in batches:
            batch = place(batch)
            nats, nbytes = fn(params, batch["inputs"], batch["targets"], token_bytes_V)
            total_nats += float(nats)
            total_bytes += int(nbytes)
        return bits_per_byte(total_nats, total_bytes)

    return evaluate
