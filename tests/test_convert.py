"""Importing nanochat checkpoints: tiny October and 2026 models in the reference's own format (tests/fixtures/
nanochat_tiny and nanochat_2026_ckpt, made with torch) must give the reference's logits, its tokenizer the reference's
ids, and keys neither architecture has must be refused by name."""
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from jaxchat import convert, model

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "nanochat_tiny"
MODEL_PT = FIXTURE / "model_000042.pt"
META = json.loads((FIXTURE / "meta_000042.json").read_text())
MODEL_CONFIG = META["model_config"]


@pytest.fixture(scope="module")
def state():
    return convert.load_torch_file(MODEL_PT)


def reference_logits(params):
    cfg = convert.gpt_config(MODEL_CONFIG)
    cfg = type(cfg)(**{**cfg.__dict__, "compute_dtype": "float32"})
    graphdef, _ = model.abstract_params(cfg)
    return np.asarray(model.forward(graphdef, params, jnp.asarray(np.load(FIXTURE / "input_ids.npy"))))


def test_pt_file_reads_without_torch(state):
    assert set(state) == convert.expected_keys(MODEL_CONFIG)
    wte = state["transformer.wte.weight"]
    assert wte.shape == (300, 32) and wte.dtype == np.float32
    assert not (wte.view(np.uint32) & 0xFFFF).any()  # widened from bf16: the low half is exactly zero
    assert state["transformer.h.0.attn.c_k.weight"].shape == (16, 32)  # torch (out, in), 2 kv heads of 8
    assert state["transformer.h.1.mlp.c_fc.weight"].shape == (128, 32)


def test_converted_model_gives_the_reference_logits(state):
    logits = reference_logits(convert.convert_params(state, MODEL_CONFIG))
    expected = np.load(FIXTURE / "logits.npy")
    assert logits.shape == expected.shape == (2, 16, 300)
    # measured here: median |diff| 1.4e-6, max 1.4e-5 on logits up to 13.3 (float32 rounding, another op order)
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=5e-5)


def test_vocab_padding_and_compiled_model_prefix_are_undone(state):
    rng = np.random.default_rng(0)
    padded = {f"_orig_mod.{k}": v for k, v in state.items()}
    for key in ("transformer.wte.weight", "lm_head.weight"):
        v = state[key]
        padded[f"_orig_mod.{key}"] = np.concatenate([v, rng.normal(size=(20, v.shape[1])).astype(np.float32)])
    a = convert.convert_params(state, MODEL_CONFIG)
    b = convert.convert_params(padded, MODEL_CONFIG)
    assert all(np.array_equal(x, y) for x, y in zip(jax_leaves(a), jax_leaves(b)))


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def test_unknown_keys_and_missing_keys_are_refused_by_name(state):
    with pytest.raises(convert.ConversionError, match="key 'engram.weight' is a parameter neither"):
        convert.convert_params({**state, "engram.weight": np.zeros(3, np.float32)}, MODEL_CONFIG)
    # a value embedding makes it a 2026 model, whose value embeddings then sit on layers (L-1) % 2, 2 apart: in a
    # 2-layer model layer 1 only, with its gate
    with pytest.raises(convert.ConversionError, match="value_embeds.0.weight"):
        convert.check_architecture({**state, "value_embeds.0.weight": np.zeros(3, np.float32)}, MODEL_CONFIG)
    convert.check_architecture(state, {**MODEL_CONFIG, "window_pattern": "L"})  # all-long: still the V0 keys
    with pytest.raises(convert.ConversionError, match="letters other than S and L"):
        convert.check_architecture(state, {**MODEL_CONFIG, "window_pattern": "SXL"})
    partial = {k: v for k, v in state.items() if k != "transformer.h.1.mlp.c_proj.weight"}
    with pytest.raises(convert.ConversionError, match="'transformer.h.1.mlp.c_proj.weight' is missing"):
        convert.check_architecture(partial, MODEL_CONFIG)


FIXTURE_2026 = Path(__file__).resolve().parent / "fixtures" / "nanochat_2026_ckpt"


def test_a_2026_checkpoint_converts_and_gives_the_references_logits():
    """nanochat 92d63d4's own checkpoint (2 layers, SSSL windows, value embeddings, smear, backout, scalars, wte and
    value embeddings in bf16; tests/fixtures/make_2026_parity.py) against the logits its code computed."""
    model_path, meta_path, step = convert.find_checkpoint(FIXTURE_2026)
    meta = json.loads(meta_path.read_text())
    state = convert.load_torch_file(model_path)
    options = convert.model_options(state, meta["model_config"])
    assert options["window_pattern"] == "SSSL" and options["value_embeds"] and options["smear"]
    params = convert.convert_params(state, meta["model_config"])
    cfg = convert.gpt_config(meta["model_config"], {**options, "compute_dtype": "float32"})
    graphdef, _ = model.abstract_params(cfg)
    z = np.load(Path(__file__).resolve().parent / "fixtures" / "parity_2026.npz")
    logits = np.asarray(model.forward(graphdef, params, jnp.asarray(z["ckpt/input_ids"].astype(np.int32))))
    np.testing.assert_allclose(logits, z["ckpt/logits"], rtol=1e-4, atol=1e-4)
    config = convert.jaxchat_config(meta["model_config"], "r", options)
    assert (config.window_pattern, config.qk_scale, config.vocab_multiple) == ("SSSL", 1.2, 64)
    assert "c.smear = True" in convert.config_source(config, "here")


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    path = tmp_path / "model_000001.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"x": os.system}))
    with pytest.raises(pickle.UnpicklingError, match=r"unsupported object (posix|nt)\.system"):
        convert.load_torch_file(path)
    path.write_bytes(b"not a zip")
    with pytest.raises(convert.ConversionError, match="not a zip-format torch checkpoint"):
        convert.load_torch_file(path)


# ---------------------------------------------------------------- tokenizer

@pytest.fixture(scope="module")
def tok_state():
    return convert.load_tiktoken_state(FIXTURE / "tokenizer.pkl")


def test_tokenizer_converts_to_the_same_ids(tok_state):
    from jaxchat.tokenizer import SPECIAL_TOKENS

    tok = convert.convert_tokenizer(tok_state)
    assert tok.vocab_size == MODEL_CONFIG["vocab_size"]
    assert [tok.special_id(s) for s in SPECIAL_TOKENS] == list(range(291, 300))
    for text, ids in json.loads((FIXTURE / "tokens.json").read_text()).items():
        assert tok.encode(text) == ids
        assert tok.decode(ids) == text


def test_tokenizer_agrees_with_tiktoken_on_varied_text(tok_state):
    tiktoken = pytest.importorskip("tiktoken")
    enc = tiktoken.Encoding(name="fixture", pat_str=tok_state["pat_str"],
                            mergeable_ranks=tok_state["mergeable_ranks"], special_tokens=tok_state["special_tokens"])
    tok = convert.convert_tokenizer(tok_state)
    rng = np.random.default_rng(0)
    alphabet = list("the cat sat on a mat. It's 1234 capital France Paris!?\n\t  ") + ["é", "😀", "中", "ß"]
    texts = ["".join(rng.choice(alphabet, size=int(rng.integers(1, 80)))) for _ in range(300)]
    texts += ["", " ", "<|bos|> is text here", "The capital of France is Paris.\n\n\n  x"]
    for text in texts:
        assert tok.encode(text) == enc.encode_ordinary(text), text


def test_tokenizer_with_other_specials_is_refused(tok_state):
    swapped = dict(tok_state, special_tokens={**tok_state["special_tokens"], "<|bos|>": 292, "<|user_start|>": 291})
    with pytest.raises(convert.ConversionError, match="special tokens"):
        convert.convert_tokenizer(swapped)


# ---------------------------------------------------------------- the command

def test_command_writes_a_run_that_chat_loads(tmp_path, monkeypatch, state, capsys):
    monkeypatch.setenv("JAXCHAT_HOME", str(tmp_path))
    src = tmp_path / "nanochat" / "chatsft_checkpoints" / "d2"
    src.mkdir(parents=True)
    for name in ("model_000042.pt", "meta_000042.json"):
        shutil.copy(FIXTURE / name, src / name)
    (tmp_path / "nanochat" / "tokenizer").mkdir()
    shutil.copy(FIXTURE / "tokenizer.pkl", tmp_path / "nanochat" / "tokenizer" / "tokenizer.pkl")

    assert convert.main([str(src)]) == 0  # stage, run name and tokenizer found from nanochat's layout
    out = capsys.readouterr().out
    config_path = tmp_path / "runs" / "nanochat-d2" / "config.py"
    assert f"--config={config_path} --stage=sft" in out
    assert (tmp_path / "runs" / "nanochat-d2" / "sft" / "checkpoints" / "42" / "jaxchat_manifest.json").is_file()
    assert (tmp_path / "tokenizer" / "nanochat-d2" / "tokenizer.json").is_file()

    from jaxchat import chat
    from jaxchat.checkpoint import load_model
    from jaxchat.config import load_config_file

    config = load_config_file(str(config_path))
    assert (config.depth, config.model_dim, config.n_head, config.n_kv_head, config.vocab_size) == (2, 32, 4, 2, 300)
    cfg, params, step, _ = load_model(config, "sft")
    assert step == 42 and cfg.n_kv_head == 2
    np.testing.assert_allclose(reference_logits(params), np.load(FIXTURE / "logits.npy"), rtol=1e-5, atol=5e-5)
    assert chat.main([f"--config={config_path}", "--stage=sft", "-p", "The capital of France", "-t", "0",
                      "-m", "4"]) == 0

    assert convert.main([str(src)]) == 0  # converting again leaves the existing checkpoint alone
    assert "already there" in capsys.readouterr().out


def test_command_refuses_bad_sources_with_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("JAXCHAT_HOME", str(tmp_path))
    assert convert.main([str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "runs" / "taken" / "sft" / "checkpoints" / "100").mkdir(parents=True)
    assert convert.main([str(FIXTURE), "--stage=sft", "--run=taken", "--no-tokenizer"]) == 2
    assert "already holds checkpoints [100]" in capsys.readouterr().err
