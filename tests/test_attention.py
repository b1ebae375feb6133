"""Causal attention: the chunked XLA attention equals plain attention, and "auto" falls back from a cuDNN that fails
or leaks future tokens."""
import jax
import jax.numpy as jnp
import pytest

from jaxchat import model


@pytest.mark.parametrize("B,T,H,K,D,window,chunk", [
    (2, 64, 4, 4, 16, 0, 16),   # MHA, 4 query blocks
    (1, 128, 4, 1, 8, 16, 32),  # MQA with a sliding window narrower than a block
    (2, 96, 6, 2, 8, 40, 32),   # GQA, a window spanning blocks
    (1, 48, 2, 2, 8, 0, 512),   # T below the block size: one block
])
def test_chunked_attention_and_its_gradient_equal_plain_attention(monkeypatch, B, T, H, K, D, window, chunk):
    monkeypatch.setattr(model, "CHUNK", chunk)
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (B, T, H, D))
    k, v = jax.random.normal(ks[1], (B, T, K, D)), jax.random.normal(ks[2], (B, T, K, D))
    cot = jax.random.normal(ks[3], (B, T, H, D))

    def loss(impl):
        return lambda q, k, v: jnp.sum(model.causal_attention(q, k, v, impl, window) * cot)

    assert loss("chunked")(q, k, v) == pytest.approx(float(loss("xla")(q, k, v)), abs=1e-4)
    for got, want in zip(jax.grad(loss("chunked"), (0, 1, 2))(q, k, v), jax.grad(loss("xla"), (0, 1, 2))(q, k, v)):
        assert float(jnp.max(jnp.abs(got - want))) < 1e-5


def test_chunked_attention_keeps_no_score_matrix_for_the_backward():
    """What the backward saves is q, k, v, the output and the logsumexp: nothing T×T per layer."""
    B, T, H, D = 1, 1024, 2, 16
    q = jax.ShapeDtypeStruct((B, T, H, D), jnp.float32)
    residuals = jax.eval_shape(lambda q: jax.vjp(lambda q: model.chunked_attention(q, q, q), q)[1], q)
    saved = sum(x.size for x in jax.tree.leaves(residuals))
    assert saved < 6 * B * T * H * D  # q, k, v, out (4·B·T·H·D) and the logsumexp (B·H·T); T×T would be 64x more


def test_auto_attention_falls_back_to_xla_when_cudnn_fails_and_says_why():
    from jaxchat import model

    assert model.resolve_attention("xla", "gpu") == ("xla", "attention=xla from the config")
    assert model.resolve_attention("auto", "cpu")[0] == "xla"
    impl, why = model.resolve_attention("auto", "gpu")  # on this CPU cuDNN raises, as a broken install would
    assert impl == "chunked" and why.startswith("cuDNN attention failed")


def test_the_attention_check_catches_a_kernel_that_leaks_future_tokens(monkeypatch):
    import jax

    from jaxchat import model

    real = jax.nn.dot_product_attention

    def leaky(q, k, v, *, is_causal=False, local_window_size=None, implementation=None, mask=None):
        if mask is not None:  # the fp32 reference
            return real(q, k, v, mask=mask, implementation="xla")
        return real(q, k, v, is_causal=False, implementation="xla")  # the window and causality ignored

    monkeypatch.setattr(jax.nn, "dot_product_attention", leaky)
    errors = model.attention_errors("xla", B=1, T=64, H=2, H_kv=2, D=16, window=16)
    assert max(errors.values()) > model.ATTENTION_TOLERANCE
