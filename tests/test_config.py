"""The depth dial: derived numbers equal the reference's (nanochat-reference.md §1.4, §1.5, §3.1)."""
import argparse
import re
import shlex

import pytest

from jaxchat import config as C
from jaxchat import hardware
from jaxchat import model


def load(name, **overrides):
    cfg = C.load_config_file(f"configs/{name}.py")
    return C.apply_overrides(cfg, {k: str(v) for k, v in overrides.items()})


def test_d20_parameter_count_is_the_reference_560_988_160():
    assert C.derive(load("d20")).num_params == 560_988_160


def test_d32_parameter_count_is_the_reference_1_879_048_192():
    assert C.derive(load("d32"), n_devices=8).num_params == 1_879_048_192


def test_analytic_count_equals_the_model_built_abstractly():
    cfg = load("d20")
    _, params = model.abstract_params(C.model_config(cfg))
    assert model.num_params(params) == C.derive(cfg).num_params


def test_flops_per_token_match_the_reference_formula():
    # 6·(N − N_wte) + 12·L·H·hd·T; V0 logs print 3.491758e9 (d20) and 1.207960e10 (d32).
    assert f"{C.derive(load('d20')).flops_per_token:.6e}" == "3.491758e+09"
    assert f"{C.derive(load('d32'), n_devices=8).flops_per_token:.6e}" == "1.207960e+10"


def test_d20_shape_horizon_and_learning_rates():
    d = C.derive(load("d20"), n_devices=8)
    assert (d.model.n_embd, d.model.n_head, d.model.head_dim, d.model.n_kv_head) == (1280, 10, 128, 10)
    assert d.num_iterations == 21_400  # 20 tokens/param * 560,988,160 // 524,288
    assert d.grad_accum_steps == 1  # 32 rows x 2048 x 8 GPUs = 524,288
    assert d.embedding_lr == pytest.approx(0.2 * (1280 / 768) ** -0.5)  # 0.1549
    assert d.unembedding_lr == pytest.approx(0.004 * (1280 / 768) ** -0.5)  # 0.0031
    assert d.matrix_lr == 0.02


def test_gradient_accumulation_follows_devices():
    assert C.derive(load("d20"), n_devices=1).grad_accum_steps == 8
    assert C.derive(load("d32"), n_devices=8).grad_accum_steps == 4  # run1000.sh: device batch 8


def test_gqa_and_mqa_by_n_kv_head():
    assert C.derive(load("d20", n_kv_head=5)).model.n_kv_head == 5
    assert C.derive(load("d20", n_kv_head=1)).model.n_kv_head == 1


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"depth": 0}, "depth must be >= 1"),
        ({"model_dim": 1280, "n_head": 7}, "does not divide model_dim"),
        ({"n_kv_head": 3}, "must divide n_head"),
        ({"device_batch_size": 3}, "not a multiple of"),
        ({"vocab_size": 5}, "special tokens"),
        ({"packing": "greedy"}, "packing must be one of stream, bestfit, got 'greedy'"),
    ],
)
def test_bad_config_fails_with_a_clear_message(overrides, message):
    with pytest.raises(C.ConfigError, match=message):
        C.derive(load("d20", **overrides), n_devices=1)


def test_batch_not_divisible_by_devices_is_rejected():
    with pytest.raises(C.ConfigError, match="n_devices"):
        C.derive(load("d20"), n_devices=3)


def test_overrides_convert_types_and_reject_unknown_fields():
    cfg = C.apply_overrides(load("d20"), {"depth": "12", "matrix_lr": "0.03", "dataset": "tiny", "tokenizer_max_chars": "2e9"})
    assert (cfg.depth, cfg.matrix_lr, cfg.dataset, cfg.tokenizer_max_chars) == (12, 0.03, "tiny", 2_000_000_000)
    with pytest.raises(C.ConfigError, match="unknown config field 'deph'"):
        C.apply_overrides(cfg, {"deph": "3"})
    with pytest.raises(C.ConfigError, match="expected an integer"):
        C.apply_overrides(cfg, {"depth": "2.5"})


def stage_parser():
    ap = argparse.ArgumentParser(prog="python train.py")
    ap.add_argument("--stage", required=True, choices=("base", "sft"))
    return ap


def test_parse_command_reads_the_config_file_and_overrides_and_hands_the_rest_to_argparse():
    cfg, args = C.parse_command(["--config=configs/tiny.py", "--config.depth=3", "--stage=base"], stage_parser())
    assert cfg.depth == 3 and cfg.run == "tiny" and args.stage == "base"
    # the spaced forms, and "auto" on the int-or-"auto" field
    cfg, args = C.parse_command(["--config", "configs/tiny.py", "--stage", "sft", "--config.depth", "5",
                                 "--config.device_batch_size=auto"], stage_parser())
    assert (cfg.depth, cfg.device_batch_size, args.stage) == (5, C.AUTO, "sft")
    assert cfg.config_args == "--config=configs/tiny.py --config.depth=5 --config.device_batch_size=auto"
    with pytest.raises(C.ConfigError, match="not found"):
        C.parse_command(["--config=configs/nope.py", "--stage=base"], stage_parser())
    with pytest.raises(C.ConfigError, match="--config.depth needs a value"):
        C.parse_command(["--config=configs/tiny.py", "--stage=base", "--config.depth"], stage_parser())
    with pytest.raises(C.ConfigError, match="unknown config field 'deph'"):
        C.parse_command(["--config=configs/tiny.py", "--stage=base", "--config.deph=3"], stage_parser())


def test_parse_command_usage_errors_and_help_are_argparse_s(capsys):
    with pytest.raises(SystemExit) as e:
        C.parse_command(["--config=configs/tiny.py", "--stage=nope"], stage_parser())
    err = capsys.readouterr().err
    assert e.value.code == 2 and "argument --stage: invalid choice: 'nope'" in err
    assert " ".join(err.split()).startswith(
        "usage: python train.py [-h] --stage {base,sft} --config PATH [--config.FIELD VALUE]")
    with pytest.raises(SystemExit) as e:
        C.parse_command(["--stage=base", "--config.depth=2"], stage_parser())
    assert e.value.code == 2 and "the following arguments are required: --config" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        C.parse_command(["--config=configs/tiny.py", "--stage=base", "--stagger"], stage_parser())
    assert e.value.code == 2 and "unrecognized arguments: --stagger" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # --help needs no config
        C.parse_command(["--help"], stage_parser())
    out = capsys.readouterr().out
    assert e.value.code == 0 and re.search(r"^  --config PATH +the run's config file", out, re.M)
    assert re.search(r"^  --config.FIELD VALUE +set a field of it", out, re.M)


def test_parse_command_optional_and_default_configs():
    none, args = C.parse_command(["--stage=base"], stage_parser(), required=False)
    assert none is None and args.stage == "base"
    with pytest.raises(C.ConfigError, match="--config.depth needs --config=configs/<name>.py"):
        C.parse_command(["--stage=base", "--config.depth=2"], stage_parser(), required=False)
    tiny, _ = C.parse_command(["--stage=base", "--config.depth=2"], stage_parser(), default_config="configs/tiny.py")
    assert (tiny.run, tiny.depth) == ("tiny", 2)
    d20, _ = C.parse_command(["--config=configs/d20.py", "--stage=base"], stage_parser(),
                             default_config="configs/tiny.py")
    assert d20.run == "d20"


def test_load_config_takes_config_arguments_only():
    assert C.load_config(["--config=configs/tiny.py", "--config.depth=3"]).depth == 3
    with pytest.raises(C.ConfigError, match="unrecognized arguments: --stage=base"):
        C.load_config(["--config=configs/tiny.py", "--stage=base"])


def test_malformed_config_file_names_the_problem(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("def get_config(:\n")
    with pytest.raises(C.ConfigError, match="could not load config"):
        C.load_config_file(str(bad))
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(C.ConfigError, match="must define get_config"):
        C.load_config_file(str(tmp_path / "empty.py"))


def test_cli_prints_exact_count_and_flops_without_allocating(capsys):
    assert C.main(["--config=configs/d20.py"]) == 0
    out = capsys.readouterr().out
    assert "560,988,160" in out and "3.491758e+09" in out and "21,400 steps" in out


def test_mfu_against_the_h100_peak_and_no_guess_for_unknown_devices():
    assert hardware.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert hardware.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert hardware.peak_flops("cpu") is None
    assert hardware.peak_bandwidth("NVIDIA H200") == 4.8e12 and hardware.peak_bandwidth("TPU v4") is None
    # d20 at 1.5M tokens/s on 8 H100s: 3.49e9 * 1.5e6 / (8 * 989e12) = 66.2%
    assert hardware.mfu(3.491758e9, 1.5e6, "NVIDIA H100 80GB HBM3", 8) == pytest.approx(66.2, abs=0.05)
    assert hardware.mfu(3.491758e9, 1.5e6, "TFRT_CPU_0", 1) is None


@pytest.mark.parametrize("override,message", [
    ("sft.source=bogus", "sft.source must be one of mid, base, got 'bogus'"),
    ("mid.mixture=huge", "mid.mixture must be one of reference, tiny"),
    ("rl.task=MATH", "rl.task must be one of GSM8K, Arithmetic"),
    ("rl.max_new_tokens=4096", "rl.max_new_tokens=4096 must be in [1, rl.sequence_len=128)"),
])
def test_bad_stage_fields_are_config_errors(override, message):
    config = C.load_config(["--config=configs/tiny.py", f"--config.{override}"])
    with pytest.raises(C.ConfigError, match=re.escape(message)):
        C.derive(config, 1)


def test_the_tokenizer_is_the_recipes_not_the_runs():
    """--config.run=exp2 is a new run of d20, not a new recipe: it uses d20's tokenizer (20 minutes saved at d20)."""
    from jaxchat.tokenizer import tokenizer_name

    assert tokenizer_name(C.load_config(["--config=configs/d20.py"])) == "d20"
    exp2 = C.load_config(["--config=configs/d20.py", "--config.run=exp2"])
    assert exp2.run == "exp2" and tokenizer_name(exp2) == "d20"
    assert tokenizer_name(C.load_config(["--config=configs/d20.py", "--config.run=exp2",
                                         "--config.tokenizer=mine"])) == "mine"


def test_run_this_messages_name_a_command_that_works(tmp_path, monkeypatch):
    import pathlib
    import shlex

    from jaxchat.checkpoint import load_params
    from jaxchat.tokenizer import load_for_config, tokenizer_name

    monkeypatch.setenv("JAXCHAT_HOME", str(tmp_path))
    c = C.load_config(["--config=configs/d20.py", "--config.run=exp2", "--config.depth", "12"])
    with pytest.raises(FileNotFoundError) as e:
        load_for_config(c)
    cmd = re.search(r"`([^`]*)`", str(e.value)).group(1)
    assert cmd == "python train.py --config=configs/d20.py --config.run=exp2 --config.depth=12 --stage=tokenizer"
    ap = argparse.ArgumentParser()
    ap.add_argument("--stage")
    again, args = C.parse_command(shlex.split(cmd)[2:], ap)  # the command rebuilds this very config
    assert args.stage == "tokenizer" and (again.run, again.depth, tokenizer_name(again)) == ("exp2", 12, "d20")
    with pytest.raises(FileNotFoundError, match=re.escape(
            "`python train.py --config=configs/d20.py --config.run=exp2 --config.depth=12 --stage=sft`")):
        load_params(c, "sft")
    # and no message anywhere builds a config file's name out of the run's (configs/exp2.py does not exist)
    sources = [p for p in pathlib.Path("jaxchat").rglob("*.py")] + [pathlib.Path("train.py"), pathlib.Path("serve.py")]
    assert not [str(p) for p in sources if re.search(r"configs/\{[^}]*run[^}]*\}", p.read_text())]


def test_packing_and_allow_repeat_per_config():
    for name in ("d20", "d26", "d32"):  # October's stream packing, and no silent repeats
        cfg = load(name)
        assert (cfg.packing, cfg.allow_repeat) == ("stream", False)
    tiny = load("tiny")
    assert (tiny.packing, tiny.allow_repeat) == ("bestfit", True)
    assert load("d20", allow_repeat=True).allow_repeat is True


def test_cli_prints_packing_sft_layout_grad_clip_and_the_shards_the_horizon_needs(capsys):
    assert C.main(["--config=configs/d20.py"]) == 0
    out = capsys.readouterr().out
    cfg = load("d20")
    assert re.search(r"^packing +stream \(the October loader", out, re.M)
    assert re.search(rf"^SFT layout +{cfg.sft.layout} ", out, re.M)
    assert re.search(rf"^gradient clipping +{cfg.get('grad_clip', 0.0)} ", out, re.M)
    # 21,400 steps x 524,288 tokens x 4.8 chars/token / 250M chars per shard = 215.4 shards, + 10% spare = 237: the
    # reference's own arithmetic (216, downloaded as 240).
    assert "11,219,763,200 tokens = 215.4 fineweb-edu shards of 250.0M chars at 4.8 chars/token, 0% crop" in out
    assert re.search(r"^  shards needed +237 \(with 10% spare\): python -m jaxchat.data.download -n 237$", out, re.M)
    assert C.main(["--config=configs/d20.py", "--shards-needed"]) == 0
    assert capsys.readouterr().out == "237\n"
    # best-fit crops ~35% at T=2048: 215.4 / 0.65 = 331.4 shards, 365 with the spare
    assert C.main(["--config=configs/d20.py", "--config.packing=bestfit", "--shards-needed"]) == 0
    assert capsys.readouterr().out == "365\n"
    assert C.main(["--config=configs/d20.py", "--config.packing=bestfit"]) == 0
    assert "331.4 fineweb-edu shards of 250.0M chars at 4.8 chars/token, 35% crop (at T=2,048)" in capsys.readouterr().out


def test_shards_needed_is_an_error_where_the_dataset_figures_are_unknown(capsys):
    assert C.main(["--config=configs/d20.py", "--config.dataset=climbmix", "--shards-needed"]) == 2
    assert "unknown at config time" in capsys.readouterr().err
    assert C.main(["--config=configs/d20.py", "--config.dataset=climbmix"]) == 0
    assert "base training measures them at start-up" in capsys.readouterr().out


# Every chat stage's resolved settings for d20, the reference's (nanochat-reference.md §7). The groups in
# default_config state only what differs from the top level, so these pins catch a stage moving with a top-level edit.
STAGE_PINS = {
    "mid": dict(init_lr_frac=1.0, warmup_ratio=0.0, warmdown_ratio=0.2, final_lr_frac=0.0, weight_decay=0.0,
                grad_clip=0.0, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, muon_momentum_start=0.85,
                device_batch_size=32, total_batch_size=524288, sequence_len=2048, num_iterations=-1, save_every=-1,
                eval_every=150, sample_every=-1),
    "sft": dict(init_lr_frac=0.02, warmup_ratio=0.0, warmdown_ratio=1.0, final_lr_frac=0.0, weight_decay=0.0,
                grad_clip=0.0, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, muon_momentum_start=0.95,
                device_batch_size=4, total_batch_size=-1, sequence_len=2048, num_iterations=-1, save_every=-1,
                eval_every=100, sample_every=-1),
    "rl": dict(init_lr_frac=0.05, warmup_ratio=0.0, warmdown_ratio=1.0, final_lr_frac=0.0, weight_decay=0.0,
               grad_clip=0.0, embedding_lr=0.2, unembedding_lr=0.004, matrix_lr=0.02, muon_momentum_start=0.95,
               device_batch_size=8, sequence_len=512, num_iterations=-1, save_every=60, sample_every=-1),
}


@pytest.mark.parametrize("stage", C.CHAT_STAGES)
def test_each_chat_stage_resolves_to_the_reference_settings(stage):
    resolved = C.stage_config(load("d20"), stage)  # the stage's own fields (init_lr_frac) stay in its group
    got = {k: resolved[k] if k in resolved else resolved[stage][k] for k in STAGE_PINS[stage]}
    assert got == STAGE_PINS[stage]


def test_stage_groups_state_only_what_differs_from_the_top_level():
    c = C.default_config()
    kept_equal = {"num_iterations", "save_every"}  # a stage's -1 is its own (epochs, no periodic saves)
    for stage in C.CHAT_STAGES:
        same = [k for k, v in c[stage].items() if k in c and k not in kept_equal and v == c[k]]
        assert not same, f"{stage} repeats the top level's {same}"
    # what a group leaves out follows the config's top level: tiny's 256-token context is SFT's too
    assert C.stage_config(load("tiny"), "sft").sequence_len == 256
    assert C.stage_config(load("d26"), "mid").device_batch_size == 16


def test_a_stage_follows_top_level_overrides_and_takes_its_own():
    c = C.load_config(["--config=configs/d20.py", "--config.matrix_lr=0.03", "--config.mid.matrix_lr=0.01",
                       "--config.sft.sequence_len=1024", "--config.device_batch_size=auto",
                       "--config.mid.device_batch_size=8"])
    assert [C.stage_config(c, s).matrix_lr for s in ("base", "mid", "sft", "rl")] == [0.03, 0.01, 0.03, 0.03]
    assert (C.stage_config(c, "sft").sequence_len, C.stage_config(c, "base").sequence_len) == (1024, 2048)
    assert (C.stage_config(c, "mid").device_batch_size, c.device_batch_size) == (8, C.AUTO)
    # the command that built it rebuilds it
    assert C.stage_config(C.load_config(shlex.split(c.config_args)), "mid").matrix_lr == 0.01
    for override, message in [("mid.sequence_len=1.5", "expected an integer"),
                              ("mid.bogus=1", "unknown config field 'mid.bogus'"),
                              ("mid.eval=1", "unknown config field 'mid.eval'"),
                              ("mid.device_batch_size=auto", "a stage's takes a number")]:
        with pytest.raises(C.ConfigError, match=re.escape(message)):
            C.load_config(["--config=configs/d20.py", f"--config.{override}"])


def _train_parser(argv):
    import train

    return train.main(argv)


def _serve_parser(argv):
    import serve

    return serve.parse_cli(argv)


def _chat_parser(argv):
    from jaxchat import chat

    return chat.parse_cli(argv)


def _evaluate_main(argv):
    from jaxchat.evaluate import run

    return run.main(argv)


def _dryrun_main(argv):
    from jaxchat import dryrun

    return dryrun.main(argv)


@pytest.mark.parametrize("entry", [C.main, _train_parser, _serve_parser, _chat_parser, _evaluate_main, _dryrun_main])
def test_every_entry_point_gives_argparse_help_with_the_config_syntax(entry, capsys):
    with pytest.raises(SystemExit) as e:
        entry(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("usage: python ") and "  --config PATH " in out
    with pytest.raises(SystemExit) as e:
        entry(["--config=configs/tiny.py", "--stage=base", "--no-such-flag"])  # --stage: train.py's is required
    err = capsys.readouterr().err
    assert e.value.code == 2 and re.search(r"error: unrecognized arguments: .*--no-such-flag$", err, re.M), err


def test_dry_run_flags_keep_their_forms(monkeypatch):
    from jaxchat import dryrun

    seen = {}

    def stop_before_compiling(cfg, n, with_engine, log):
        seen.update(n=n, engine=with_engine, gib=cfg.device_memory_gib)
        raise C.ConfigError("stopped")

    monkeypatch.setattr(dryrun, "dry_run", stop_before_compiling)
    monkeypatch.setattr(dryrun.jax.config, "update", lambda *a: None)  # this process's devices stay as they are
    for args, expected in [([], dict(n=8, engine=True, gib=80.0)),
                           (["--devices=4", "--device-memory-gib=0.01", "--no-engine=1"],
                            dict(n=4, engine=False, gib=0.01)),
                           (["--devices", "2", "--no-engine"], dict(n=2, engine=False, gib=80.0)),
                           (["--no-engine=0"], dict(n=8, engine=True, gib=80.0))]:
        assert dryrun.main(["--config=configs/d20.py", *args]) == 2
        assert seen == expected, args
