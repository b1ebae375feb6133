"""Parameter groups and schedules (nanochat-reference.md §2.1, §2.5)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat import config as C
from jaxchat import model, optim


def tiny_config(**kw):
    c = C.default_config()
    c.update(dict(depth=2, head_dim=32, vocab_size=128, sequence_len=16, device_batch_size=2, total_batch_size=-1,
                  num_iterations=100, compute_dtype="float32"), **kw)
    return c


def test_labels_send_block_matrices_to_muon_and_embeddings_to_adamw():
    cfg = model.GPTConfig(vocab_size=128, n_layer=3, n_head=2, n_kv_head=1, n_embd=64, sequence_len=16)
    _, params = model.abstract_params(cfg)
    labels = optim.labels(params)
    assert labels["wte"] == "embedding"
    assert labels["lm_head"]["kernel"] == "unembedding"
    flat = jax.tree_util.tree_leaves_with_path(labels)
    muon = {jax.tree_util.keystr(p) for p, label in flat if label == "muon"}
    expected = {f"['blocks'][{i}]['{m}']['{n}']['kernel']" for i in range(3)
                for m, names in (("attn", ("c_q", "c_k", "c_v", "c_proj_attn")), ("mlp", ("c_fc", "c_proj_mlp")))
                for n in names}
    assert muon == expected
    assert len(flat) == 3 * 6 + 2


def test_unknown_parameter_is_an_error_not_a_silent_group():
    with pytest.raises(ValueError, match="no optimizer group for parameter gain"):
        optim.labels({"gain": jnp.ones(3)})


def test_groups_update_at_their_own_learning_rates():
    c = tiny_config()
    d = C.derive(c)
    _, params = model.init(model.GPTConfig.from_config(c))
    tx = optim.make_optimizer(c, d)
    grads = jax.tree.map(lambda p: jnp.ones_like(p), params)
    updates, _ = tx.update(grads, tx.init(params), params, momentum=0.9)
    # First Adam step is sign(g) * lr (bias-corrected); embedding lr = 0.2 * (64/768)^-0.5
    np.testing.assert_allclose(updates["wte"], -d.embedding_lr, rtol=1e-5)
    np.testing.assert_allclose(updates["lm_head"]["kernel"], -d.unembedding_lr, rtol=1e-5)
    # Muon on an all-ones (rank-1) gradient: the update has spectral norm ~lr * scale (c_fc: 2x)
    fc = np.asarray(updates["blocks"][0]["mlp"]["c_fc"]["kernel"])
    assert np.linalg.norm(fc, 2) == pytest.approx(0.02 * 2.0, rel=0.35)


def test_lr_schedule_is_flat_then_linear_warmdown_to_zero():
    lrm = lambda s: optim.lr_multiplier(s, 100, 0.0, 0.2, 0.0)
    assert [lrm(0), lrm(50), lrm(80)] == [1.0, 1.0, 1.0]
    assert lrm(90) == pytest.approx(0.5)
    assert lrm(100) == pytest.approx(0.0)
    warm = lambda s: optim.lr_multiplier(s, 100, 0.1, 0.2, 0.05)
    assert warm(0) == pytest.approx(0.1) and warm(9) == 1.0
    assert warm(100) == pytest.approx(0.05)


def test_muon_momentum_ramps_from_085_to_095_over_300_steps():
    assert optim.muon_momentum(0) == 0.85
    assert optim.muon_momentum(150) == pytest.approx(0.90)
    assert optim.muon_momentum(300) == pytest.approx(0.95)
    assert optim.muon_momentum(10_000) == pytest.approx(0.95)


def test_schedule_gives_the_traced_hyperparameters():
    c = tiny_config(muon_momentum_warmup=10)
    h = optim.schedule(c, C.derive(c), 5)
    assert h == {"lrm": 1.0, "momentum": pytest.approx(0.90)}
