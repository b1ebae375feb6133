"""The 2026 recipe's model options, each checked alone against a hand computation, and the one forward with all of them
on: cached greedy decoding (windows crossed, smear across the prefill/decode boundary) equals full-forward greedy."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import fixtures_model
from fixtures_tok import ByteTokenizer
from jaxchat import engine, model
from jaxchat.config import MODEL_2026
from test_engine import greedy_by_full_forward

TOK = ByteTokenizer()
ALL_ON = {**MODEL_2026, "window_pattern": "SL"}  # two layers: one short, the last long


def cfg_2026(**kw):
    base = dict(vocab_size=TOK.vocab_size, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, sequence_len=256,
                compute_dtype="float32", **ALL_ON)
    return model.GPTConfig(**{**base, **kw})


def test_windows_per_layer_and_value_embedding_layers():
    cfg = cfg_2026(n_layer=24, sequence_len=2048, window_pattern="SSSL")
    assert [cfg.window(i) for i in range(24)] == [512, 512, 512, 0] * 6  # "S": ceil(2048/4/128)·128; "L": all
    assert cfg_2026(n_layer=4, window_pattern="SSSL").window(0) == 128  # T=256: ceil(0.5)·128
    assert cfg_2026(n_layer=3, window_pattern="S").window(2) == 0  # the last layer is always long
    assert [i for i in range(4) if cfg_2026(n_layer=4).has_value_embed(i)] == [1, 3]  # alternating, ending last
    assert [i for i in range(5) if cfg_2026(n_layer=5).has_value_embed(i)] == [0, 2, 4]
    assert not model.GPTConfig(vocab_size=300, n_layer=4, n_head=2, n_kv_head=2, n_embd=64,
                               sequence_len=64).has_value_embed(3)


def test_d24_parameter_count_is_the_references():
    # nanochat-reference.md §1.4: d24 at vocab 32,768 has 1,384,122,122 parameters (value embeddings on 12 layers,
    # gates, 74 scalars); counted on the model's abstract parameters, nothing allocated.
    cfg = model.GPTConfig(vocab_size=32768, n_layer=24, n_head=12, n_kv_head=12, n_embd=1536, sequence_len=2048,
                          **{**ALL_ON, "window_pattern": "SSSL"})
    _, params = model.abstract_params(cfg)
    assert model.num_params(params) == 1_384_122_122
    assert sum(x.size for x in jax.tree.leaves(params["value_embeds"])) == 603_979_776
    assert params["blocks"][1]["attn"]["ve_gate"]["kernel"].shape == (12, 12)
    assert "ve_gate" not in params["blocks"][0]["attn"]


def test_2026_init():
    cfg = cfg_2026(n_embd=128, n_head=2, n_kv_head=2, n_layer=4)
    _, params = model.init(cfg, seed=0)
    s = (3 / 128) ** 0.5
    q = np.asarray(params["blocks"][0]["attn"]["c_q"]["kernel"])
    assert np.abs(q).max() <= s and q.std() == pytest.approx(128 ** -0.5, rel=0.05)  # U(±s): std 1/sqrt(d)
    assert np.abs(np.asarray(params["blocks"][0]["mlp"]["c_fc"]["kernel"])).max() <= 0.4 * s
    assert not np.asarray(params["blocks"][0]["attn"]["c_proj"]["kernel"]).any()
    assert np.asarray(params["wte"]).std() == pytest.approx(0.8, rel=0.05)
    assert np.asarray(params["lm_head"]["kernel"]).std() == pytest.approx(0.001, rel=0.05)
    assert params["wte"].shape == (320, 128)  # 265 ids padded to a multiple of 64
    np.testing.assert_allclose(params["resid_lambdas"], [1.15, 1.15 - 0.1 / 3, 1.15 - 0.2 / 3, 1.05], rtol=1e-6)
    np.testing.assert_allclose(params["x0_lambdas"], [0.20, 0.15, 0.10, 0.05], rtol=1e-6)
    assert float(params["smear_lambda"][0]) == 0.0 and float(params["backout_lambda"][0]) == pytest.approx(0.2)
    gate = np.asarray(params["blocks"][1]["attn"]["ve_gate"]["kernel"])
    assert gate.shape == (12, 2) and 0 <= gate.min() and gate.max() <= 0.02


def test_smear_by_hand():
    cfg = cfg_2026(value_embeds=False, backout=False, layer_scalars=False)
    graphdef, params = fixtures_model.random_params(cfg, seed=2)
    gpt = nnx.merge(graphdef, params)
    idx = jnp.asarray([[256, 104, 105]])
    e = np.asarray(model.embed(cfg, params["wte"], idx))[0]
    got = np.asarray(gpt.smear_in(jnp.asarray(e[None]), jnp.arange(3)[None]))[0]
    lam, w = float(params["smear_lambda"][0]), np.asarray(params["smear_gate"]["kernel"])[:, 0]
    sig = lambda z: 1 / (1 + np.exp(-z))  # noqa: E731
    np.testing.assert_allclose(got[0], e[0], rtol=1e-6)  # the first token has no previous one
    for t in (1, 2):
        np.testing.assert_allclose(got[t], e[t] + lam * sig(e[t, :24] @ w) * e[t - 1], rtol=1e-5, atol=1e-6)


def test_value_embedding_gate_by_hand():
    cfg = cfg_2026(n_layer=1, window_pattern="L", smear=False, backout=False, layer_scalars=False, qk_scale=1.0)
    graphdef, params = fixtures_model.random_params(cfg, seed=3)
    attn = nnx.merge(graphdef, params).blocks[0].attn
    x = jax.random.normal(jax.random.key(0), (1, 5, 64))
    ve = jax.random.normal(jax.random.key(1), (1, 5, 32))
    cos, sin = model.rotary_tables(jnp.arange(5)[None], cfg.head_dim, cfg.rope_base, jnp.float32)
    # attention output is linear in v given the scores: the gate's contribution is attn(v + g·ve) - attn(v)
    with_ve, _ = attn(x, cos, sin, ve_BxTxE=ve)
    gate = 3 / (1 + np.exp(-(np.asarray(x)[..., :12] @ np.asarray(params["blocks"][0]["attn"]["ve_gate"]["kernel"]))))
    ve_scaled = (gate[..., None] * np.asarray(ve).reshape(1, 5, 2, 16)).reshape(1, 5, 32)
    c_v = np.asarray(params["blocks"][0]["attn"]["c_v"]["kernel"])
    # the same output through a v-projection whose output already includes the gated value embedding
    attn.c_v = model.Linear(64, 32, rngs=nnx.Rngs(0))
    shifted = np.asarray(x)[0] @ c_v + ve_scaled[0]
    attn.c_v.kernel[...] = jnp.asarray(np.linalg.lstsq(np.asarray(x)[0], shifted, rcond=None)[0])
    del attn.ve_gate
    plain, _ = attn(x, cos, sin)
    np.testing.assert_allclose(np.asarray(with_ve), np.asarray(plain), rtol=1e-4, atol=1e-5)


def test_padded_vocabulary_is_cut_from_the_logits_and_backout_and_scalars_change_them():
    cfg = cfg_2026()
    graphdef, params = fixtures_model.random_params(cfg, seed=4)
    idx = jnp.asarray([[256, 1, 2, 3]])
    logits = model.forward(graphdef, params, idx)
    assert logits.shape == (1, 4, TOK.vocab_size)
    for name in ("backout", "layer_scalars"):
        off = cfg_2026(**{name: False})
        g_off, p_off = model.abstract_params(off)
        kept = {k: v for k, v in params.items() if k in p_off}
        assert not np.allclose(model.forward(g_off, kept, idx), logits), name


@pytest.mark.parametrize("n_kv_head", [4, 1], ids=["mha", "mqa"])
def test_cached_greedy_equals_full_forward_greedy_with_every_2026_option(n_kv_head):
    # T = 256: layer 0 attends over 128 keys; prompts of 3..60 tokens plus 140 new cross the window, the smear crosses
    # the prefill/decode boundary in rows of different lengths, and the cache grows through three buckets.
    cfg = cfg_2026(n_kv_head=n_kv_head)
    graphdef, params = fixtures_model.random_params(cfg, seed=n_kv_head, scale=0.3)
    params["lm_head"]["kernel"] = params["lm_head"]["kernel"].at[:, 256:].set(0.0)  # no stop or tool tokens
    prompts = [TOK.encode("hi", prepend="<|bos|>"), TOK.encode("x" * 59, prepend="<|bos|>")]
    max_tokens = [140, 140]
    got, _ = engine.Engine(cfg, params, TOK).generate_batch(prompts, max_tokens=max_tokens, temperature=0.0)
    assert got == greedy_by_full_forward(graphdef, params, prompts, max_tokens)


def test_windowed_training_attention_equals_an_explicit_mask():
    cfg = cfg_2026(n_layer=1, window_pattern="S", value_embeds=False, smear=False, backout=False,
                   layer_scalars=False, sequence_len=256)
    assert cfg.window(0) == 0  # one layer: the last, long
    cfg = cfg_2026(n_layer=2, window_pattern="S", value_embeds=False, smear=False, backout=False, layer_scalars=False)
    graphdef, params = fixtures_model.random_params(cfg, seed=5)
    idx = jax.random.randint(jax.random.key(0), (2, 200), 0, 256)
    full = model.forward(graphdef, params, idx)
    cache = model.KVCache.zeros(cfg, 2, 256)  # the cached path masks the window explicitly
    cached, _ = model.forward_cached(graphdef, params, idx, cache)
    np.testing.assert_allclose(np.asarray(cached), np.asarray(full), rtol=1e-4, atol=1e-4)


def d24_run6():
    """configs/d24.py: nanochat's time-to-GPT-2 Run 6 (nanochat-reference.md §3.2)."""
    from jaxchat import config as C

    return C.load_config(["--config=configs/d24.py"])


def test_d24_derives_the_references_figures():
    from jaxchat import config as C

    d = C.derive(d24_run6(), n_devices=8)
    assert (d.num_params, d.scaling_params) == (1_384_122_122, 729_810_624)
    assert f"{d.flops_per_token:.6e}" == "4.775226e+09"  # 6·matmul params + windows' attention (§1.5)
    assert (d.total_batch_size, d.num_iterations, d.grad_accum_steps) == (1_048_576, 5_568, 4)
    # the 2026 transfer: sqrt(B / 2^19) on every lr, the width scale on AdamW's; Muon's weight decay by the batch and
    # the horizons (§2.1 worked example, §2.5; the reference's code computes 0.05973842446340308)
    assert d.embedding_lr == pytest.approx(0.3) and d.unembedding_lr == pytest.approx(0.008)
    assert d.matrix_lr == pytest.approx(0.02 * 2 ** 0.5)
    assert d.muon_weight_decay == pytest.approx(0.05973842446340308, rel=1e-12)


@pytest.mark.parametrize("depth, batch", [(8, 2**18), (12, 2**19), (20, 2**20), (26, 2**20), (32, 2**21)])
def test_the_2026_batch_rule_by_depth(depth, batch):
    from jaxchat import config as C

    c = d24_run6()
    c.depth, c.device_batch_size, c.num_iterations = depth, 1, 1
    assert C.derive(c).total_batch_size == batch  # §2.5: d8 2^18, d10–16 2^19, d18–26 2^20, d32–50 2^21


def test_october_configs_are_unchanged_by_the_2026_fields():
    from jaxchat import config as C

    d = C.derive(C.load_config(["--config=configs/d20.py"]))
    assert (d.num_params, f"{d.flops_per_token:.6e}", d.num_iterations) == (560_988_160, "3.491758e+09", 21_400)
    assert d.scaling_params == d.num_params - d.num_embedding_params
