"""Chat-eval scoring with fake models whose answers are known: letter restriction, pass@k over generated samples,
process striding, ChatCORE centering by hand, and the real jitted paths on a tiny random model."""
import jax
import numpy as np
import pytest
from fixtures_model import random_params
from fixtures_tok import ByteTokenizer

from jaxchat import engine as E
from jaxchat import model
from jaxchat.evaluate import chat_eval
from jaxchat.tasks.base import Task
from jaxchat.tasks.gsm8k import AnswerTask
from jaxchat.tasks.multiple_choice import MultipleChoice, mc_conversation

TOK = ByteTokenizer()


class Quiz(MultipleChoice):
    """Answer of problem i is letters[i % 4]."""

    def __init__(self, n, **kw):
        super().__init__(**kw)
        self.n = n

    def num_examples(self):
        return self.n

    def example(self, i):
        return mc_conversation(f"question {i}", list("ABCD"), ["w", "x", "y", "z"], "ABCD"[i % 4], index=i)


class Sums(AnswerTask):
    def num_examples(self):
        return 6

    def example(self, i):
        return {"messages": [{"role": "user", "content": f"{i}+{i}?"},
                             {"role": "assistant", "content": f"It is {2 * i}.\n#### {2 * i}"}], "index": i}


def test_categorical_restricts_logits_to_the_letters():
    task = Quiz(10)
    seen = []

    def last_logits(tokens, lengths):
        seen.append(tokens.shape)
        out = np.zeros((tokens.shape[0], TOK.vocab_size), np.float32)
        out[:, ord("Q")] = 100.0  # the unrestricted argmax: never a letter
        for row in range(tokens.shape[0]):
            prompt = TOK.decode(tokens[row, :lengths[row]].tolist())
            if "question" not in prompt:
                continue  # batch padding
            i = int(prompt.split("question ")[1].split("\n")[0])
            answer = "ABCD"[i % 4] if i % 3 else "ABCD"[(i + 1) % 4]  # wrong on every third problem
            out[row, ord(answer)] = 5.0
        return out

    r = chat_eval.categorical_eval(last_logits, TOK, task, seq_len=512, batch_size=4)
    assert (r.correct, r.total) == (6, 10)  # i = 0, 3, 6, 9 are wrong
    assert r.accuracy == 0.6 and r.centered == pytest.approx((0.6 - 0.25) / 0.75)
    assert all(shape[0] == 4 and shape[1] & (shape[1] - 1) == 0 for shape in seen)  # fixed B, power-of-two T
    assert r.example["completion"] in "ABCD"


def test_categorical_strides_problems_across_processes():
    task = Quiz(10)
    counts = []
    for pidx in range(3):
        r = chat_eval.categorical_eval(lambda t, n: np.zeros((t.shape[0], TOK.vocab_size), np.float32), TOK, task,
                                       seq_len=512, batch_size=4, pidx=pidx, pcount=3)
        counts.append(r.total)
    assert counts == [4, 3, 3]


def test_letters_must_be_single_tokens():
    class Words:
        bos_id = 0

        def encode(self, text):
            return [1, 2]

    with pytest.raises(ValueError, match="single token"):
        chat_eval.letter_ids(Words(), ["A"])


class ScriptedEngine:
    """generate_batch with known completions: sample s of problem i answers 2i only when s == 1 (so pass@1 fails,
    pass@2 passes) for even i; odd i are always wrong."""

    def __init__(self):
        self.cfg = type("Cfg", (), {"sequence_len": 256})()
        self.calls = []

    def generate_batch(self, prompts, num_samples, max_tokens, temperature, top_k, seed):
        self.calls.append((len(prompts), num_samples, list(max_tokens), seed))
        rows = []
        for p, s in [(p, s) for p in prompts for s in range(num_samples)]:
            i = int(TOK.decode(p).split("<|user_start|>")[1].split("+")[0])
            answer = 2 * i if (i % 2 == 0 and s == 1) else 2 * i + 1
            rows.append(list(p) + TOK.encode(f"so #### {answer}"))
        return rows, None


def test_generative_pass_at_k_and_batching():
    eng = ScriptedEngine()
    r1 = chat_eval.generative_eval(eng, TOK, Sums(), num_samples=1, max_tokens=32, problems_per_batch=4)
    assert (r1.correct, r1.total) == (0, 6)
    r2 = chat_eval.generative_eval(eng, TOK, Sums(), num_samples=2, max_tokens=32, problems_per_batch=4, seed=10)
    assert (r2.correct, r2.total) == (3, 6)  # i = 0, 2, 4
    assert [c[0] for c in eng.calls] == [4, 2, 4, 2]  # problems batched 4 at a time
    assert eng.calls[2][3] == [10, 11, 12, 13]  # one seed per problem
    assert all(m == 32 for m in eng.calls[0][2])


def test_chat_core_by_hand():
    def result(name, acc, baseline):
        return chat_eval.TaskResult(name, int(acc * 100), 100, 1.0, baseline)

    results = {"ARC-Easy": result("ARC-Easy", 0.40, 0.25), "ARC-Challenge": result("ARC-Challenge", 0.30, 0.25),
               "MMLU": result("MMLU", 0.31, 0.25), "GSM8K": result("GSM8K", 0.05, 0.0),
               "HumanEval": result("HumanEval", 0.06, 0.0), "SpellingBee": result("SpellingBee", 0.50, 0.0)}
    centered = [0.15 / 0.75, 0.05 / 0.75, 0.06 / 0.75, 0.05, 0.06, 0.50]
    out = chat_eval.chat_core(results)
    assert out["ChatCORE"] == pytest.approx(sum(centered) / 6)
    assert out["ChatCORE_cat"] == pytest.approx(sum(centered[:3]) / 3)
    del results["HumanEval"]
    assert "ChatCORE" not in chat_eval.chat_core(results)  # only when every task ran


def test_real_model_paths_agree_with_a_full_forward():
    """The engine's last_logits gathers the right position; the real engine runs generative eval end to end."""
    cfg = model.GPTConfig(vocab_size=TOK.vocab_size, n_layer=1, n_head=2, n_kv_head=2, n_embd=32, sequence_len=128,
                          compute_dtype="float32")
    graphdef, params = random_params(cfg, seed=3)
    tokens = np.full((2, 16), TOK.bos_id, np.int32)
    tokens[0, :5] = TOK.encode("hello")
    tokens[1, :9] = TOK.encode("abcdefghi")
    lengths = np.array([5, 9], np.int32)
    eng = E.Engine(cfg, params, TOK)
    got = eng.last_logits(tokens, lengths)
    full = np.asarray(model.forward(graphdef, params, tokens))
    np.testing.assert_allclose(got, full[[0, 1], [4, 8]], rtol=1e-5, atol=1e-5)

    r = chat_eval.generative_eval(eng, TOK, Sums(), num_samples=2, max_tokens=8, temperature=1.0,
                                  problems_per_batch=4)
    assert r.total == 6 and 0 <= r.correct <= 6 and isinstance(r.example["completion"], str)


def test_chat_evaluation_rows_are_spread_over_the_devices(monkeypatch):
    """With a mesh over the 4 emulated devices (tests/conftest.py), the engine's caches and categorical batches are
    split by rows, a quarter on each device, and the results equal the one-device engine's."""
    from jaxchat import sharding

    assert len(jax.devices()) == 4
    cfg = model.GPTConfig(vocab_size=TOK.vocab_size, n_layer=1, n_head=2, n_kv_head=1, n_embd=32, sequence_len=128,
                          compute_dtype="float32")
    _, params = random_params(cfg, seed=4)
    mesh = sharding.make_mesh()
    spread, single = E.Engine(cfg, params, TOK, mesh=mesh), E.Engine(cfg, params, TOK)

    seen = []  # every cache the spread engine decodes with: where its rows live
    decode = spread.decode
    monkeypatch.setattr(spread, "decode", lambda cache, *a: (seen.append(cache.k[0].sharding), decode(cache, *a))[1])
    kw = dict(num_samples=2, max_tokens=8, temperature=1.0, problems_per_batch=4, seed=5)
    got, want = chat_eval.generative_eval(spread, TOK, Sums(), **kw), chat_eval.generative_eval(single, TOK, Sums(), **kw)
    assert (got.correct, got.pass_at, got.example) == (want.correct, want.pass_at, want.example)
    assert seen and all(len(s.device_set) == 4 for s in seen)
    cache = spread.new_cache(8, 64)
    assert {s.data.shape[0] for s in cache.k[0].addressable_shards} == {2}  # 8 rows: 2 per device
    assert len({s.device for s in cache.k[0].addressable_shards}) == 4

    tokens = np.tile(np.asarray(TOK.encode("abcdefgh"), np.int32), (8, 2))
    lengths = np.arange(8, 16, dtype=np.int32)
    np.testing.assert_allclose(spread.last_logits(tokens, lengths), single.last_logits(tokens, lengths),
                               rtol=1e-5, atol=1e-5)


class Empty(Task):
    def num_examples(self):
        return 0


def test_empty_task_reports_zero():
    r = chat_eval.categorical_eval(None, TOK, Empty(), seq_len=64)
    assert (r.correct, r.total, r.accuracy) == (0, 0, 0.0)


def test_eval_json_merges_tasks_of_one_step_and_recomputes_chatcore(tmp_path):
    from jaxchat.evaluate.run import _save

    def part(step, **accs):
        tasks = {n: {"accuracy": a, "centered": a - 0.1} for n, a in accs.items()}
        return {"step": step, "skipped": {"GSM8K": "offline"}, "chat": {"tasks": tasks}}

    path = tmp_path / "eval.json"
    _save(path, part(5, **{"ARC-Easy": 0.5, "ARC-Challenge": 0.4, "MMLU": 0.3}))
    merged = _save(path, part(5, GSM8K=0.2, HumanEval=0.1, SpellingBee=0.6))
    assert set(merged["chat"]["tasks"]) == {"ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee"}
    assert merged["chat"]["ChatCORE"] == pytest.approx((0.4 + 0.3 + 0.2 + 0.1 + 0.0 + 0.5) / 6)
    assert merged["chat"]["ChatCORE_cat"] == pytest.approx((0.4 + 0.3 + 0.2) / 3)
    assert "GSM8K" not in merged["skipped"]  # evaluated since
    fresh = _save(path, part(6, MMLU=0.9))  # a new checkpoint step starts afresh
    assert set(fresh["chat"]["tasks"]) == {"MMLU"} and "ChatCORE" not in fresh["chat"]
