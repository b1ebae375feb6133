"""Sharding: one mesh, one table of rules, and the shardings of params, optimizer state and batches.

The mesh has two axes, `("data", "fsdp")`: `(1, n_devices)` on one node and `(n_hosts, devices_per_host)` across hosts,
so the slow inter-host links only carry the data-parallel gradient all-reduce while the fast intra-node links carry
FSDP's gathers. Batches are split over both axes: every device sees its own rows.

Why FSDP works: each parameter is stored split along its `embed` dimension over the `fsdp` axis, so a device holds 1/n
of the weights and of the optimizer state. Inside the jitted step XLA all-gathers a layer's weights just before they
are used and reduce-scatters their gradients right after, and the optimizer updates only the local slice. The
arithmetic is the same as plain data parallelism (every device still computes its own rows through the full model);
only where the bytes live changes, which is what lets d26/d32 plus AdamW/Muon state fit in 80 GB.

The model names each parameter's logical axes by its path (`model.PARAM_AXES`); `RULES` below maps them to mesh axes.
Changing the parallelism means editing this table, never the model. A dimension the mesh axis does not divide stays
replicated (tiny test models).

Activations are pinned too (`constrain`): the residual stream's rows are split over every device. Without that the
embedding gather's output inherits the table's sharding (split on `embed`, rows replicated), and every device then
computes the whole global batch: a compiled d20 step on 8 devices needed 434 GiB per device and moved ~750 GiB of
all-gathers per step. Programs get the constraint by being traced under the mesh (`train_step.jit_train_step`);
without a mesh (one device, the engine) `constrain` does nothing.
"""
from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp")
BATCH_AXES = ("data", "fsdp")  # the batch (row) dimension is split over every device

RULES = {
    "embed": "fsdp",
    "vocab": None,
    "heads": None,
    "kv_heads": None,
    "mlp": None,
    "batch": BATCH_AXES,  # activations' rows
}

log = logging.getLogger(__name__)


def make_mesh(n_data: int = 0, n_fsdp: int = 0, devices=None) -> Mesh:
    """A ("data", "fsdp") mesh. n_data 0 → one data row per process; n_fsdp 0 → all remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    n = len(devices)
    n_data = n_data or jax.process_count()
    if n % n_data:
        raise ValueError(f"mesh_data={n_data} does not divide the {n} devices")
    n_fsdp = n_fsdp or n // n_data
    if n_data * n_fsdp != n:
        raise ValueError(f"mesh {n_data} x {n_fsdp} does not cover the {n} devices; set mesh_data * mesh_fsdp = {n}")
    # Auto axes: with Explicit axes (make_mesh's default since JAX 0.9) the cross-entropy gather needs annotations.
    grid = np.array(devices, dtype=object).reshape(n_data, n_fsdp)
    return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto, AxisType.Auto))


def path_names(path) -> tuple[str, ...]:
    """A jax key path (or a tuple of names) as plain names: ("blocks", "0", "attn", "c_q", "kernel")."""
    return tuple(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path)


def logical_axes(path) -> tuple[str, ...]:
    """The logical axes the model declares for the parameter at `path` (model.PARAM_AXES)."""
    from jaxchat.model import param_axes  # here, not at the top: the model imports this module for `constrain`

    return param_axes(path)


def spec_for(axes: tuple[str | None, ...], shape, mesh) -> P:
    spec, used = [], set()
    for axis, size in zip(axes, shape):
        mesh_axis = RULES.get(axis) if axis else None
        names = () if mesh_axis is None else (mesh_axis if isinstance(mesh_axis, tuple) else (mesh_axis,))
        # A dimension the mesh axes do not divide (or an axis already used) is replicated.
        if names and (size % int(np.prod([mesh.shape[n] for n in names])) or used & set(names)):
            mesh_axis, names = None, ()
        used |= set(names)
        spec.append(mesh_axis)
    return P(*spec)


def constrain(x, axes: tuple[str | None, ...]):
    """Pin an activation's sharding by its logical axes, when the program is traced under a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(x, spec_for(axes, x.shape, mesh))


def param_shardings(params, mesh: Mesh):
    return jax.tree_util.tree_map_with_path(
        lambda path, x: NamedSharding(mesh, spec_for(logical_axes(path), x.shape, mesh)), params
    )


def state_shardings(tx, params, mesh: Mesh):
    """Shardings for `tx`'s optimizer state over `params` (arrays or ShapeDtypeStructs): every copy of the parameter
    tree inside the state (moments, momentum buffers) follows the parameters' shardings, found by optax from the
    optimizer's own structure; everything else (step counts, scalars) is replicated."""
    state = jax.eval_shape(tx.init, params)
    masked = optax.MaskedNode  # a parameter another group of optax.multi_transform owns: no state here

    def follow(x, s):
        if isinstance(x, masked):
            return x
        # A reduced copy (NorMuon keeps one value per row or column) keeps the splits its dimensions still divide.
        sizes = [int(np.prod([mesh.shape[n] for n in (a if isinstance(a, tuple) else (a,))])) if a else 1
                 for a in s.spec]
        return NamedSharding(mesh, P(*(a if dim % size == 0 else None for a, dim, size in zip(s.spec, x.shape, sizes))))

    return optax.tree_map_params(tx, follow, state, param_shardings(params, mesh),
                                 transform_non_params=lambda _: NamedSharding(mesh, P()),
                                 is_leaf=lambda x: isinstance(x, (NamedSharding, masked)))


def batch_sharding(mesh: Mesh, accumulation_axis: bool = True) -> NamedSharding:
    """(A, B, T) micro-batch stacks (or (B, T) batches) split over the rows."""
    return NamedSharding(mesh, P(None, BATCH_AXES, None) if accumulation_axis else P(BATCH_AXES, None))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def sum_over_processes(values: list[int]) -> list[int]:
    """Element-wise sum of small integer lists (e.g. eval counts) over all processes; the identity in one process."""
    if jax.process_count() == 1:
        return list(values)
    from jax.experimental import multihost_utils

    gathered = np.asarray(multihost_utils.process_allgather(np.asarray(values, np.int64)))
    return [int(v) for v in gathered.reshape(jax.process_count(), -1).sum(axis=0)]


def initialize_distributed() -> bool:
    """Start jax.distributed when launched as one of several processes (SLURM, or coordinator env vars).

    `JAXCHAT_HEARTBEAT_TIMEOUT_S` (default: jax's 100 s) bounds how long the survivors of a crashed or killed
    process keep waiting in a collective before the coordination service aborts them with an error naming it.
    """
    coordinator = os.environ.get("JAX_COORDINATOR_ADDRESS")
    slurm_tasks = int(os.environ.get("SLURM_NTASKS", "1"))
    timeouts = {}
    if os.environ.get("JAXCHAT_HEARTBEAT_TIMEOUT_S"):
        timeouts["heartbeat_timeout_seconds"] = int(os.environ["JAXCHAT_HEARTBEAT_TIMEOUT_S"])
    if coordinator:
        missing = [v for v in ("JAX_NUM_PROCESSES", "JAX_PROCESS_ID") if v not in os.environ]
        if missing:
            raise ValueError(f"JAX_COORDINATOR_ADDRESS is set but {' and '.join(missing)} is not: a multi-process "
                             "launch needs all three (see docs/multihost.md)")
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=int(os.environ["JAX_NUM_PROCESSES"]),
            process_id=int(os.environ["JAX_PROCESS_ID"]),
            **timeouts,
        )
    elif slurm_tasks > 1:
        jax.distributed.initialize(**timeouts)  # reads SLURM_* itself
    else:
        return False
    log.info("jax.distributed: process %d of %d", jax.process_index(), jax.process_count())
    return True


def batch_readers(mesh: Mesh) -> tuple[list[int], int, int]:
    """(this process's reader slots, number of slots, devices per slot) for filling the global batch.

    Batch rows are split over the devices in mesh order (data-major). Each run of consecutive devices on one data
    row and one process is one slot, and each slot reads its own disjoint stream (slot s of n reads what a process
    s of n would). The global batch therefore depends only on the mesh and process layout: one host with
    `mesh_data=2` reads exactly what two hosts read, which is what lets a multi-host run be checked against a
    single-host one.
    """
    slots: list[tuple[int, int]] = []  # (data row, process), in global row order
    for row, devices in enumerate(mesh.devices):
        for d in devices:
            if not slots or slots[-1] != (row, d.process_index):
                slots.append((row, d.process_index))
    if len(set(slots)) != len(slots):
        raise ValueError(f"a process's devices are interleaved with another's in the mesh {mesh.devices.tolist()}; "
                         "each process must own contiguous devices of each data row")
    sizes = {sum(1 for d in mesh.devices[row] if d.process_index == p) for row, p in slots}
    if len(sizes) != 1:
        raise ValueError(f"uneven device counts per process and data row ({sorted(sizes)}): give every host the "
                         "same number of devices")
    mine = [i for i, (_, p) in enumerate(slots) if p == jax.process_index()]
    if mine != list(range(mine[0], mine[0] + len(mine))):
        raise ValueError(f"process {jax.process_index()}'s devices are not contiguous in the mesh "
                         f"{mesh.devices.tolist()}: its rows of the batch could not be one local block")
    return mine, len(slots), sizes.pop()


def any_process(flag: bool) -> bool:
    """True on every process if `flag` is True on any (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(multihost_utils.process_allgather(np.array(int(flag), np.int32)).any())


def allgather_json(obj) -> list:
    """Every process's JSON-serialisable `obj`, in process order (a collective: all processes must call it)."""
    if jax.process_count() == 1:
        return [obj]
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([data.size], np.int32))[:, 0]
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: data.size] = data
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(gathered[i, :n]).decode()) for i, n in enumerate(sizes)]
