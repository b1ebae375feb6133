"""The 2026 Muon options (nanochat-reference.md §2.4), each against a hand computation on jaxchat's (in, out) layout,
where the reference's rows (output features) are the columns."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat import muon


def test_polar_express_on_a_diagonal_matrix_is_its_scalar_polynomial():
    # on diag(s) every iteration acts on each singular value alone: s <- a·s + b·s³ + c·s⁵, after s / (‖s‖·1.01)
    s = np.array([3.0, 1.0, 0.2, 0.01])
    x = muon.orthogonalize(jnp.diag(jnp.asarray(s, jnp.float32)), muon.POLAR_EXPRESS, dtype=jnp.float32,
                           normalize_scale=1.01)
    want = s / (np.linalg.norm(s) * 1.01 + 1e-7)
    for a, b, c in muon.POLAR_EXPRESS:
        want = a * want + b * want ** 3 + c * want ** 5
    np.testing.assert_allclose(np.diag(np.asarray(x)), want, rtol=1e-4)
    assert np.all(np.abs(np.diag(np.asarray(x))[:3] - 1) < 0.25)  # pushed towards 1, the small one included


def test_equilibrate_gives_every_output_feature_the_same_norm():
    x = jax.random.normal(jax.random.key(0), (6, 4)) * jnp.asarray([0.1, 1.0, 5.0, 2.0])  # (in, out): columns
    y = np.asarray(muon.equilibrate(x))
    cols = np.linalg.norm(y, axis=0)
    np.testing.assert_allclose(cols, np.linalg.norm(np.asarray(x)) / 2.0, rtol=1e-5)  # ‖X‖_F / sqrt(out=4)


def test_renormalize_sets_the_frobenius_norm_to_sqrt_min_side():
    x = jax.random.normal(jax.random.key(1), (6, 3))
    assert float(jnp.linalg.norm(muon.renormalize(x))) == pytest.approx(3 ** 0.5, rel=1e-5)


@pytest.mark.parametrize("shape, axis", [((4, 8), -2), ((8, 4), -1), ((4, 4), -2)])
def test_normuon_by_hand(shape, axis):
    assert muon.normuon_axis(shape) == axis  # one value per output feature when out >= in, else per input
    x = np.asarray(jax.random.normal(jax.random.key(2), shape))
    v = np.full([1 if i == axis % 2 else n for i, n in enumerate(shape)], 0.5, np.float32)
    got, v_new = muon.normuon(jnp.asarray(x), jnp.asarray(v), 0.9)
    v_mean = (x * x).mean(axis=axis, keepdims=True)
    want_v = v + 0.1 * (v_mean - v)
    scaled = x / np.sqrt(want_v)
    want = scaled * np.linalg.norm(x) / np.linalg.norm(scaled)  # per row/column adaptive, Frobenius norm kept
    np.testing.assert_allclose(np.asarray(v_new), want_v, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-4)


def test_cautious_weight_decay_masks_where_update_and_weight_disagree():
    u = jnp.asarray([[1.0, -1.0], [0.5, 0.0]])
    p = jnp.asarray([[2.0, 2.0], [-1.0, 3.0]])
    np.testing.assert_allclose(np.asarray(muon.cautious_decay(u, p, 0.1)), [[0.2, 0.0], [0.0, 0.3]])


def test_muon_with_every_2026_option_steps_and_keeps_normuon_state():
    params = {"a": jnp.ones((4, 8)) * 0.1, "b": jnp.ones((8, 4)) * -0.1}
    tx = muon.muon(0.02, coefficients=muon.POLAR_EXPRESS, ns_dtype=jnp.float32, equilibrate_rows=True, plus=True,
                   normuon_beta2=0.9, cautious_weight_decay=0.2)
    state = tx.init(params)
    assert isinstance(state, muon.NorMuonState)
    assert state.second_moment["a"].shape == (1, 8) and state.second_moment["b"].shape == (8, 1)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(3), p.shape), params)
    updates, state = tx.update(grads, state, params, momentum=0.9, weight_decay=0.1)
    assert all(np.isfinite(np.asarray(u)).all() for u in jax.tree.leaves(updates))
    assert float(jnp.abs(state.second_moment["a"]).sum()) > 0
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(grads, state)
    assert isinstance(muon.muon(0.02).init(params), muon.MuonState)  # October's state is unchanged
