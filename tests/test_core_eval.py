"""CORE metric: prompt templates, spans, scoring with a fake model, bundle download/parse, centering and CORE."""
import io
import json
import zipfile

import numpy as np
import pytest
from http_server import FileServer

from jaxchat.data.fetch import DamagedFileError
from fixtures_tok import ByteTokenizer
from jaxchat import sharding
from jaxchat.engine import Engine
from jaxchat.evaluate import core

# -- a tiny bundle in the real format --------------------------------------------------------------
MC_ROWS = [
    {"query": "Q: sky color?", "choices": ["red", "blue", "green"], "gold": 1},
    {"query": "Q: grass color?", "choices": ["green", "pink"], "gold": 0},
    {"query": "Q: snow color?", "choices": ["black", "white", "gray"], "gold": 1},
    {"query": "Q: sun color?", "choices": ["yellow", "purple"], "gold": 0},
]
SCHEMA_ROWS = [
    {"context_options": ["The cat sat", "The dog ran"], "continuation": "on the mat.", "gold": 0},
    {"context_options": ["Fish swim", "Birds swim"], "continuation": "in water.", "gold": 0},
    {"context_options": ["Ice is cold", "Ice is hot"], "continuation": "to touch.", "gold": 0},
]
LM_ROWS = [
    {"context": "  Two plus two is ", "continuation": "four"},
    {"context": "The capital of France is", "continuation": "Paris"},
    {"context": "Water boils at", "continuation": "100 C"},
    {"context": "Roses are", "continuation": "red"},
    {"context": "One two", "continuation": "three"},
]
CORE_YAML = """\
icl_tasks:
- label: tiny_mc
  dataset_uri: commonsense_reasoning/tiny_mc.jsonl
  num_fewshot: [2]
  icl_task_type: multiple_choice
  continuation_delimiter: "\\nAnswer: "
- label: tiny_schema
  dataset_uri: language_understanding/tiny_schema.jsonl
  num_fewshot: [0]
  icl_task_type: schema
- label: tiny_lm
  dataset_uri: language_understanding/tiny_lm.jsonl
  num_fewshot: [1]
  icl_task_type: language_modeling
  continuation_delimiter: ' '
"""
META_CSV = """\
Eval Task,Task Category,Task Type,#shots,#datapoints,Random baseline,Centered Metric?,Description
tiny_mc,commonsense reasoning,multiple choice,2,4,40,,MC
tiny_schema,language understanding,schema,0,3,50,,Schema
tiny_lm,language understanding,language modeling,1,5,0,,LM
unused_task,x,y,0,1,25,,not in core.yaml
"""


def _jsonl(rows):
    return "".join(json.dumps(r) + "\n" for r in rows)


def _bundle_zip() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("eval_bundle/core.yaml", CORE_YAML)
        zf.writestr("eval_bundle/eval_meta_data.csv", META_CSV)
        zf.writestr("eval_bundle/eval_data/commonsense_reasoning/tiny_mc.jsonl", _jsonl(MC_ROWS))
        zf.writestr("eval_bundle/eval_data/language_understanding/tiny_schema.jsonl", _jsonl(SCHEMA_ROWS))
        zf.writestr("eval_bundle/eval_data/language_understanding/tiny_lm.jsonl", _jsonl(LM_ROWS))
    return buf.getvalue()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    dest = tmp_path_factory.mktemp("home") / "eval_bundle"
    with FileServer({"eval_bundle.zip": _bundle_zip()}) as srv:
        got = core.download_bundle(srv.url("eval_bundle.zip"), dest=dest, retries=0)
        assert got == dest
        # a second call is a no-op: no new request
        n = len(srv.log)
        core.download_bundle(srv.url("eval_bundle.zip"), dest=dest, retries=0)
        assert len(srv.log) == n
    assert not (dest.parent / "eval_bundle.zip").exists()
    assert sorted(p.name for p in dest.parent.iterdir()) == ["eval_bundle"]  # no tmp dirs left behind
    return dest


# -- a char-level tokenizer and an oracle model ----------------------------------------------------
class CharTok:
    bos_id = 256
    vocab_size = 260

    def encode(self, text, prepend=None):
        return ([prepend] if prepend is not None else []) + list(text.encode("utf-8"))


class Oracle:
    """Logits that make given token sequences the most likely: after a prefix of a believed sequence the next
    believed token gets +20, everything else 0 (so divergent continuations cost ~log V per token)."""

    def __init__(self, sequences, vocab=260):
        self.next = {}
        for seq in sequences:
            for t in range(len(seq) - 1):
                self.next[tuple(seq[: t + 1])] = seq[t + 1]
        self.vocab = vocab
        self.shapes = []

    def __call__(self, tokens):
        assert tokens.dtype == np.int32
        self.shapes.append(tokens.shape)
        B, T = tokens.shape
        logits = np.zeros((B, T, self.vocab), np.float32)
        for b in range(B):
            for t in range(T):
                nxt = self.next.get(tuple(tokens[b, : t + 1].tolist()))
                if nxt is not None:
                    logits[b, t, nxt] = 20.0
        return logits


# -- golden prompts --------------------------------------------------------------------------------
def test_render_multiple_choice_with_fewshot():
    item = {"query": "Q: 2+2?", "choices": ["3", "4"], "gold": 1}
    shots = [{"query": "Q: 1+1?", "choices": ["2", "5"], "gold": 0}, {"query": "Q: 0+1?", "choices": ["0", "1"], "gold": 1}]
    assert core.render_prompts(item, "multiple_choice", "\nAnswer: ", shots) == [
        "Q: 1+1?\nAnswer: 2\n\nQ: 0+1?\nAnswer: 1\n\nQ: 2+2?\nAnswer: 3",
        "Q: 1+1?\nAnswer: 2\n\nQ: 0+1?\nAnswer: 1\n\nQ: 2+2?\nAnswer: 4",
    ]
    assert core.render_prompts(item, "multiple_choice", " ") == ["Q: 2+2? 3", "Q: 2+2? 4"]


def test_render_schema_with_fewshot():
    item = {"context_options": ["Ann left", "Bob left"], "continuation": "early.", "gold": 1}
    shots = [{"context_options": ["x said", "y said"], "continuation": "hi.", "gold": 1}]
    assert core.render_prompts(item, "schema", " ", shots) == ["y said hi.\n\nAnn left early.", "y said hi.\n\nBob left early."]


def test_render_language_modeling_with_fewshot():
    item = {"context": "  Roses are ", "continuation": "red"}
    shots = [{"context": " Sky is\n", "continuation": "blue"}]
    without, with_ = core.render_prompts(item, "language_modeling", "\nAnswer: ", shots)
    assert without == "Sky is\nAnswer: blue\n\nRoses are\nAnswer:"  # trimmed contexts; the whole "without" stripped
    assert with_ == "Sky is\nAnswer: blue\n\nRoses are\nAnswer: red"
    assert core.render_prompts(item, "language_modeling", " ") == ["Roses are", "Roses are red"]
    with pytest.raises(ValueError):
        core.render_prompts(item, "generation", " ")


# -- spans -----------------------------------------------------------------------------------------
def test_spans():
    assert core.spans([[9, 1, 2, 3], [9, 1, 2, 4, 5], [9, 1, 2, 6]], "multiple_choice") == [(3, 4), (3, 5), (3, 4)]
    assert core.spans([[9, 7, 1, 2], [9, 8, 6, 1, 2]], "schema") == [(2, 4), (3, 5)]
    assert core.spans([[9, 1, 2], [9, 1, 2, 3, 4]], "language_modeling") == [(3, 5)]
    with pytest.raises(ValueError):
        core.spans([[9, 1, 2], [9, 1, 5, 3]], "language_modeling")
    tok = CharTok()
    toks = [tok.encode(p, prepend=tok.bos_id) for p in core.render_prompts(LM_ROWS[1], "language_modeling", " ")]
    (s, e), = core.spans(toks, "language_modeling")
    assert bytes(toks[1][s:e]) == b" Paris"  # the delimiter's space belongs to the continuation


# -- scoring ---------------------------------------------------------------------------------------
def _believed(tok, item, task_type, delim, shots, pick=None, lm_continuation=None):
    """The token sequence the oracle should prefer for this example."""
    if task_type == "language_modeling":
        item = dict(item, continuation=lm_continuation or item["continuation"])
        return tok.encode(core.render_prompts(item, task_type, delim, shots)[1], prepend=tok.bos_id)
    return tok.encode(core.render_prompts(item, task_type, delim, shots)[pick], prepend=tok.bos_id)


def test_score_example_follows_model_preference():
    tok = CharTok()
    meta = {"task_type": "multiple_choice", "continuation_delimiter": " "}
    item, shots = MC_ROWS[0], MC_ROWS[1:3]
    for pick in range(3):
        oracle = Oracle([_believed(tok, item, "multiple_choice", " ", shots, pick)])
        assert core.score_example(oracle, tok, item, meta, shots) == (pick == item["gold"])
    # batch of 3 prompts -> B bucketed to 4; T bucketed to a power of two >= 16
    B, T = oracle.shapes[-1]
    assert B == 4 and T >= 16 and T & (T - 1) == 0

    meta = {"task_type": "schema", "continuation_delimiter": " "}
    item = SCHEMA_ROWS[0]
    for pick in range(2):
        oracle = Oracle([_believed(tok, item, "schema", " ", [], pick)])
        assert core.score_example(oracle, tok, item, meta) == (pick == item["gold"])

    meta = {"task_type": "language_modeling", "continuation_delimiter": " "}
    item = LM_ROWS[1]
    assert core.score_example(Oracle([_believed(tok, item, "language_modeling", " ", [])]), tok, item, meta)
    wrong = Oracle([_believed(tok, item, "language_modeling", " ", [], lm_continuation="Parts")])  # one char off
    assert not core.score_example(wrong, tok, item, meta)
    assert wrong.shapes == [(1, 32)]
    # a model with no preference at all: exact match fails
    assert not core.score_example(Oracle([]), tok, item, meta)


def test_score_example_left_crop():
    tok = CharTok()
    item = LM_ROWS[1]
    meta = {"task_type": "language_modeling", "continuation_delimiter": " "}
    full = _believed(tok, item, "language_modeling", " ", [])
    oracle = Oracle([full[-10:]])  # believes the last 10 tokens, as seen after cropping to 10
    assert core.score_example(oracle, tok, item, meta, max_seq_len=10)
    assert oracle.shapes == [(1, 10)]


def test_prompts_longer_than_the_sequence_length_are_scored_whole_by_default():
    """The reference crops CORE prompts only for models that declare a max_seq_len (HF GPT-2); its own are scored
    whole (§6.2). Ours too: eval.core_crop = 0, and the model's rotary comes from positions, so any T runs."""
    from jaxchat import model
    from jaxchat.config import apply_overrides, load_config_file

    d20 = load_config_file("configs/d20.py")
    assert d20.eval.core_crop == 0 and core.crop_length(d20) is None  # what `python -m jaxchat.evaluate` passes on
    assert core.crop_length(apply_overrides(d20, {"eval.core_crop": "1024"})) == 1024
    tok, T = CharTok(), 16
    task = {"task_type": "language_modeling", "continuation_delimiter": " ", "num_fewshot": 0}
    item = {"context": "Once upon a time, far away, the capital of France was", "continuation": "Paris"}
    whole = core.prepare_example(tok, item, task)
    assert len(whole.rows[0]) > 3 * T
    # An oracle that knows the continuation only from the prompt's very first tokens: scored whole, it is right ...
    oracle = Oracle([whole.rows[0]])
    assert core.evaluate_task(core.stats_from_logits(oracle), tok, [item], task, row_tokens=T) == (1, 1)
    assert oracle.shapes == [(1, 64)]
    # ... cropped to T from the left (eval.core_crop = T, the reference's treatment of GPT-2) it cannot be
    assert core.prepare_example(tok, item, task, max_seq_len=T).rows[0] == whole.rows[0][-T:]
    cropped = core.stats_from_logits(Oracle([whole.rows[0]]))
    assert core.evaluate_task(cropped, tok, [item], task, max_seq_len=T) == (0, 1)
    # The real model runs a row 4x its sequence_len, on the devices, as the host computes from full logits; long rows
    # go fewer per batch (B * T_row <= batch_rows * sequence_len).
    cfg = model.GPTConfig(vocab_size=260, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, sequence_len=T,
                          compute_dtype="float32")
    graphdef, params = model.init(cfg, seed=0)
    on_device, shapes = Engine(cfg, params, ByteTokenizer(), mesh=sharding.make_mesh()).token_stats, []
    rows = [whole.rows[0], whole.rows[0][:20], whole.rows[0][:10], whole.rows[0][:12]]
    nll, _ = core.run_rows(lambda x: shapes.append(x.shape) or on_device(x), rows, tok.bos_id, batch_rows=2,
                           row_tokens=T)
    assert shapes == [(2, 16), (1, 32), (1, 64)]
    full = core.stats_from_logits(core.model_logits_fn(graphdef, params))(np.array(whole.rows, np.int32))
    np.testing.assert_allclose(nll[0], full[0][0], rtol=1e-5, atol=1e-5)


def test_fewshot_sampling_is_deterministic_and_excludes_self():
    data = [{"i": i} for i in range(6)]
    for idx in range(6):
        shots = core.sample_fewshot(data, idx, 3)
        assert len({s["i"] for s in shots}) == 3 and data[idx] not in shots
        assert shots == core.sample_fewshot(data, idx, 3)
    assert core.sample_fewshot(data, 0, 0) == []
    assert len(core.sample_fewshot(data[:2], 0, 5)) == 1  # clamped to the others available


# -- bundle + end-to-end ---------------------------------------------------------------------------
def test_load_bundle_and_baselines(bundle):
    tasks = core.load_bundle(bundle)
    assert [t["label"] for t in tasks] == ["tiny_mc", "tiny_schema", "tiny_lm"]
    assert tasks[0] == {
        "label": "tiny_mc", "dataset_uri": "commonsense_reasoning/tiny_mc.jsonl", "num_fewshot": 2,
        "task_type": "multiple_choice", "continuation_delimiter": "\nAnswer: ",
    }
    assert tasks[1]["continuation_delimiter"] == " "  # default
    assert core.random_baselines(bundle / "eval_meta_data.csv") == {"tiny_mc": 40.0, "tiny_schema": 50.0, "tiny_lm": 0.0, "unused_task": 25.0}
    data = core.load_task_data(bundle, "language_understanding/tiny_lm.jsonl")
    assert sorted(map(json.dumps, data)) == sorted(map(json.dumps, LM_ROWS)) and data != LM_ROWS  # shuffled (seed 1337)
    assert core.load_task_data(bundle, "language_understanding/tiny_lm.jsonl", max_per_task=2) == data[:2]


def test_evaluate_core_end_to_end(bundle, tmp_path):
    tok = CharTok()
    # What the model "believes", keyed by row identity: MC right on 3 of 4, schema right on 1 of 3, LM right on 4 of 5.
    mc_pick = {"Q: sky color?": 1, "Q: grass color?": 0, "Q: snow color?": 2, "Q: sun color?": 0}
    schema_pick = {"on the mat.": 0, "in water.": 1, "to touch.": 1}
    lm_cont = {"Roses are": "blue"}
    believed = []
    for task in core.load_bundle(bundle):
        data = core.load_task_data(bundle, task["dataset_uri"])
        for idx, item in enumerate(data):
            shots = core.sample_fewshot(data, idx, task["num_fewshot"])
            tt, d = task["task_type"], task["continuation_delimiter"]
            if tt == "multiple_choice":
                believed.append(_believed(tok, item, tt, d, shots, mc_pick[item["query"]]))
            elif tt == "schema":
                believed.append(_believed(tok, item, tt, d, shots, schema_pick[item["continuation"]]))
            else:
                believed.append(_believed(tok, item, tt, d, shots, lm_continuation=lm_cont.get(item["context"])))
    oracle = Oracle(believed)
    out = core.evaluate_core(core.stats_from_logits(oracle), tok, bundle, log=None)
    assert out["results"] == pytest.approx({"tiny_mc": 0.75, "tiny_schema": 1 / 3, "tiny_lm": 0.8})
    # centered by hand: (acc - b) / (1 - b)
    c_mc, c_schema, c_lm = (0.75 - 0.4) / 0.6, (1 / 3 - 0.5) / 0.5, 0.8
    assert out["centered"] == pytest.approx({"tiny_mc": c_mc, "tiny_schema": c_schema, "tiny_lm": c_lm})
    assert out["core"] == pytest.approx((c_mc + c_schema + c_lm) / 3)
    assert {shape[1] for shape in oracle.shapes} <= {16, 32, 64, 128}  # few compiled shapes

    path = core.write_results_csv(out, tmp_path / "base_eval" / "base_model_000010.csv")
    lines = path.read_text().splitlines()
    assert lines[0].split(",")[0].strip() == "Task" and len(lines) == 5
    assert lines[1].split(",")[0].strip() == "tiny_mc" and float(lines[1].split(",")[1]) == pytest.approx(0.75)
    assert lines[-1].split(",")[0].strip() == "CORE" and float(lines[-1].split(",")[2]) == pytest.approx(out["core"], abs=1e-6)

    # max_per_task crops every task
    out2 = core.evaluate_core(core.stats_from_logits(Oracle([])), tok, bundle, max_per_task=2, log=None)  # MC K=2 clamps to 1 here
    assert list(out2["results"]) == ["tiny_mc", "tiny_schema", "tiny_lm"]
    assert out2["results"]["tiny_schema"] == 1.0 and out2["results"]["tiny_lm"] == 0.0  # ties -> option 0 (= gold)


def test_real_tokenizer_spans_and_scoring():
    from jaxchat.tokenizer import Tokenizer

    texts = [json.dumps(r) for r in MC_ROWS + SCHEMA_ROWS + LM_ROWS] * 20
    tok = Tokenizer.train(texts, vocab_size=256 + 9 + 40)
    for item in LM_ROWS:
        prompts = core.render_prompts(item, "language_modeling", " ", [LM_ROWS[0]])
        toks = [tok.encode(p, prepend=tok.bos_id) for p in prompts]
        (s, e), = core.spans(toks, "language_modeling")
        assert tok.decode(toks[1][s:e]) == " " + item["continuation"]
    item = MC_ROWS[2]
    oracle = Oracle([tok.encode(core.render_prompts(item, "multiple_choice", " ")[1], prepend=tok.bos_id)], vocab=tok.vocab_size)
    assert core.score_example(oracle, tok, item, {"task_type": "multiple_choice", "continuation_delimiter": " "})


def test_model_logits_fn_with_tiny_gpt():
    from jaxchat import model

    cfg = model.GPTConfig(vocab_size=260, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, sequence_len=64, compute_dtype="float32")
    graphdef, params = model.init(cfg, seed=0)
    fn = core.model_logits_fn(graphdef, params)
    tok = CharTok()
    x = np.full((2, 32), tok.bos_id, np.int32)
    x[:, :5] = [[256, 1, 2, 3, 4], [256, 5, 6, 7, 8]]
    a, b = fn(x[:, :16]), fn(x)
    assert a.shape == (2, 16, 260) and a.dtype == np.float32
    np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-5)  # causal: right padding never changes scored positions
    meta = {"task_type": "multiple_choice", "continuation_delimiter": " "}
    assert isinstance(core.score_example(fn, tok, MC_ROWS[0], meta, MC_ROWS[1:2]), bool)
    # the on-device statistics equal the host computation from full logits, across 4 devices and odd batch sizes
    on_device = Engine(cfg, params, ByteTokenizer(), mesh=sharding.make_mesh()).token_stats
    on_host = core.stats_from_logits(fn)
    for rows in (x, x[:1], np.concatenate([x, x, x[:1]])):
        (nll_d, match_d), (nll_h, match_h) = on_device(rows), on_host(rows)
        np.testing.assert_allclose(nll_d, nll_h, rtol=1e-5, atol=1e-5)
        np.testing.assert_array_equal(match_d, match_h)


def test_unpacked_bundle_is_checked_against_its_digest(bundle, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    core.verify_bundle(copy)  # intact
    data = copy / "eval_data" / "language_understanding" / "tiny_lm.jsonl"
    data.write_text(data.read_text()[:-10])
    with pytest.raises(DamagedFileError, match=r"changed: \['eval_data/language_understanding/tiny_lm.jsonl'\]") as e:
        core.evaluate_core(core.stats_from_logits(Oracle([])), CharTok(), copy, log=None)
    assert str(data) in str(e.value) and "`python -m jaxchat.evaluate.core`" in str(e.value)
    (copy / "core.yaml").unlink()
    with pytest.raises(DamagedFileError, match=r"missing: \['core.yaml'\]"):
        core.verify_bundle(copy)


def test_a_damaged_bundle_without_digest_is_named_when_parsed_and_a_rerun_replaces_a_damaged_one(bundle, tmp_path):
    import shutil

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    (copy / core.TREE_DIGEST).unlink()  # placed by hand: checked as it is parsed
    data = copy / "eval_data" / "language_understanding" / "tiny_lm.jsonl"
    data.write_text(data.read_text()[:-10])  # a truncated last line
    with pytest.raises(DamagedFileError, match="does not parse") as e:
        core.evaluate_core(core.stats_from_logits(Oracle([])), CharTok(), copy, log=None)
    assert str(data) in str(e.value) and core.FETCH_COMMAND in str(e.value)
    (copy / "core.yaml").write_text("icl_tasks: [")
    with pytest.raises(DamagedFileError, match="core.yaml is damaged"):
        core.load_bundle(copy)
    # the downloader checks the copy it has and replaces a damaged one
    shutil.rmtree(copy)
    shutil.copytree(bundle, copy)
    (copy / "eval_meta_data.csv").write_text("truncated")
    with FileServer({"eval_bundle.zip": _bundle_zip()}) as srv:
        assert core.download_bundle(srv.url("eval_bundle.zip"), dest=copy, retries=0) == copy
        assert len(srv.requests()) == 1
    core.verify_bundle(copy)
    assert (copy / "eval_meta_data.csv").read_text() == META_CSV
