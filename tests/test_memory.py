"""Memory: the chunked cross-entropy, per-block remat and bf16 weight gathers change no numbers; device_batch_size
"auto" picks the largest batch whose compiled step fits."""
import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat import config as C
from jaxchat import dryrun, model, optim, rl, sharding, train_step
from jaxchat.evaluate import bpb


def tiny(**kw):
    base = dict(vocab_size=97, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, sequence_len=32, compute_dtype="float32")
    return model.GPTConfig(**{**base, **kw})


def randomized(cfg, seed=1):
    """Zero-init projections and head would make every comparison trivial: give every weight a value."""
    graphdef, params = model.init(cfg)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return graphdef, treedef.unflatten([0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def batch(B=3, T=30, vocab=97):
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.integers(0, vocab, (B, T)), jnp.int32)
    t = jnp.asarray(rng.integers(0, vocab, (B, T)), jnp.int32).at[:, :5].set(-1).at[1, 20:].set(-1)
    return x, t


def value_and_grad(cfg, params, x, t):
    graphdef, _ = model.abstract_params(cfg)
    return jax.jit(jax.value_and_grad(lambda p: model.loss_fn(p, graphdef, x, t)))(params)


def assert_trees_close(a, b, tol):
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_allclose(u, v, atol=tol, rtol=tol)


@pytest.mark.parametrize("chunk", [10, 8, 7], ids=["divides-T", "pads-T", "pads-odd"])
def test_chunked_loss_and_gradient_equal_the_full_ones(chunk):
    cfg = tiny()
    graphdef, params = randomized(cfg)
    x, t = batch()  # T=30: chunks of 8 and 7 pad the last one
    loss, grads = value_and_grad(cfg, params, x, t)
    loss_c, grads_c = value_and_grad(dataclasses.replace(cfg, loss_chunk=chunk), params, x, t)
    assert float(loss_c) == pytest.approx(float(loss), rel=1e-6)
    assert_trees_close(grads_c, grads, 1e-6)
    # per token too, ignored targets included
    g_c, _ = model.abstract_params(dataclasses.replace(cfg, loss_chunk=chunk))
    losses_c, valid_c = model.forward_losses(g_c, params, x, t)
    losses, valid = model.token_losses(model.forward(graphdef, params, x), t)
    np.testing.assert_allclose(losses_c, losses, atol=1e-6)
    np.testing.assert_array_equal(valid_c, valid)


def test_chunked_loss_keeps_the_softcap():
    cfg = tiny()
    graphdef, params = randomized(cfg)
    params = jax.tree.map(lambda p: 100 * p, params)  # logits far beyond the cap
    x, t = batch()
    g_c, _ = model.abstract_params(dataclasses.replace(cfg, loss_chunk=8))
    losses_c, _ = model.forward_losses(g_c, params, x, t)
    losses, _ = model.token_losses(model.forward(graphdef, params, x), t)
    np.testing.assert_allclose(losses_c, losses, rtol=1e-6)
    assert float(losses.max()) < 2 * 15.0 + np.log(97)  # capped logits bound the loss


@pytest.mark.parametrize("remat", ["dots", "full"])
def test_remat_leaves_gradients_unchanged(remat):
    cfg = tiny()
    _, params = randomized(cfg)
    x, t = batch()
    loss, grads = value_and_grad(cfg, params, x, t)
    loss_r, grads_r = value_and_grad(dataclasses.replace(cfg, remat=remat, loss_chunk=8), params, x, t)
    assert float(loss_r) == pytest.approx(float(loss), rel=1e-6)
    assert_trees_close(grads_r, grads, 1e-6)


def test_remat_really_recomputes():
    """XLA's own memory analysis of the gradient: "dots" keeps less than "none", "full" (only each block's input) less
    still."""
    cfg = tiny(n_layer=4)
    _, params = randomized(cfg)
    x = jnp.zeros((8, 32), jnp.int32)

    def temp_bytes(remat):
        graphdef, _ = model.abstract_params(dataclasses.replace(cfg, remat=remat))
        grad = jax.jit(jax.grad(lambda p: model.loss_fn(p, graphdef, x, x)))
        return grad.lower(params).compile().memory_analysis().temp_size_in_bytes

    none, dots, full = (temp_bytes(r) for r in ("none", "dots", "full"))
    assert full < dots < none, (none, dots, full)


def test_unknown_remat_is_refused():
    cfg = tiny(remat="everything")
    graphdef, params = model.init(cfg)
    with pytest.raises(ValueError, match="remat"):
        model.forward(graphdef, params, batch()[0])


def test_loss_chunk_is_tokens_per_device():
    c = C.default_config()  # d20: 32 rows of 2,048
    c.loss_chunk = 8192
    assert C.model_config(c).loss_chunk == 256  # positions of each of the device's 32 rows
    c.device_batch_size = 4
    assert C.model_config(c).loss_chunk == 0  # 2,048 positions: whole rows, unchunked
    c.loss_chunk = 0
    assert C.model_config(c).loss_chunk == 0


def test_rl_and_validation_losses_are_the_chunked_loss():
    cfg = tiny()
    graphdef, params = randomized(cfg)
    g_c, _ = model.abstract_params(dataclasses.replace(cfg, loss_chunk=8))
    x, t = batch()
    adv = jnp.asarray([1.0, -0.5, 0.25])
    assert float(rl.pg_loss(params, g_c, x, t, adv)) == pytest.approx(float(rl.pg_loss(params, graphdef, x, t, adv)),
                                                                       rel=1e-6)
    token_bytes = jnp.arange(97, dtype=jnp.int32) % 4  # some tokens without bytes
    nats_c, bytes_c = bpb.batch_nats_and_bytes(g_c, params, x, t, token_bytes)
    nats, nbytes = bpb.batch_nats_and_bytes(graphdef, params, x, t, token_bytes)
    assert float(nats_c) == pytest.approx(float(nats), rel=1e-6) and int(bytes_c) == int(nbytes)


def test_bf16_forward_keeps_fp32_masters_and_gradients():
    cfg = tiny(compute_dtype="bfloat16", loss_chunk=8, remat="full")
    graphdef, params = randomized(cfg)
    x, t = batch()
    cast = model.compute_params(cfg, params)
    assert cast["wte"].dtype == jnp.float32  # gathered by rows, then cast (embed)
    assert all(k.dtype == jnp.bfloat16 for k in jax.tree.leaves({k: v for k, v in cast.items() if k != "wte"}))
    grads = jax.grad(model.loss_fn)(params, graphdef, x, t)
    assert all(g.dtype == jnp.float32 and bool(jnp.any(g != 0)) for g in jax.tree.leaves(grads))
    # the same forward as casting each kernel at use
    logits = model.forward(graphdef, params, x)
    logits_at_use = model.softcapped_logits(cfg, nnx_hidden(graphdef, params, x), lambda h: h @ params["lm_head"][
        "kernel"].astype(h.dtype))
    np.testing.assert_array_equal(logits, logits_at_use)


def nnx_hidden(graphdef, params, x):
    """The model's hidden states with the fp32 params merged as they are (Linear casts each kernel at use)."""
    from flax import nnx

    return nnx.merge(graphdef, params).hidden(x)[0]


def test_weights_are_all_gathered_in_bf16():
    """FSDP gathers the cast bf16 weights, not the fp32 masters (the cast happens on each shard first); only the
    embedding table, gathered by rows in fp32 (embed), may move as fp32. XLA's CPU backend has no bf16 collectives:
    its float-normalization pass rewrites every bf16 all-gather as convert -> f32 all-gather -> convert, so the HLO is
    read without that pass (what a GPU compiles)."""
    c = C.default_config()
    c.update(dict(depth=2, head_dim=32, vocab_size=256, sequence_len=32, device_batch_size=2, total_batch_size=-1,
                  num_iterations=10, remat="full", loss_chunk=16))
    devices = jax.devices()[:4]
    d = C.derive(c, len(devices))
    mesh = sharding.make_mesh(1, 4, devices=devices)
    gcfg = C.model_config(c)
    graphdef, abstract = model.abstract_params(gcfg)
    tx = optim.make_optimizer(c, d)
    abstract_state = jax.eval_shape(tx.init, abstract)
    ps, bs = sharding.param_shardings(abstract, mesh), sharding.batch_sharding(mesh)
    step = train_step.jit_train_step(graphdef, tx, param_shardings=ps, batch_sharding=bs,
                                     state_shardings=sharding.state_shardings(tx, abstract, mesh))
    tokens = jax.ShapeDtypeStruct((1, 2 * len(devices), c.sequence_len), np.int32, sharding=bs)
    compiled = step.lower(abstract, abstract_state, {"inputs": tokens, "targets": tokens}, dryrun.HPARAMS).compile(
        compiler_options={"xla_disable_hlo_passes": "float-normalization-bf16"})
    kernels = {tuple(x.shape) for p, x in jax.tree_util.tree_leaves_with_path(abstract)
               if "wte" not in jax.tree_util.keystr(p)}
    gathers = re.findall(r"=\s*(\w+)\[([\d,]+)\][^ ]*\s+all-gather(?:-start)?\(", compiled.as_text())
    weight_gathers = [(dtype, dims) for dtype, dims in gathers if tuple(int(d) for d in dims.split(",")) in kernels]
    assert weight_gathers, "no weight all-gathers found: is the mesh sharding anything?"
    assert {dtype for dtype, _ in weight_gathers} == {"bf16"}, weight_gathers


# ---- device_batch_size="auto" -----------------------------------------------------------------------------------------


def test_auto_is_accepted_in_files_and_on_the_command_line():
    c = C.default_config()
    c.device_batch_size = "auto"  # as a config file would
    assert c.device_batch_size == "auto"
    c = C.apply_overrides(C.default_config(), {"device_batch_size": "auto"})
    assert c.device_batch_size == C.AUTO
    c = C.apply_overrides(c, {"device_batch_size": "16"})
    assert c.device_batch_size == 16
    with pytest.raises(C.ConfigError, match="top-level device_batch_size only"):
        C.apply_overrides(C.default_config(), {"sft.device_batch_size": "auto"})
    # a chat stage's own batch replaces the top-level "auto"
    c = C.apply_overrides(C.default_config(), {"device_batch_size": "auto"})
    assert C.stage_config(c, "sft").device_batch_size == 4
    assert C.stage_config(c, "mid").device_batch_size == C.AUTO


def test_derive_refuses_an_unresolved_auto_and_the_config_command_says_so(capsys):
    c = C.apply_overrides(C.default_config(), {"device_batch_size": "auto"})
    with pytest.raises(C.ConfigError, match="resolved at start-up"):
        C.derive(c, 8)
    assert C.main(["--config=configs/d20.py", "--config.device_batch_size=auto", "--devices=8"]) == 0
    out = capsys.readouterr().out
    assert "auto (resolved at start-up by compiling)" in out and "21,400 steps" in out


def test_auto_candidates_split_the_total_batch():
    c = C.default_config()  # 524,288 tokens of 2,048 per row
    assert C.auto_batch_candidates(c, 8) == [32, 16, 8, 4, 2, 1]
    assert C.auto_batch_candidates(c, 1) == [64, 32, 16, 8, 4, 2, 1]
    c.total_batch_size = 3 * 2048 * 8
    assert C.auto_batch_candidates(c, 8) == [1]
    c.total_batch_size = 1000
    with pytest.raises(C.ConfigError, match="total_batch_size=1000 is not a multiple of sequence_len"):
        C.auto_batch_candidates(c, 8)


def auto_config(**kw):
    c = C.default_config()
    c.update(dict(depth=2, head_dim=32, vocab_size=256, sequence_len=64, total_batch_size=-1, num_iterations=10,
                  compute_dtype="float32", loss_chunk=0), **kw)
    return C.with_device_batch(c, C.AUTO)


def test_auto_picks_the_largest_batch_that_fits():
    devices = jax.devices()[:1]
    need = {rows: dryrun.TrainProgram(C.with_device_batch(auto_config(), rows), "xla", devices).memory()["need_bytes"]
            for rows in (64, 32)}
    assert need[64] > need[32]
    limit = (need[64] + need[32]) / 2  # 32 rows fit, 64 do not
    c = auto_config(device_memory_gib=limit / dryrun.PREALLOCATE / 2**30)
    lines = []
    assert dryrun.auto_device_batch(c, devices, attention="xla", log=lines.append) == 32
    assert "64 rows need" in lines[0] and "32 rows need" in lines[0]
    resolved = dryrun.resolve_device_batch(c, devices, log=lambda s: None)
    assert resolved.device_batch_size == 32 and C.derive(resolved).device_batch_size == 32


def test_auto_says_when_nothing_fits():
    c = auto_config(total_batch_size=2 * 64, device_memory_gib=1e-6)  # candidates 2 and 1
    with pytest.raises(C.ConfigError, match="nothing fits.*2 rows need.*1 rows need"):
        dryrun.auto_device_batch(c, jax.devices()[:1], attention="xla", log=lambda s: None)
