"""The GPT: attention variants, causality, init, loss masking, and that it can learn."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat import model


def tiny(n_head=4, n_kv_head=4, **kw):
    base = dict(vocab_size=97, n_layer=2, n_head=n_head, n_kv_head=n_kv_head, n_embd=64, sequence_len=32,
                compute_dtype="float32")
    return model.GPTConfig(**{**base, **kw})


def randomize(params, seed=1):
    """Zero-init projections and head make many properties trivially true; give every weight a value."""
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([0.1 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def tokens(shape, vocab=97, seed=0):
    return jnp.asarray(np.random.default_rng(seed).integers(0, vocab, shape), jnp.int32)


@pytest.mark.parametrize("n_kv_head", [2, 1], ids=["gqa", "mqa"])
def test_grouped_attention_equals_mha_with_kv_heads_repeated(n_kv_head):
    cfg_g = tiny(n_kv_head=n_kv_head)
    graph_g, params_g = model.init(cfg_g)
    params_g = randomize(params_g)
    graph_m, params_m = model.init(tiny())
    group, hd = cfg_g.n_head // n_kv_head, cfg_g.head_dim
    params_m = jax.tree.map(lambda x: x, params_g)
    for i in range(cfg_g.n_layer):
        for name in ("c_k", "c_v"):
            kernel = params_g["blocks"][i]["attn"][name]["kernel"]  # (d, n_kv_head*hd)
            heads = kernel.reshape(kernel.shape[0], n_kv_head, hd)
            # query head h reads kv head h // group, so each kv head is repeated `group` times in a row
            params_m["blocks"][i]["attn"][name]["kernel"] = jnp.repeat(heads, group, axis=1).reshape(kernel.shape[0], -1)
    x = tokens((2, 16))
    np.testing.assert_allclose(model.forward(graph_g, params_g, x), model.forward(graph_m, params_m, x), atol=1e-5)


def test_kv_projections_have_kv_head_width():
    _, params = model.init(tiny(n_kv_head=1))
    assert params["blocks"][0]["attn"]["c_k"]["kernel"].shape == (64, 16)
    assert params["blocks"][0]["attn"]["c_q"]["kernel"].shape == (64, 64)


def test_attention_is_causal():
    graph, params = model.init(tiny())
    params = randomize(params)
    x = tokens((1, 16))
    y = x.at[0, 10:].set((x[0, 10:] + 1) % 97)
    a, b = model.forward(graph, params, x), model.forward(graph, params, y)
    np.testing.assert_allclose(a[0, :10], b[0, :10], atol=1e-6)
    assert not np.allclose(a[0, 10:], b[0, 10:])


def test_init_zeroes_output_projections_and_head_so_first_loss_is_ln_vocab():
    graph, params = model.init(tiny())
    for block in params["blocks"].values():
        assert not block["attn"]["c_proj"]["kernel"].any() and not block["mlp"]["c_proj"]["kernel"].any()
        assert block["attn"]["c_q"]["kernel"].std() == pytest.approx(64 ** -0.5, rel=0.1)
        # c_fc widens: std 1/sqrt(in) * min(1, sqrt(out/in)) = 1/sqrt(64)
        assert block["mlp"]["c_fc"]["kernel"].std() == pytest.approx(64 ** -0.5, rel=0.1)
    assert not params["lm_head"]["kernel"].any()
    assert params["wte"].std() == pytest.approx(1.0, rel=0.1)
    x = tokens((2, 16))
    assert model.loss_fn(params, graph, x, x) == pytest.approx(np.log(97), rel=1e-6)


def test_narrowing_layers_get_a_smaller_init():
    # c_proj of a non-zero-init 4d -> d layer: 1/sqrt(4d) * sqrt(1/4)
    layer = model.Linear(256, 64, model.fan_in_normal, rngs=__import__("flax").nnx.Rngs(0))
    assert float(layer.kernel[...].std()) == pytest.approx(256 ** -0.5 * 0.5, rel=0.1)


def test_logits_are_softcapped_at_15():
    graph, params = model.init(tiny())
    params = jax.tree.map(lambda p: 100 * p, randomize(params))
    logits = model.forward(graph, params, tokens((1, 8)))
    assert float(jnp.abs(logits).max()) <= 15.0
    assert float(jnp.abs(logits).max()) > 14.0


def test_loss_ignores_targets_of_minus_one():
    graph, params = model.init(tiny())
    params = randomize(params)
    x = tokens((2, 8))
    t = tokens((2, 8), seed=3)
    masked = t.at[:, :4].set(-1)
    losses, valid = model.token_losses(model.forward(graph, params, x), t)
    expected = losses[:, 4:].mean()
    assert model.loss_fn(params, graph, x, masked) == pytest.approx(float(expected), rel=1e-5)
    all_masked = jnp.full_like(t, -1)
    assert float(model.loss_fn(params, graph, x, all_masked)) == 0.0


def test_rotary_rotates_by_position_and_preserves_norm():
    x = jax.random.normal(jax.random.key(0), (1, 4, 2, 8))
    pos = jnp.arange(4)[None]
    cos, sin = model.rotary_tables(pos, 8, 10000.0, jnp.float32)
    y = model.apply_rotary(x, cos, sin)
    np.testing.assert_allclose(y[0, 0], x[0, 0], atol=1e-6)  # position 0 is the identity
    np.testing.assert_allclose(jnp.linalg.norm(y, axis=-1), jnp.linalg.norm(x, axis=-1), rtol=1e-2)  # bf16 tables
    # first frequency is 1 rad per position: y1 = x1 cos + x2 sin on the split halves
    np.testing.assert_allclose(y[0, 1, 0, 0], x[0, 1, 0, 0] * cos[0, 1, 0, 0] + x[0, 1, 0, 4] * sin[0, 1, 0, 0], rtol=1e-6)


def test_rms_norm_has_unit_rms_and_no_parameters():
    x = 3.0 * jax.random.normal(jax.random.key(0), (4, 64))
    y = model.rms_norm(x)
    np.testing.assert_allclose(jnp.sqrt(jnp.mean(y * y, -1)), 1.0, rtol=1e-5)


def test_bf16_compute_keeps_fp32_master_weights():
    graph, params = model.init(tiny(compute_dtype="bfloat16"))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
    logits = model.forward(graph, randomize(params), tokens((1, 8)))
    assert logits.dtype == jnp.float32


def test_bf16_embedding_gradient_is_accumulated_in_fp32():
    """A frequent token's embedding gradient sums the cotangents of thousands of positions; with a bf16 table that
    scatter-add runs in bf16 and loses percents. embed gathers fp32 rows first, so only the per-position cotangents
    are bf16 (as every activation is) and their sum is fp32."""
    cfg = tiny(vocab_size=256, compute_dtype="bfloat16")
    rng = np.random.default_rng(0)
    zipf = 1.0 / np.arange(1, 257) ** 1.1
    idx = jnp.asarray(rng.choice(256, size=(8, 512), p=zipf / zipf.sum()), jnp.int32)  # the top token ~900 times
    wte = jnp.asarray(rng.normal(size=(256, cfg.n_embd)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(8, 512, cfg.n_embd)), jnp.float32)

    def wte_grad(embed_fn):
        return np.asarray(jax.grad(lambda w: jnp.sum(embed_fn(cfg, w, idx).astype(jnp.float32) * cotangent))(wte))

    # Isolate the scatter: the per-position cotangents that reach the gathered rows through the bf16 cast and the
    # norm, summed per token in float64. Any error beyond that is the accumulation's.
    _, vjp = jax.vjp(lambda rows: model.rms_norm(rows.astype(jnp.bfloat16)).astype(jnp.float32), wte[idx])
    exact = np.zeros(wte.shape)
    np.add.at(exact, np.asarray(idx), np.asarray(vjp(cotangent)[0], np.float64))
    rel = lambda g: np.linalg.norm(g - exact) / np.linalg.norm(exact)

    def cast_then_gather(cfg, w, idx_BxT):  # the former embed: the whole table to bf16, then the rows
        return model.rms_norm(w.astype(jnp.dtype(cfg.compute_dtype))[idx_BxT])

    assert rel(wte_grad(model.embed)) < 1e-3  # measured 1.3e-8: fp32 summation order
    assert rel(wte_grad(cast_then_gather)) > 1e-3  # measured 1.7e-2: the bf16 scatter-add
    # the forward is the same either way: casting before or after the gather rounds the same values
    np.testing.assert_array_equal(model.embed(cfg, wte, idx), cast_then_gather(cfg, wte, idx))
