"""Muon under a mesh: same-shaped matrices stacked, Newton–Schulz divided over the devices (muon.py's docstring).

On 4 emulated devices (conftest.py): the distributed update equals the one-device update, and the compiled optimizer
moves each shape group once each way instead of gathering every operand of every NS matmul."""
import re

import jax
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from jaxchat import config as C
from jaxchat import dryrun, model, muon, optim, sharding


def tiny_config(**kw):
    # depth 3, 192 wide (divisible by 4: FSDP-sharded): groups of 9 (c_q, c_k, c_v), 3 (the attention c_proj, its own layout)
    # and 6 (c_fc with the transposed MLP c_proj): none a multiple of the 4 devices, so every group is padded.
    c = C.default_config()
    c.update(dict(depth=3, head_dim=32, vocab_size=128, sequence_len=16, device_batch_size=2, total_batch_size=-1,
                  num_iterations=100, compute_dtype="float32", muon_ns_dtype="float32"), **kw)
    return c


def random_grads(params, seed):
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([jax.random.normal(k, x.shape) * 0.01 for k, x in zip(keys, leaves)])


def two_updates(c, mesh=None, how="explicit"):
    """Two optimizer steps (the second mixes both gradients through the momentum): (updates, new state)."""
    d = C.derive(c)
    _, params = model.init(C.model_config(c))
    tx = optim.make_optimizer(c, d, mesh=mesh if how == "explicit" else None)
    g1, g2 = random_grads(params, 1), random_grads(params, 2)

    def two(params, g1, g2):
        state = tx.init(params)
        _, state = tx.update(g1, state, params, momentum=0.85)
        return tx.update(g2, state, params, momentum=0.9)

    if mesh is None:
        return jax.jit(two)(params, g1, g2)
    ps = sharding.param_shardings(params, mesh)
    ss = sharding.state_shardings(tx, params, mesh)
    params, g1, g2 = jax.device_put((params, g1, g2), (ps, ps, ps))
    step = jax.jit(two, in_shardings=(ps, ps, ps), out_shardings=(ps, ss))
    if how == "context":  # no mesh argument: Muon finds the mesh the step is traced under, as train_step sets it
        with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
            compiled = step.lower(params, g1, g2).compile()
        out = compiled(params, g1, g2)
    else:
        out = step(params, g1, g2)
    return jax.block_until_ready(out)


@pytest.fixture(scope="module")
def one_device():
    return jax.tree.map(np.asarray, two_updates(tiny_config()))


@pytest.mark.parametrize("mesh_shape,how", [((1, 4), "explicit"), ((1, 4), "context"), ((2, 2), "explicit"),
                                            ((4, 1), "explicit")],
                         ids=["fsdp", "fsdp-from-context", "data+fsdp", "data-parallel"])
def test_distributed_update_equals_one_device(one_device, mesh_shape, how):
    mesh = sharding.make_mesh(*mesh_shape, devices=jax.devices()[:4])
    updates, state = two_updates(tiny_config(), mesh, how)
    ref_updates, ref_state = one_device
    flat = jax.tree_util.tree_leaves_with_path(updates)
    assert sum("blocks" in jax.tree_util.keystr(p) for p, _ in flat) == 18
    for (path, u), r in zip(flat, jax.tree.leaves(ref_updates)):
        # Muon's updates are ~1e-3 (lr 0.02 x an orthogonal 192-wide matrix); fp32 NS agrees to rounding.
        np.testing.assert_allclose(np.asarray(u), r, rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(path))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
        np.testing.assert_allclose(np.asarray(a), b, rtol=1e-6, atol=1e-9)
    if mesh_shape == (1, 4):  # the parameters' layout is kept: the update comes back FSDP-sharded
        kernel = updates["blocks"][0]["mlp"]["c_proj"]["kernel"]
        assert kernel.sharding.spec == P(None, "fsdp")


def test_bf16_distributed_update_tracks_one_device():
    c = tiny_config(muon_ns_dtype="bfloat16")
    mesh = sharding.make_mesh(1, 4, devices=jax.devices()[:4])
    (u, _), (r, _) = two_updates(c, mesh), two_updates(c)
    for a, b in zip(jax.tree.leaves(u["blocks"]), jax.tree.leaves(r["blocks"])):
        # the same bf16 arithmetic per matrix; batched vs single matmuls may round differently
        assert np.linalg.norm(np.asarray(a) - b) / np.linalg.norm(b) < 1e-2


def test_replicated_matrices_are_divided_too():
    """Parameters the mesh cannot shard (the default `param_spec`): each device takes its share, one gather back."""
    mesh = sharding.make_mesh(1, 4, devices=jax.devices()[:4])
    shapes = {f"w{i}": (24, 40) for i in range(5)} | {"t": (40, 24), "s": (16, 16)}
    grads = {k: jax.random.normal(jax.random.key(i), s) for i, (k, s) in enumerate(shapes.items())}
    single = muon.muon(0.02, ns_dtype=np.float32)
    split = muon.muon(0.02, ns_dtype=np.float32, mesh=mesh)
    ref, _ = jax.jit(lambda g: single.update(g, single.init(g), momentum=0.9))(grads)
    got, _ = jax.jit(lambda g: split.update(g, split.init(g), momentum=0.9))(grads)
    for k in shapes:
        np.testing.assert_allclose(got[k], ref[k], rtol=0, atol=1e-6, err_msg=k)


def test_distribution_axis():
    assert muon.distribution_axis(None) is None
    assert muon.distribution_axis(jax.sharding.get_abstract_mesh()) is None  # no mesh set
    assert muon.distribution_axis(sharding.make_mesh(1, 1, devices=jax.devices()[:1])) is None
    assert muon.distribution_axis(sharding.make_mesh(1, 4, devices=jax.devices()[:4])) == "fsdp"
    assert muon.distribution_axis(sharding.make_mesh(2, 2, devices=jax.devices()[:4])) == "fsdp"
    assert muon.distribution_axis(sharding.make_mesh(4, 1, devices=jax.devices()[:4])) == "data"


# ----------------------------------------------------------------------------------------------------------------------
# The compiled optimizer


def compiled_update(c, mesh, distributed=True):
    d = C.derive(c)
    _, params = model.abstract_params(C.model_config(c))
    tx = optim.make_optimizer(c, d, mesh=mesh if distributed else None)
    state = jax.eval_shape(tx.init, params)
    ps = sharding.param_shardings(params, mesh)
    ss = sharding.state_shardings(tx, params, mesh)

    def update(params, state, grads):
        u, state = tx.update(grads, state, params, momentum=0.95)
        return optax.apply_updates(params, u), state

    step = jax.jit(update, in_shardings=(ps, ss, ps), out_shardings=(ps, ss), donate_argnums=(0, 1))
    return step.lower(params, state, params).compile().as_text()


def collective_count(hlo: str) -> int:
    c = dryrun.collective_bytes(hlo)
    return sum(c[k]["count"] for k in dryrun.COLLECTIVES)


def test_optimizer_collectives_scale_with_shape_groups_not_matrices():
    mesh = sharding.make_mesh(1, 4, devices=jax.devices()[:4])
    c3, c6 = tiny_config(muon_ns_dtype="bfloat16"), tiny_config(depth=6, muon_ns_dtype="bfloat16")
    c6.aspect_ratio = 32  # depth 6 at the same 192 width: twice the matrices, the same three shape groups
    hlo3, hlo6 = compiled_update(c3, mesh), compiled_update(c6, mesh)
    n3, n6 = collective_count(hlo3), collective_count(hlo6)
    # three groups, one resharding each way (all-to-alls for FSDP-sharded groups), plus the clipping norm's all-reduce
    assert n3 == n6 <= 2 * 3 + 1, (n3, n6)
    assert dryrun.collective_bytes(hlo3)["all-gather"]["count"] == 0
    # Newton-Schulz runs batched on each device's share: 9 attention matrices padded to 12 -> 3 per device
    assert re.search(r"= (bf16|f32)\[3,192,192\]\{[\d,]+\} dot\(", hlo3)
    assert re.search(r"= (bf16|f32)\[2,192,768\]\{[\d,]+\} dot\(", hlo3)  # c_fc + the MLP c_proj: 6 -> 8 -> 2
    # ...where each matrix taken whole made XLA gather the NS operands of every matrix at every iteration
    assert collective_count(compiled_update(c3, mesh, distributed=False)) > 10 * 18
