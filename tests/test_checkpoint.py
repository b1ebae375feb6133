"""Checkpoints: exact resume, keep-N, async saves, damage detection with fallback, any-mesh restore, inspect.

conftest.py gives the session 4 emulated CPU devices before jax is imported.
"""
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from jaxchat import checkpoint as ckpt
from jaxchat import inspect as jinspect
from jaxchat import paths

CONFIG = {"run": "unit", "model": {"depth": 2, "width": 16}, "lr": 0.02, "tags": ["a", "b"]}
DATA_STATE = {"shard": 3, "row_group": 7, "epoch": 1, "buffer": [1, 2, 3]}
# Exact count of the params below, written out: 64*16 + 16*32 + 32*16 + 2
N_PARAMS = 2_050


def make_params():
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    return {"wte": jax.random.normal(k1, (64, 16)),
            "h": {"0": {"c_fc": jax.random.normal(k2, (16, 32)), "c_proj": jax.random.normal(k3, (32, 16))}},
            "lambdas": jnp.array([0.5, 1.5])}


def make_tx():
    # The real layout: Muon-like trace for matrices, AdamW for embeddings/scalars, so every state has MaskedNodes.
    labels = {"wte": "adam", "h": {"0": {"c_fc": "muon", "c_proj": "muon"}}, "lambdas": "adam"}
    return optax.multi_transform({"adam": optax.adamw(1e-3), "muon": optax.sgd(0.1, momentum=0.9)}, labels)


def trained_state(sharding=None):
    """Params and optimizer state after one real update, so moments and counts are not just zeros."""
    params = make_params()
    if sharding is not None:
        params = jax.tree.map(jax.device_put, params, sharding)
    tx = make_tx()
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: jnp.cos(p) * 0.1, params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state


def abstract(tree, sharding):
    """What the trainer passes: eval_shape structs with the current run's shardings attached."""
    shapes = jax.eval_shape(lambda: tree)
    if not isinstance(sharding, dict):
        return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding), shapes)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, sharding)


def abstract_opt(params_abstract):
    return jax.eval_shape(make_tx().init, params_abstract)


DEV0 = SingleDeviceSharding(jax.devices()[0])


def save(c, step, params, opt_state, rng=None, metrics=None):
    return c.save(step, params=params, opt_state=opt_state, rng=rng if rng is not None else jax.random.key(step),
                  data_state=DATA_STATE, config=CONFIG, metrics=metrics or {"loss": 1.0 / step})


def restore(c, step=None, **kw):
    params, opt_state = trained_state()
    ap = abstract(params, DEV0)
    return c.restore(step, abstract_params=ap, abstract_opt_state=abstract(opt_state, DEV0), **kw)


def assert_trees_equal(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture
def ckdir(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXCHAT_HOME", str(tmp_path))
    return paths.run_dir("unit", "base") / "checkpoints"


def test_round_trip_is_exact(ckdir):
    params, opt_state = trained_state()
    rng = jax.random.split(jax.random.key(7))[1]
    with ckpt.Checkpointer(ckdir) as c:
        assert save(c, 10, params, opt_state, rng=rng, metrics={"val_bpb": 0.91, "loss": 2.5})
        c.wait()
        r = restore(c)
    assert r.step == 10
    assert_trees_equal(r.params, params)
    assert_trees_equal(r.opt_state, opt_state)  # namedtuples, MaskedNodes and int counts come back as saved
    assert jax.random.key_impl(r.rng) == jax.random.key_impl(rng)
    np.testing.assert_array_equal(jax.random.key_data(r.rng), jax.random.key_data(rng))
    assert r.data_state == DATA_STATE and r.metrics == {"val_bpb": 0.91, "loss": 2.5}
    assert r.config == {**CONFIG, "tags": ["a", "b"]}


def test_params_only_restore_skips_the_optimizer(ckdir):
    params, opt_state = trained_state()
    with ckpt.Checkpointer(ckdir) as c:
        save(c, 1, params, opt_state)
        r = c.restore(abstract_params=abstract(params, DEV0))
    assert r.opt_state is None
    assert_trees_equal(r.params, params)


def test_keeps_only_the_newest_n(ckdir):
    params, opt_state = trained_state()
    with ckpt.Checkpointer(ckdir, keep=2) as c:
        for step in (1, 2, 3):
            save(c, step, params, opt_state)
        assert [s.step for s in c.steps()] == [2, 3]
        assert c.latest_step() == 3
    assert sorted(p.name for p in ckdir.iterdir()) == ["2", "3"]


def test_async_save_restores_without_an_explicit_wait(ckdir):
    params, opt_state = trained_state()
    c = ckpt.Checkpointer(ckdir, async_save=True)
    save(c, 5, params, opt_state)
    r = restore(c)  # must wait for the write and the seal itself
    assert r.step == 5
    assert_trees_equal(r.params, params)
    assert (ckdir / "5" / ckpt.MANIFEST).is_file()
    c.close()


def test_sync_save_is_sealed_on_return(ckdir):
    params, opt_state = trained_state()
    with ckpt.Checkpointer(ckdir, async_save=False) as c:
        save(c, 4, params, opt_state)
        assert (ckdir / "4" / ckpt.MANIFEST).is_file()
        assert restore(c).step == 4


def test_saving_a_saved_step_is_a_no_op_and_an_older_one_is_refused(ckdir):
    params, opt_state = trained_state()
    with ckpt.Checkpointer(ckdir) as c:
        assert save(c, 3, params, opt_state)
        assert not save(c, 3, params, opt_state)
        with pytest.raises(ValueError, match="already has step 3"):
            save(c, 2, params, opt_state)


def test_non_json_fields_are_rejected_at_save_time(ckdir):
    params, opt_state = trained_state()
    with ckpt.Checkpointer(ckdir) as c:
        with pytest.raises(TypeError, match="'data_state' must be JSON-serialisable"):
            c.save(1, params=params, opt_state=opt_state, rng=jax.random.key(0), data_state={"x": object()},
                   config=CONFIG)


# ---------------------------------------------------------------- damage

def _largest_file(d: Path) -> Path:
    return max((p for p in d.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)


def _truncate(step_dir):
    f = _largest_file(step_dir / "params")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _flip_byte(step_dir):
    # Orbax alone restores this silently with a wrong value: only the manifest's CRC catches it.
    f = _largest_file(step_dir / "params")
    b = bytearray(f.read_bytes())
    b[len(b) // 2] ^= 0xFF
    f.write_bytes(bytes(b))


def _delete_metadata(step_dir):
    (step_dir / "params" / "_METADATA").unlink()


def _garbage_meta(step_dir):
    f = _largest_file(step_dir / "meta")
    f.write_bytes(os.urandom(f.stat().st_size))


def _delete_manifest(step_dir):
    (step_dir / ckpt.MANIFEST).unlink()


DAMAGE = [_truncate, _flip_byte, _delete_metadata, _garbage_meta, _delete_manifest]


@pytest.mark.parametrize("damage", DAMAGE, ids=lambda f: f.__name__.strip("_"))
def test_damaged_latest_falls_back_to_previous_with_a_warning(ckdir, damage):
    params, opt_state = trained_state()
    with ckpt.Checkpointer(ckdir) as c:
        save(c, 1, params, opt_state)
        save(c, 2, jax.tree.map(lambda x: x + 1, params), opt_state)
    damage(ckdir / "2")
    with ckpt.Checkpointer(ckdir) as c:
        with pytest.warns(ckpt.CheckpointWarning) as caught:
            r = restore(c)
        messages = [str(w.message) for w in caught]
        assert any("step 2 in" in m and "is damaged" in m and "trying the previous one" in m for m in messages)
        assert any("moved damaged checkpoint step 2" in m for m in messages)
        assert r.step == 1
        assert_trees_equal(r.params, params)
        # The bad step is set aside, not deleted, so the resumed run can save step 2 again.
        assert (ckdir / ckpt.DAMAGED_DIR / "2").is_dir()
        assert save(c, 2, params, opt_state)
        assert c.latest_step() == 2


def test_flipped_byte_is_caught_by_the_checksum_not_the_size_check(ckdir):
    params, opt_state = trained_state()
    with ckpt.Checkpointer(ckdir) as c:
        save(c, 1, params, opt_state)
    _flip_byte(ckdir / "1")
    assert ckpt.check_step_dir(ckdir / "1", verify=False) is None
    assert "checksum mismatch" in ckpt.check_step_dir(ckdir / "1", verify=True)


def test_unfinished_save_is_ignored_and_cleaned(ckdir):
    params, opt_state = trained_state()
    with ckpt.Checkpointer(ckdir) as c:
        save(c, 1, params, opt_state)
    # What a kill -9 mid-save leaves: orbax's tmp dir, never renamed, partly written.
    tmp = ckdir / "2.orbax-checkpoint-tmp-1234567"
    shutil.copytree(ckdir / "1", tmp)
    _truncate(tmp)
    assert "UNFINISHED" in jinspect.describe(ckdir)
    with pytest.warns(ckpt.CheckpointWarning, match="unfinished checkpoint saves.*2.orbax-checkpoint-tmp"):
        c = ckpt.Checkpointer(ckdir)
    assert c.latest_step() == 1
    assert restore(c).step == 1
    c.close()


def test_all_damaged_raises_instead_of_starting_over(ckdir):
    params, opt_state = trained_state()
    with ckpt.Checkpointer(ckdir) as c:
        save(c, 1, params, opt_state)
        save(c, 2, params, opt_state)
    _truncate(ckdir / "1")
    _delete_manifest(ckdir / "2")
    with ckpt.Checkpointer(ckdir) as c:
        with pytest.raises(ckpt.CheckpointError, match="(?s)step 2: not sealed.*step 1: file size changed.*"
                                                       "Refusing to start from scratch"):
            c.latest_step()
        with pytest.warns(ckpt.CheckpointWarning), pytest.raises(ckpt.CheckpointError, match="no usable checkpoint"):
            restore(c)
    assert sorted(p.name for p in ckdir.iterdir()) == ["1", "2"]  # nothing moved when nothing was restorable


def test_explicit_step_with_verify_false_trusts_an_unsealed_step(ckdir):
    params, opt_state = trained_state()
    with ckpt.Checkpointer(ckdir) as c:
        save(c, 1, params, opt_state)
    _delete_manifest(ckdir / "1")
    with ckpt.Checkpointer(ckdir) as c:
        with pytest.raises(ckpt.CheckpointError, match="step 1 .* is damaged: not sealed"):
            restore(c, 1)
        assert_trees_equal(restore(c, 1, verify=False).params, params)


def test_empty_directory_means_no_checkpoint(ckdir):
    with ckpt.Checkpointer(ckdir) as c:
        assert c.latest_step() is None
        with pytest.raises(FileNotFoundError, match="no checkpoints"):
            restore(c)


def test_changed_model_is_reported_as_incompatible_not_damaged(ckdir):
    params, opt_state = trained_state()
    with ckpt.Checkpointer(ckdir) as c:
        save(c, 1, params, opt_state)
        wrong = {**params, "wte": jnp.zeros((128, 16))}
        expected = r"wte: saved \(64, 16\) float32, expected \(128, 16\) float32.*original config"
        with pytest.raises(ckpt.IncompatibleCheckpointError, match=expected):
            c.restore(abstract_params=abstract(wrong, DEV0))
    assert not (ckdir / ckpt.DAMAGED_DIR).exists()


# ---------------------------------------------------------------- meshes

def _fsdp_sharding(mesh):
    return {"wte": NamedSharding(mesh, P("fsdp", None)),
            "h": {"0": {"c_fc": NamedSharding(mesh, P(None, "fsdp")), "c_proj": NamedSharding(mesh, P("fsdp", None))}},
            "lambdas": NamedSharding(mesh, P())}


def _mesh(n):
    assert len(jax.devices()) >= n, "tests/conftest.py must set --xla_force_host_platform_device_count=4"
    return jax.make_mesh((1, n), ("data", "fsdp"), axis_types=(jax.sharding.AxisType.Auto,) * 2,
                         devices=jax.devices()[:n])


def _opt_abstract(params_abstract, sharding_of):
    return jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding_of(s)),
                        abstract_opt(params_abstract))


@pytest.mark.parametrize("save_on,restore_on", [(1, 4), (4, 1), (4, 2)])
def test_restores_onto_a_different_mesh(ckdir, save_on, restore_on):
    save_sharding = DEV0 if save_on == 1 else _fsdp_sharding(_mesh(save_on))
    params, opt_state = trained_state(save_sharding if save_on > 1 else None)
    with ckpt.Checkpointer(ckdir) as c:
        save(c, 1, params, opt_state)
        if restore_on == 1:
            target, rep = DEV0, DEV0
        else:
            mesh = _mesh(restore_on)
            target, rep = _fsdp_sharding(mesh), NamedSharding(mesh, P())
        ap = abstract(params, target)
        r = c.restore(abstract_params=ap, abstract_opt_state=_opt_abstract(ap, lambda s: rep))
    for got, want in zip(jax.tree.leaves(r.params), jax.tree.leaves(ap)):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
    assert r.rng.sharding.is_equivalent_to(rep, 0)
    assert_trees_equal(jax.device_get(r.params), jax.device_get(params))
    assert_trees_equal(jax.device_get(r.opt_state), jax.device_get(opt_state))


# ---------------------------------------------------------------- inspect

def _refuse_array_reads(monkeypatch):
    """Make every orbax array/numpy/scalar read fail, so a passing listing proves no data was loaded."""
    def boom(*a, **k):
        raise AssertionError("array data was read")
    for t in (jax.Array, np.ndarray, int, float):
        monkeypatch.setattr(type(ocp.type_handlers.get_type_handler(t)), "deserialize", boom)


def test_inspect_lists_config_steps_metrics_and_shapes_without_reading_arrays(ckdir, monkeypatch):
    params, opt_state = trained_state()
    with ckpt.Checkpointer(ckdir) as c:
        save(c, 100, params, opt_state, metrics={"val_bpb": 0.8125})
        save(c, 200, params, opt_state, metrics={"val_bpb": 0.75})
        save(c, 300, params, opt_state)
    _truncate(ckdir / "300")
    run = ckdir.parent.parent
    (ckdir.parent / "metrics.jsonl").write_text("".join(f'{{"step": {i}, "loss": {5 - i / 100}}}\n' for i in range(9)))
    _refuse_array_reads(monkeypatch)
    with ckpt.Checkpointer(ckdir) as c, pytest.raises(ckpt.CheckpointError, match="array data was read"):
        c.restore(200, abstract_params=abstract(params, DEV0))  # the patch really blocks array reads

    out = jinspect.describe(run)
    assert "== base ==" in out
    assert "  model.depth = 2" in out and "  run = 'unit'" in out and "  lr = 0.02" in out
    assert "  step 100\n  step 200\n  step 300  INVALID: file size changed" in out
    assert "step 200\n" in out and "  val_bpb = 0.75" in out
    assert "wte" in out and "(64, 16)" in out and "float32" in out
    assert "h.0.c_fc" in out and "(16, 32)" in out and "lambdas" in out and "(2,)" in out
    assert f"total parameters: {N_PARAMS:,}" in out and "2,050" in out
    assert '{"step": 8, "loss": 4.92}' in out and '{"step": 3,' not in out  # only the last 5 metrics lines


def test_inspect_cli_accepts_checkpoint_and_step_dirs(ckdir, capsys):
    params, opt_state = trained_state()
    with ckpt.Checkpointer(ckdir) as c:
        save(c, 7, params, opt_state)
    assert jinspect.main([str(ckdir)]) == 0
    assert "total parameters: 2,050" in capsys.readouterr().out
    assert jinspect.main([str(ckdir / "7"), "--verify"]) == 0
    assert "  step 7\n" in capsys.readouterr().out
    assert jinspect.main([str(ckdir.parent.parent / "nope")]) == 1
    assert "does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- trained weights: load_params / load_model

def tiny_run(*overrides):
    from jaxchat import config as C

    return C.load_config(["--config=configs/tiny.py", "--config.run=unit", "--config.depth=2", *overrides])


def save_weights(config, stage, steps):
    """A distinct random value in every weight of the config's model, saved under `stage` as training saves it."""
    from jaxchat import model
    from jaxchat.config import model_config

    _, shapes = model.abstract_params(model_config(config))
    leaves, treedef = jax.tree.flatten(shapes)
    params = treedef.unflatten([jax.random.normal(jax.random.key(i), s.shape, s.dtype) for i, s in enumerate(leaves)])
    with ckpt.Checkpointer(paths.run_dir(config.run, stage) / "checkpoints", async_save=False) as c:
        for step in steps:
            c.save(step, params=params, opt_state={"count": jnp.zeros((), jnp.int32)}, rng=jax.random.key(0),
                   data_state={}, config=config.to_dict())
    return params


def test_load_params_over_a_mesh_lands_as_training_shards_it(ckdir):
    from jaxchat import sharding

    config = tiny_run()
    saved = save_weights(config, "sft", [3, 5])
    mesh = sharding.make_mesh(devices=_mesh(4).devices.flat)
    params, step = ckpt.load_params(config, "sft", mesh=mesh)
    assert step == 5
    want = sharding.param_shardings(params, mesh)
    for got, sh in zip(jax.tree.leaves(params), jax.tree.leaves(want)):
        assert got.sharding.is_equivalent_to(sh, got.ndim)
    assert any("fsdp" in tuple(s.spec) for s in jax.tree.leaves(want))  # some weights really are split 4 ways
    assert_trees_equal(jax.device_get(params), jax.device_get(saved))
    params, step = ckpt.load_params(config, "sft", step=3)  # no mesh: whole, on one device
    assert step == 3
    assert all(p.sharding.is_equivalent_to(DEV0, p.ndim) for p in jax.tree.leaves(params))


def test_a_missing_checkpoint_names_the_training_command(ckdir):
    from jaxchat.config import ConfigError
    from jaxchat.tokenizer import Tokenizer, config_dir

    config = tiny_run()
    train = "`python train.py --config=configs/tiny.py --config.run=unit --config.depth=2 --stage=mid`"
    with pytest.raises(FileNotFoundError) as e:
        ckpt.load_params(config, "mid")
    assert train in str(e.value) and "another stage" not in str(e.value)  # a stage's start cannot pick another
    assert not paths.run_dir("unit", "mid").exists()  # looking did not create the stage
    with pytest.raises(FileNotFoundError, match=r"--stage=mid`.*pick another stage with --stage=base\|mid\|sft\|rl"):
        ckpt.load_model(config, "mid")
    save_weights(config, "mid", [1])
    with pytest.raises(ckpt.IncompatibleCheckpointError, match="original config"):
        ckpt.load_params(tiny_run("--config.depth=3"), "mid")
    # the tokenizer has to fit the model too: one with another vocabulary is refused, naming the fix
    text = ["the cat sat on the mat and the dog sat on the log. " * 20, "hello there, how are you today? " * 20]
    Tokenizer.train(text, vocab_size=300).save(config_dir(config))
    with pytest.raises(ConfigError, match="has 300 ids but the config's vocab_size is 1,536; set --config.tokenizer"):
        ckpt.load_model(config, "mid")
