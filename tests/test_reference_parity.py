"""jaxchat configured as October 2025 nanochat trains exactly as nanochat's own code does.

tests/fixtures/october_parity.npz holds 20 steps of the reference's base training run by the reference's own GPT,
Muon, AdamW and schedule code (karpathy/nanochat 3a5e0bc, written by make_october_parity.py with torch): the initial
weights, the batches, and each step's loss and pre-clip gradient norm. Here jaxchat's real train step, optimizer and
schedule, with everything derived by jaxchat.config from the October defaults, run the same 20 steps. The only
settings changed from the defaults are the tiny model's shape and the two precision fields the fixture pins to fp32
(compute_dtype, muon_ns_dtype)."""
import json
from pathlib import Path

import jax
import numpy as np
import pytest

from jaxchat import config as C
from jaxchat import convert, model, optim, sharding, train_step

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "october_parity.npz"


@pytest.fixture(scope="module")
def reference():
    with np.load(FIXTURE) as z:
        data = {k: z[k] for k in z.files}
    meta = json.loads(str(data["meta"]))
    state = {k[len("q/"):]: data[k].astype(np.float32) * data["scale/" + k[len("q/"):]]
             for k in data if k.startswith("q/")}
    return meta, state, data


def october_config(meta):
    m = meta["model_config"]
    c = C.default_config()  # the October recipe: lrs, betas, eps, schedule, momentum ramp, grad_clip 1.0
    c.update(dict(depth=m["n_layer"], aspect_ratio=m["n_embd"] // m["n_layer"], head_dim=m["n_embd"] // m["n_head"],
                  vocab_size=m["vocab_size"], sequence_len=m["sequence_len"], device_batch_size=meta["batch"],
                  total_batch_size=-1, num_iterations=meta["steps"], target_param_data_ratio=-1.0,
                  compute_dtype="float32", muon_ns_dtype="float32"))
    return c


@pytest.fixture(scope="module")
def jaxchat_run(reference):
    meta, state, data = reference
    c = october_config(meta)
    d = C.derive(c)
    cfg = C.model_config(c)
    graphdef, abstract = model.abstract_params(cfg)
    params = jax.tree.map(jax.numpy.asarray, convert.convert_params(state, meta["model_config"]))  # (out, in) -> (in, out)
    tx = optim.make_optimizer(c, d)
    mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
    ps = sharding.param_shardings(abstract, mesh)
    ss = sharding.state_shardings(tx, abstract, mesh)
    step = train_step.jit_train_step(graphdef, tx, param_shardings=ps, state_shardings=ss,
                                     batch_sharding=sharding.batch_sharding(mesh))
    params = jax.device_put(params, ps)
    opt_state = jax.jit(tx.init, out_shardings=ss)(params)
    tokens = data["tokens"].astype(np.int32)
    losses, norms, schedules = [], [], []
    for i in range(d.num_iterations):
        hparams = optim.schedule(c, d, i)
        batch = {"inputs": tokens[i, None, :, :-1], "targets": tokens[i, None, :, 1:]}  # one micro-batch
        params, opt_state, metrics = step(params, opt_state, batch, hparams)
        losses.append(float(metrics["loss"]))
        norms.append(float(metrics["grad_norm"]))
        schedules.append(hparams)
    final_loss = float(model.loss_fn(params, graphdef, tokens[0, :, :-1], tokens[0, :, 1:]))
    return c, d, np.array(losses), np.array(norms), schedules, final_loss


def test_fixture_is_the_october_recipe_at_a_tiny_size(reference):
    meta, state, data = reference
    assert meta["commit"].startswith("3a5e0bc")
    d = C.derive(october_config(meta))
    # the reference's settings, read from its base_train.py, are jaxchat's defaults
    defaults = C.default_config()
    assert {k: defaults[k] for k in meta["settings"]} == meta["settings"]
    assert d.model.n_embd == meta["model_config"]["n_embd"] and d.model.n_head == meta["model_config"]["n_head"]
    assert all(np.all(w != 0) for w in state.values())  # no zero-init weight hides a layout or a gradient
    assert FIXTURE.stat().st_size < 1_000_000


def test_schedule_matches_the_reference(reference, jaxchat_run):
    _, _, data = reference
    _, _, _, _, schedules, _ = jaxchat_run
    np.testing.assert_allclose([h["lrm"] for h in schedules], data["lrm"], rtol=0, atol=1e-12)
    np.testing.assert_allclose([h["momentum"] for h in schedules], data["momentum"], rtol=0, atol=1e-12)
    assert data["lrm"][-1] < 1.0  # the run reaches the warmdown


def test_every_step_loss_matches_the_reference(reference, jaxchat_run):
    _, _, data = reference
    _, _, losses, norms, _, final_loss = jaxchat_run
    assert np.max(data["grad_norms"]) > 1.0, "the fixture must exercise clipping"
    np.testing.assert_allclose(norms, data["grad_norms"], rtol=1e-4)  # the logged norm is the pre-clip one
    diff = np.abs(losses - data["losses"])
    assert diff.max() < 1e-5, f"max |loss diff| {diff.max():.2e} at step {diff.argmax()}: {losses} vs {data['losses']}"
    assert abs(final_loss - float(data["final_loss"])) < 1e-5  # the last update too


def test_without_clipping_the_run_departs_from_the_reference(reference):
    """The comparison is sensitive to the clip: the same run with grad_clip=0 misses the reference's losses."""
    meta, state, data = reference
    c = october_config(meta)
    c.grad_clip = 0.0
    d = C.derive(c)
    graphdef, _ = model.abstract_params(C.model_config(c))
    params = jax.tree.map(jax.numpy.asarray, convert.convert_params(state, meta["model_config"]))
    tx = optim.make_optimizer(c, d)
    opt_state = tx.init(params)
    tokens = data["tokens"].astype(np.int32)
    step = jax.jit(lambda p, s, b, h: train_step.train_step(graphdef, tx, p, s, b, h))
    losses = []
    for i in range(4):
        params, opt_state, m = step(params, opt_state, {"inputs": tokens[i, None, :, :-1],
                                                        "targets": tokens[i, None, :, 1:]}, optim.schedule(c, d, i))
        losses.append(float(m["loss"]))
    assert np.max(np.abs(np.array(losses) - data["losses"][:4])) > 1e-3
