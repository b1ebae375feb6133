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
