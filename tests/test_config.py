"""The depth dial: derived numbers equal the reference's (nanochat-reference.md §1.4, §1.5, §3.1)."""
import re

import pytest

from jaxchat import config as C
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
    _, params = model.abstract_params(model.GPTConfig.from_config(cfg))
    assert model.num_params(params) == C.derive(cfg).num_params


def test_flops_per_token_match_the_reference_formula():
    # 6·(N − N_wte) + 12·L·H·hd·T; V0 logs print 3.491758e9 (d20) and 1.207960e10 (d32).
    assert f"{C.derive(load('d20')).flops_per_token:.6e}" == "3.491758e+09"
    assert f"{C.derive(load('d32'), n_devices=8).flops_per_token:.6e}" == "1.207960e+10"


def test_d20_shape_horizon_and_learning_rates():
    d = C.derive(load("d20"), n_devices=8)
    assert (d.model_dim, d.n_head, d.head_dim, d.n_kv_head) == (1280, 10, 128, 10)
    assert d.num_iterations == 21_400  # 20 tokens/param * 560,988,160 // 524,288
    assert d.grad_accum_steps == 1  # 32 rows x 2048 x 8 GPUs = 524,288
    assert d.embedding_lr == pytest.approx(0.2 * (1280 / 768) ** -0.5)  # 0.1549
    assert d.unembedding_lr == pytest.approx(0.004 * (1280 / 768) ** -0.5)  # 0.0031
    assert d.matrix_lr == 0.02


def test_gradient_accumulation_follows_devices():
    assert C.derive(load("d20"), n_devices=1).grad_accum_steps == 8
    assert C.derive(load("d32"), n_devices=8).grad_accum_steps == 4  # run1000.sh: device batch 8


def test_gqa_and_mqa_by_n_kv_head():
    assert C.derive(load("d20", n_kv_head=5)).n_kv_head == 5
    assert C.derive(load("d20", n_kv_head=1)).n_kv_head == 1


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


def test_parse_args_reads_the_config_file_and_overrides():
    cfg, rest = C.parse_args(["--config=configs/tiny.py", "--config.depth=3", "--stage=base"])
    assert cfg.depth == 3 and cfg.run == "tiny" and rest == ["--stage=base"]
    with pytest.raises(C.ConfigError, match="not found"):
        C.parse_args(["--config=configs/nope.py"])


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
    assert C.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert C.peak_flops("NVIDIA H100 PCIe") == 756e12
    assert C.peak_flops("cpu") is None
    # d20 at 1.5M tokens/s on 8 H100s: 3.49e9 * 1.5e6 / (8 * 989e12) = 66.2%
    assert C.mfu(3.491758e9, 1.5e6, "NVIDIA H100 80GB HBM3", 8) == pytest.approx(66.2, abs=0.05)
    assert C.mfu(3.491758e9, 1.5e6, "TFRT_CPU_0", 1) is None


@pytest.mark.parametrize("override,message", [
    ("sft.source=bogus", "sft.source must be one of mid, base, got 'bogus'"),
    ("mid.mixture=huge", "mid.mixture must be one of reference, tiny"),
    ("rl.task=MATH", "rl.task must be one of GSM8K, Arithmetic"),
    ("rl.max_new_tokens=4096", "rl.max_new_tokens=4096 must be in [1, rl.sequence_len=128)"),
])
def test_bad_stage_fields_are_config_errors(override, message):
    config, _ = C.parse_args(["--config=configs/tiny.py", f"--config.{override}"])
    with pytest.raises(C.ConfigError, match=re.escape(message)):
        C.derive(config, 1)


def test_the_tokenizer_is_the_recipes_not_the_runs():
    """--config.run=exp2 is a new run of d20, not a new recipe: it uses d20's tokenizer (20 minutes saved at d20)."""
    from jaxchat.tokenizer import tokenizer_name

    assert tokenizer_name(C.parse_args(["--config=configs/d20.py"])[0]) == "d20"
    exp2, _ = C.parse_args(["--config=configs/d20.py", "--config.run=exp2"])
    assert exp2.run == "exp2" and tokenizer_name(exp2) == "d20"
    assert tokenizer_name(C.parse_args(["--config=configs/d20.py", "--config.run=exp2",
                                        "--config.tokenizer=mine"])[0]) == "mine"


def test_run_this_messages_name_a_command_that_works(tmp_path, monkeypatch):
    import pathlib
    import shlex

    from jaxchat import chat
    from jaxchat.tokenizer import load_for_config, tokenizer_name

    monkeypatch.setenv("JAXCHAT_HOME", str(tmp_path))
    c, _ = C.parse_args(["--config=configs/d20.py", "--config.run=exp2", "--config.depth", "12"])
    with pytest.raises(FileNotFoundError) as e:
        load_for_config(c)
    cmd = re.search(r"`([^`]*)`", str(e.value)).group(1)
    assert cmd == "python train.py --config=configs/d20.py --config.run=exp2 --config.depth=12 --stage=tokenizer"
    again, rest = C.parse_args(shlex.split(cmd)[2:])  # the command rebuilds this very config
    assert rest == ["--stage=tokenizer"] and (again.run, again.depth, tokenizer_name(again)) == ("exp2", 12, "d20")
    with pytest.raises(FileNotFoundError, match=re.escape(
            "`python train.py --config=configs/d20.py --config.run=exp2 --config.depth=12 --stage=sft`")):
        chat.load_params(c, "sft", None)
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
