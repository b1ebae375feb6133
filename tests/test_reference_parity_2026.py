"""jaxchat's 2026-recipe model against nanochat's own code at 92d63d4 (2026-07-03), run once on CPU in fp32 by
tests/fixtures/make_2026_parity.py: the same int8-exact initial weights (every feature active: windows 128/128/128/256,
value embeddings on layers 1 and 3, smear, backout after block 2, resid/x0 scalars, q/k x1.2, RoPE base 1e5, GQA, the
vocabulary padded 300 -> 320) must give the reference's logits and per-token losses."""
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat import convert, model

FIXTURE = Path(__file__).parent / "fixtures" / "parity_2026.npz"


@pytest.fixture(scope="module")
def reference():
    z = np.load(FIXTURE)
    return z, json.loads(str(z["meta"]))


def cfg_from(meta) -> model.GPTConfig:
    m = meta["model_config"]
    return model.GPTConfig(vocab_size=m["vocab_size"], n_layer=m["n_layer"], n_head=m["n_head"],
                           n_kv_head=m["n_kv_head"], n_embd=m["n_embd"], sequence_len=m["sequence_len"],
                           rope_base=100000.0, compute_dtype="float32", window_pattern=m["window_pattern"],
                           value_embeds=True, smear=True, backout=True, layer_scalars=True, qk_scale=1.2,
                           vocab_multiple=64, init="2026", rope_bf16=False)


def reference_params(z, cfg):
    """The fixture's weights in jaxchat's tree, through convert.py's name and layout mapping."""
    _, abstract = model.abstract_params(cfg)

    def one(path, like):
        key, transpose = convert.torch_name(path)
        w = z[f"q/{key}"].astype(np.float32) * z[f"scale/{key}"]
        w = w.T if transpose else w
        assert w.shape == like.shape, (key, w.shape, like.shape)
        return jnp.asarray(w)

    return jax.tree_util.tree_map_with_path(one, abstract)


def test_the_config_derives_the_references_layout(reference):
    _, meta = reference
    cfg = cfg_from(meta)
    assert [[cfg.window(i) or cfg.sequence_len, 0] for i in range(cfg.n_layer)] == meta["window_sizes"]
    assert [i for i in range(cfg.n_layer) if cfg.has_value_embed(i)] == meta["value_embed_layers"]
    assert cfg.padded_vocab == meta["padded_vocab_size"]
    _, params = model.abstract_params(cfg)
    assert model.num_params(params) == meta["param_counts"]["total"]


def test_logits_and_losses_equal_the_references(reference):
    z, meta = reference
    cfg = cfg_from(meta)
    graphdef, params = model.abstract_params(cfg)
    params = reference_params(z, cfg)
    rows = z["tokens"][0].astype(np.int32)
    inputs, targets = rows[:, :-1], rows[:, 1:]
    logits = np.asarray(jax.jit(lambda p, x: model.forward(graphdef, p, x))(params, inputs))
    np.testing.assert_allclose(logits[0], z["fwd/logits_row0"], rtol=1e-4, atol=1e-4)
    losses, _ = model.token_losses(jnp.asarray(logits), jnp.asarray(targets))
    np.testing.assert_allclose(np.asarray(losses), z["fwd/token_losses"], rtol=1e-4, atol=1e-4)
    assert float(np.mean(losses)) == pytest.approx(float(z["fwd/loss"]), abs=1e-5)


def recipe_2026(meta, **overrides):
    """jaxchat's config for the fixture's run: the 2026 model and optimizer at the tiny size, with the settings the
    generator pinned (batch lr scale 1 and weight decay 0.28, the reference point of the transfer rules; warmup 5)."""
    from jaxchat import config as C

    m = meta["model_config"]
    c = C.default_config()
    c.update(C.MODEL_2026)
    c.update(C.OPTIMIZER_2026)
    c.update(dict(depth=m["n_layer"], aspect_ratio=m["n_embd"] // m["n_layer"], head_dim=m["n_embd"] // m["n_head"],
                  n_kv_head=m["n_kv_head"], vocab_size=m["vocab_size"], sequence_len=m["sequence_len"],
                  window_pattern=m["window_pattern"], device_batch_size=meta["batch"], total_batch_size=-1,
                  num_iterations=meta["steps"], target_param_data_ratio=-1.0, compute_dtype="float32",
                  muon_ns_dtype="float32", warmup_steps=meta["base_train_flags"]["warmup_steps"]))
    c.update(overrides)
    return c


def run_steps(z, meta, c):
    from jaxchat import config as C
    from jaxchat import optim, sharding, train_step

    d = C.derive(c)
    graphdef, abstract = model.abstract_params(C.model_config(c))
    state = {k[2:]: z[k].astype(np.float32) * z["scale/" + k[2:]] for k in z.files if k.startswith("q/")}
    params = jax.tree.map(jnp.asarray, convert.convert_params(state, meta["model_config"]))
    tx = optim.make_optimizer(c, d)
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    ps, ss = sharding.param_shardings(abstract, mesh), sharding.state_shardings(tx, abstract, mesh)
    step = train_step.jit_train_step(graphdef, tx, param_shardings=ps, state_shardings=ss,
                                     batch_sharding=sharding.batch_sharding(mesh))
    params = jax.device_put(params, ps)
    opt_state = jax.jit(tx.init, out_shardings=ss)(params)
    tokens = z["tokens"].astype(np.int32)
    losses, schedules = [], []
    for i in range(d.num_iterations):
        hparams = optim.schedule(c, d, i)
        params, opt_state, out = step(params, opt_state, {"inputs": tokens[i, None, :, :-1],
                                                          "targets": tokens[i, None, :, 1:]}, hparams)
        losses.append(float(out["loss"]))
        schedules.append(hparams)
    final = float(model.loss_fn(params, graphdef, tokens[0, :, :-1], tokens[0, :, 1:]))
    return np.array(losses), schedules, final


@pytest.fixture(scope="module")
def jaxchat_run(reference):
    z, meta = reference
    return run_steps(z, meta, recipe_2026(meta))


def test_the_2026_schedules_match_the_references(reference, jaxchat_run):
    from jaxchat import config as C
    from jaxchat import optim

    z, meta = reference
    _, schedules, _ = jaxchat_run
    for key in ("lrm", "momentum", "weight_decay"):
        np.testing.assert_allclose([h[key] for h in schedules], z[f"train/{key}"], rtol=0, atol=1e-12, err_msg=key)
    # the whole 1000-step schedules at the defaults (warmup 40): the momentum ramp, its jump into the warmdown, the
    # cosine weight decay
    c = recipe_2026(meta, num_iterations=1000, warmup_steps=40)
    d = C.derive(c)
    full = [optim.schedule(c, d, i) for i in range(1000)]
    for key in ("lrm", "momentum", "weight_decay"):
        np.testing.assert_allclose([h[key] for h in full], z[f"schedule1000/{key}"], rtol=0, atol=1e-12, err_msg=key)


def test_every_step_loss_matches_the_reference(reference, jaxchat_run):
    z, _ = reference
    losses, _, final = jaxchat_run
    diff = np.abs(losses - z["train/losses"])
    assert diff.max() < 1e-5, f"max |loss diff| {diff.max():.2e} at step {diff.argmax()}: {losses}"
    assert abs(final - float(z["train/final_loss"])) < 1e-5


@pytest.mark.parametrize("change", [dict(muon_equilibrate=False), dict(muon_plus=False), dict(muon_normuon_beta2=0.0),
                                    dict(muon_weight_decay=0.0)], ids=lambda c: next(iter(c)))
def test_each_2026_optimizer_option_moves_the_losses(reference, change):
    """The comparison is sensitive to each option: without it the run misses the reference."""
    z, meta = reference
    losses, _, _ = run_steps(z, meta, recipe_2026(meta, **change))
    assert np.abs(losses - z["train/losses"]).max() > 1e-5


def test_configs_d24_derives_what_the_references_base_train_derives(reference):
    """configs/d24.py against the numbers base_train.py's own statements compute for the speedrun's d24 (recorded by
    the generator from empty 'meta' models): parameters, FLOPs, batch, horizon, every group's lr and weight decay."""
    from jaxchat import config as C
    from jaxchat import optim

    _, meta = reference
    want = meta["base_train_derived"]["d24_speedrun"]
    c = C.load_config(["--config=configs/d24.py"])
    d = C.derive(c, n_devices=8)
    assert (d.num_params, d.scaling_params, d.flops_per_token) == (
        want["param_counts"]["total"], want["num_scaling_params"], want["num_flops_per_token"])
    assert (d.total_batch_size, d.num_iterations) == (want["total_batch_size"], want["num_iterations"])
    assert d.batch_lr_scale == pytest.approx(want["batch_lr_scale"], rel=1e-12)
    assert d.muon_weight_decay == pytest.approx(want["weight_decay_scaled"], rel=1e-12)
    adamw = [g for g in want["group_initial_lrs"] if g["kind"] == "adamw"]  # head, wte, VEs, resid, x0, gates
    ours = [optim.ADAMW_2026[name] for name in ("unembedding", "embedding", "value_embeds", "resid", "x0", "gates")]
    for (lr, betas, wd), ref in zip(ours, adamw):
        assert (lr(c, d), betas, wd) == (pytest.approx(ref["initial_lr"], rel=1e-12), tuple(ref["betas"]),
                                         ref["weight_decay"])
    for g in (g for g in want["group_initial_lrs"] if g["kind"] == "muon"):
        assert g["initial_lr"] == pytest.approx(d.matrix_lr, rel=1e-12)


def test_the_2026_optimizer_state_shards_over_4_devices(reference):
    """NorMuon's second moments (one value per row or column) follow their parameter's split where it still divides."""
    from jaxchat import config as C
    from jaxchat import optim, sharding

    _, meta = reference
    c = recipe_2026(meta)
    d = C.derive(c, n_devices=4)
    _, abstract = model.abstract_params(C.model_config(c))
    tx = optim.make_optimizer(c, d)
    mesh = sharding.make_mesh()
    ss = sharding.state_shardings(tx, abstract, mesh)
    state = jax.jit(tx.init, out_shardings=ss)(model.init(C.model_config(c))[1])
    moments = jax.tree.leaves(state[1].inner_states["muon"].inner_state.second_moment)
    assert any(len(m.sharding.device_set) == 4 and m.sharding.spec != jax.sharding.PartitionSpec() for m in moments)
