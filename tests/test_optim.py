"""Parameter groups and schedules (nanochat-reference.md §2.1, §2.5)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
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
                for m, names in (("attn", ("c_q", "c_k", "c_v", "c_proj")), ("mlp", ("c_fc", "c_proj")))
                for n in names}
    assert muon == expected
    assert len(flat) == 3 * 6 + 2


def test_unknown_parameter_is_an_error_not_a_silent_group():
    with pytest.raises(ValueError, match="no optimizer group for parameter gain"):
        optim.labels({"gain": jnp.ones(3)})


def test_groups_update_at_their_own_learning_rates():
    c = tiny_config()
    d = C.derive(c)
    _, params = model.init(C.model_config(c))
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


def _scaled_to_norm(tree, norm):
    return jax.tree.map(lambda g: g * (norm / optax.tree.norm(tree)), tree)


def _two_steps(c, grads_1, grads_2):
    """Two optimizer updates (Adam's second step and Muon's momentum both mix the two gradients, so a rescaled second
    gradient changes the result; one step alone is nearly scale-invariant)."""
    d = C.derive(c)
    _, params = model.init(C.model_config(c))
    tx = optim.make_optimizer(c, d)
    state = tx.init(params)
    _, state = tx.update(grads_1, state, params, momentum=0.9)
    updates, _ = tx.update(grads_2, state, params, momentum=0.9)
    return updates


def test_grad_clip_scales_a_gradient_of_global_norm_5_to_norm_1_before_the_groups():
    c = tiny_config()
    _, params = model.init(C.model_config(c))
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(3), 2 * len(leaves))
    g1 = _scaled_to_norm(treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys[::2], leaves)]), 0.5)
    g2 = _scaled_to_norm(treedef.unflatten([jax.random.normal(k, x.shape) for k, x in zip(keys[1::2], leaves)]), 5.0)
    assert float(optax.tree.norm(g2)) == pytest.approx(5.0, rel=1e-6)
    g2_at_1 = jax.tree.map(lambda g: g / 5.0, g2)
    assert float(optax.tree.norm(g2_at_1)) == pytest.approx(1.0, rel=1e-6)

    ns32 = dict(muon_ns_dtype="float32")  # bf16 Newton-Schulz would amplify 1-ulp input differences
    clipped = _two_steps(tiny_config(grad_clip=1.0, **ns32), g1, g2)
    # the chain with clipping == the optimizer without clipping fed the norm-1 gradient (g1, norm 0.5, passes as is)
    by_hand = _two_steps(tiny_config(grad_clip=0.0, **ns32), g1, g2_at_1)
    unclipped = _two_steps(tiny_config(grad_clip=0.0, **ns32), g1, g2)
    for a, b in zip(jax.tree.leaves(clipped), jax.tree.leaves(by_hand)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # fp32 noise: ~1e-8 on updates ~1e-3
    # and clipping genuinely changed the step: without it, Adam's and Muon's second steps differ
    diff = {k: float(jnp.max(jnp.abs(clipped[k]["kernel"] - unclipped[k]["kernel"]))) if k == "lm_head"
            else float(jnp.max(jnp.abs(clipped[k] - unclipped[k]))) for k in ("wte", "lm_head")}
    assert min(diff.values()) > 1e-4, diff
    muon_diff = jnp.abs(clipped["blocks"][0]["mlp"]["c_fc"]["kernel"] - unclipped["blocks"][0]["mlp"]["c_fc"]["kernel"])
    assert float(jnp.max(muon_diff)) > 1e-4


def test_grad_clip_is_on_by_default_in_base_training_and_off_in_the_chat_stages():
    c = C.default_config()
    assert c.grad_clip == 1.0  # base_train.py, October 2025
    # mid_train.py, chat_sft.py and chat_rl.py (V0 and V0-late) never clip
    assert [C.stage_config(c, s).grad_clip for s in C.CHAT_STAGES] == [0.0, 0.0, 0.0]


def test_grad_clip_off_leaves_the_optimizer_state_structure_unchanged():
    c_on, c_off = tiny_config(grad_clip=1.0), tiny_config(grad_clip=0.0)
    _, params = model.abstract_params(C.model_config(c_on))
    s_on = jax.eval_shape(optim.make_optimizer(c_on, C.derive(c_on)).init, params)
    s_off = jax.eval_shape(optim.make_optimizer(c_off, C.derive(c_off)).init, params)
    assert jax.tree.structure(s_on) == jax.tree.structure(s_off)  # resuming with the other setting still loads
    with pytest.raises(ValueError, match="grad_clip must be >= 0"):
        optim.make_optimizer(tiny_config(grad_clip=-1.0), C.derive(c_on))
