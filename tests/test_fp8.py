"""fp8 training matmuls (the 2026 record's --fp8): tensorwise-scaled e4m3 forward, e5m2 gradients; on a CPU the numbers
only, in the HLO the fp8 operands a GPU's GEMM rewriter turns into FP8 GEMMs."""
import jax
import jax.numpy as jnp
from flax import nnx

import fixtures_model
from jaxchat import model


def rel(a, b):
    return float(jnp.linalg.norm(a.astype(jnp.float32) - b) / jnp.linalg.norm(b))


def test_fp8_matmul_and_its_gradients_are_close_to_exact():
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (64, 128), jnp.float32)
    w = jax.random.normal(kw, (128, 256), jnp.float32) * 0.05
    g = jax.random.normal(kg, (64, 256), jnp.float32)
    y, vjp = jax.vjp(model.fp8_matmul, x, w)
    dx, dw = vjp(g)
    assert rel(y, x @ w) < 0.05  # e4m3 keeps 3 mantissa bits: ~3% per element, averaging out in the sum
    assert rel(dx, g @ w.T) < 0.1 and rel(dw, x.T @ g) < 0.1  # e5m2 gradients: 2 mantissa bits
    assert rel(y, x @ w) > 1e-4  # it did round


def test_the_fp8_model_puts_its_eligible_matmuls_in_fp8_and_trains_like_bf16():
    base = dict(vocab_size=320, n_layer=2, n_head=2, n_kv_head=2, n_embd=128, sequence_len=64, compute_dtype="float32",
                value_embeds=True, smear=True, vocab_multiple=64, init="2026")
    cfg, cfg8 = model.GPTConfig(**base), model.GPTConfig(**base, fp8=True)
    graphdef, params = fixtures_model.random_params(cfg, seed=1, scale=0.1)
    graphdef8, _ = model.abstract_params(cfg8)  # the same parameters; the fp8 flags live in the graph
    m8 = nnx.merge(graphdef8, params)
    assert m8.blocks[0].attn.c_q.fp8 and m8.blocks[0].mlp.c_fc.fp8 and m8.lm_head.fp8
    assert not m8.blocks[1].attn.ve_gate.fp8 and not m8.smear_gate.fp8  # gates: too small to gain
    x = jax.random.randint(jax.random.key(2), (2, 64), 0, 300)
    loss, grads = jax.value_and_grad(model.loss_fn)(params, graphdef, x, x)
    loss8, grads8 = jax.value_and_grad(model.loss_fn)(params, graphdef8, x, x)
    assert abs(float(loss8) - float(loss)) < 0.02 * float(loss)
    g, g8 = (jnp.concatenate([v.ravel() for v in jax.tree.leaves(t)]) for t in (grads, grads8))
    assert rel(g8, g) < 0.2
    hlo = jax.jit(jax.grad(model.loss_fn), static_argnums=1).lower(params, graphdef8, x, x).as_text().lower()
    assert "f8e4m3fn" in hlo and "f8e5m2" in hlo


def test_fp8_only_where_the_device_has_fp8_gemms(capsys):
    import types

    from jaxchat import trainer

    gpu = lambda cc, kind: types.SimpleNamespace(platform="gpu", compute_capability=cc, device_kind=kind)  # noqa: E731
    assert model.fp8_supported(gpu("9.0", "NVIDIA H100 80GB HBM3"))[0]
    assert model.fp8_supported(gpu("8.9", "NVIDIA L4"))[0]
    ok, why = model.fp8_supported(gpu("8.0", "NVIDIA A100-SXM4-80GB"))
    assert not ok and "8.9 and later" in why
    cfg = model.GPTConfig(vocab_size=300, n_layer=1, n_head=2, n_kv_head=2, n_embd=128, sequence_len=64, fp8=True)
    assert not trainer.resolve_fp8(cfg).fp8  # this CPU: bf16, and the log says why
    assert "fp8: off (no FP8 GEMMs on cpu)" in capsys.readouterr().out
