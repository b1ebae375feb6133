"""The hub-backed tasks (ARC, MMLU, GSM8K, HumanEval, SmolTalk) on small parquet splits served by a loopback stand-in
for the hub, the synthetic offline tasks, and what each task's rendered conversation trains on."""
import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures_tok import ByteTokenizer
from http_server import FileServer

from jaxchat.data.hub import shuffled_indices
from jaxchat.sandbox import use_calculator
from jaxchat.tasks import CHATCORE_TASKS, EVAL_TASKS, eval_task
from jaxchat.tasks.base import extract_answer, last_text
from jaxchat.tasks.gsm8k import GSM8K, answer_parts
from jaxchat.tasks.humaneval import HumanEval, extract_code, extract_imports
from jaxchat.tasks.mixtures import mixture
from jaxchat.tasks.multiple_choice import ARC, MMLU, render_mc
from jaxchat.tasks.smoltalk import SmolTalk
from jaxchat.tasks.synthetic import Arithmetic, TinyQuiz

TOK = ByteTokenizer()

ARC_ROWS = [{"id": f"q{i}", "question": f"Question {i}?",
             "choices": {"text": ["red", "green", "blue", "black"], "label": ["A", "B", "C", "D"]},
             "answerKey": "ABCD"[i % 4]} for i in range(12)]
MMLU_ROWS = [{"question": f"What is {i}+{i}?", "subject": "math", "choices": [str(i), str(2 * i), "7", "9"],
              "answer": 1} for i in range(10)]
GSM8K_ROWS = [{"question": "Natalia sold clips to 48 friends in April, and half as many in May. How many in total?",
               "answer": "In May she sold 48/2 = <<48/2=24>>24 clips.\nIn total 48+24 = <<48+24=72>>72 clips.\n#### 72"},
              {"question": "What is 1,000 + 234?", "answer": "That is <<1000+234=1234>>1,234.\n#### 1,234"}]
HUMANEVAL_ROWS = [{"task_id": "HumanEval/0",
                   "prompt": "from typing import List\n\n\ndef total(xs: List[int]) -> int:\n    \"\"\"Sum of xs.\"\"\"\n",
                   "canonical_solution": "    return sum(xs)\n",
                   "test": "def check(candidate):\n    assert candidate([1, 2, 3]) == 6\n    assert candidate([]) == 0\n",
                   "entry_point": "total"}]
SMOLTALK_ROWS = [{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                               {"role": "assistant", "content": "Hello!"}]},
                 {"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                               {"role": "user", "content": "thanks"}, {"role": "assistant", "content": "welcome"}]},
                 {"messages": [{"role": "user", "content": "hi"}, {"role": "user", "content": "again"}]}]


def _parquet(rows) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(rows), buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """One loopback hub with every split the tests use; a private JAXCHAT_HOME so the cache starts empty."""
    mp = pytest.MonkeyPatch()
    mp.setenv("JAXCHAT_HOME", str(tmp_path_factory.mktemp("home")))
    mp.delenv("JAXCHAT_OFFLINE", raising=False)
    splits = {("allenai/ai2_arc", "ARC-Easy", "test"): ARC_ROWS, ("cais/mmlu", "all", "test"): MMLU_ROWS,
              ("openai/gsm8k", "main", "test"): GSM8K_ROWS,
              ("openai/openai_humaneval", "openai_humaneval", "test"): HUMANEVAL_ROWS,
              ("HuggingFaceTB/smol-smoltalk", "default", "train"): SMOLTALK_ROWS}
    with FileServer() as srv:
        for (repo, subset, split), rows in splits.items():
            base = f"/api/datasets/{repo}/parquet/{subset}/{split}"
            srv.add(f"{base}/0.parquet", _parquet(rows))
            srv.add(base, json.dumps([srv.url(f"{base}/0.parquet")]).encode())
        mp.setenv("JAXCHAT_HUB_ENDPOINT", srv.base_url)
        yield srv
    mp.undo()


def trained_text(conversation) -> tuple[str, str]:
    """(supervised text, unsupervised text) of a rendered conversation, specials included."""
    ids, mask = TOK.render_conversation(conversation)
    return (TOK.decode([t for t, m in zip(ids, mask) if m]), TOK.decode([t for t, m in zip(ids, mask) if not m]))


def test_render_mc_golden():
    assert render_mc("Which is a color?", ["A", "B"], ["red", "dog"]) == (
        "Multiple Choice question: Which is a color?\n- red=A\n- dog=B\n\n"
        "Respond only with the letter of the correct answer.")
    with pytest.raises(ValueError, match="2 letters for 3 choices"):
        render_mc("q", ["A", "B"], ["a", "b", "c"])


def test_arc_rows_in_the_reference_shuffle_order(hub):
    task = ARC("ARC-Easy", "test")
    assert len(task) == 12 and task.eval_type == "categorical" and task.baseline == 0.25
    order = shuffled_indices(12, 42)
    for i in range(12):
        row = ARC_ROWS[order[i]]
        conv = task[i]
        assert conv["messages"][0]["content"].startswith(f"Multiple Choice question: {row['question']}\n- red=A\n")
        assert conv["messages"][1]["content"] == row["answerKey"] and conv["letters"] == ["A", "B", "C", "D"]
    assert task.evaluate(task[0], task[0]["messages"][1]["content"]) and not task.evaluate(task[0], "Z")
    assert len(ARC("ARC-Easy", "test", start=2, stop=9, step=3)) == 3  # 2, 5, 8
    with pytest.raises(ValueError, match="ARC subset"):
        ARC("ARC-Hard")


def test_mmlu_letters_from_the_answer_index(hub):
    task = MMLU("all", "test", stop=4)
    assert len(task) == 4
    conv = task[0]
    assert conv["letters"] == ["A", "B", "C", "D"] and conv["messages"][1]["content"] == "B"
    assert conv["subject"] == "math"
    supervised, unsupervised = trained_text(conv)
    assert supervised == "B<|assistant_end|>"  # only the letter and the end of the turn are trained
    assert "Multiple Choice question" in unsupervised


def test_gsm8k_calculator_annotations_become_tool_parts():
    parts = answer_parts(GSM8K_ROWS[0]["answer"])
    assert parts == [
        {"type": "text", "text": "In May she sold 48/2 = "}, {"type": "python", "text": "48/2"},
        {"type": "python_output", "text": "24"}, {"type": "text", "text": "24 clips.\nIn total 48+24 = "},
        {"type": "python", "text": "48+24"}, {"type": "python_output", "text": "72"},
        {"type": "text", "text": "72 clips.\n#### 72"}]
    # rsplit on the last "=": an expression containing "=" keeps its head
    assert answer_parts("x <<a=b=3>>")[1:] == [{"type": "python", "text": "a=b"}, {"type": "python_output", "text": "3"}]


def test_gsm8k_masks_and_answer_extraction(hub):
    task = GSM8K("main", "test")
    conv = next(c for c in task if "48/2" in str(c))
    supervised, unsupervised = trained_text(conv)
    # the model writes the calls; the tool writes their outputs
    assert "<|python_start|>48/2<|python_end|>" in supervised and "<|output_start|>24<|output_end|>" in unsupervised
    assert "<|output_start|>" not in supervised and supervised.endswith("#### 72<|assistant_end|>")
    assert task.evaluate(conv, "blah\n#### 72") and not task.evaluate(conv, "#### 71")
    assert not task.evaluate(conv, "72")  # no marker, no credit
    commas = next(c for c in task if "1,234" in str(c))
    assert extract_answer(last_text(commas)) == "1234" and task.evaluate(commas, "#### 1234")
    assert task.reward(commas, "#### 1,234") == 1.0 and task.reward(commas, "#### 12") == 0.0


def test_humaneval_runs_the_tests_in_the_sandbox(hub):
    task = HumanEval()
    conv = task[0]
    assert conv["messages"][1]["content"].endswith("    return sum(xs)\n") and conv["entry_point"] == "total"
    right = "```python\ndef total(xs: List[int]) -> int:\n    return sum(xs)\n```"
    wrong = "def total(xs):\n    return 0\n"
    assert task.evaluate(conv, right)  # needs the prompt's `from typing import List`
    assert not task.evaluate(conv, wrong)
    assert not task.evaluate(conv, "import os\nos.system('echo hi')\ndef total(xs): return sum(xs)")
    assert extract_imports(conv["messages"][0]["content"]) == "from typing import List"
    assert extract_code("text\n```py\nx = 1\n```\nmore") == "x = 1\n"


def test_smoltalk_keeps_system_and_rejects_broken_rows(hub):
    task = SmolTalk("train")
    rows = [SMOLTALK_ROWS[j] for j in shuffled_indices(3, 42)]
    good = [i for i, r in enumerate(rows) if r is not SMOLTALK_ROWS[2]]
    assert {json.dumps(task[i]) for i in good} == {json.dumps({"messages": r["messages"]}) for r in SMOLTALK_ROWS[:2]}
    bad = next(i for i, r in enumerate(rows) if r is SMOLTALK_ROWS[2])
    with pytest.raises(ValueError, match=r"SmolTalk train\[\d\]: message 1 is 'user', expected 'assistant'"):
        task[bad]


def test_synthetic_tasks_are_deterministic_and_checkable():
    a, b = Arithmetic(200, "train"), Arithmetic(200, "train")
    assert [a[i] for i in range(20)] == [b[i] for i in range(20)]
    assert a[0] != Arithmetic(200, "test")[0]
    for conv in a:
        parts = conv["messages"][1]["content"]
        call = next(p["text"] for p in parts if p["type"] == "python")
        output = next(p["text"] for p in parts if p["type"] == "python_output")
        assert str(use_calculator(call)) == output == extract_answer(last_text(conv))  # the tool agrees with the answer
        assert a.evaluate(conv, f"#### {output}")
    quiz = TinyQuiz(100, "test")
    for conv in quiz:
        right = conv["messages"][1]["content"]
        content = conv["messages"][0]["content"]
        assert content.count("\n- ") == 4 and f"={right}\n" in content
    assert 0.15 < np.mean([q["messages"][1]["content"] == "A" for q in TinyQuiz(400, "train")]) < 0.35


def test_every_task_of_the_tiny_mixtures_renders_with_sensible_masks():
    for stage in ("mid", "sft"):
        for split in ("train", "val"):
            for task in mixture(stage, "tiny", split):
                conv = task[0]
                ids, mask = TOK.render_conversation(conv)
                assert sum(mask) > 0, task
                supervised, unsupervised = trained_text(conv)
                assert supervised.endswith("<|assistant_end|>")
                assert "<|user_start|>" in unsupervised and "<|user_start|>" not in supervised
    with pytest.raises(ValueError, match="unknown mixture"):
        mixture("mid", "huge")


def test_registry_and_chatcore_tasks():
    assert set(CHATCORE_TASKS) <= set(EVAL_TASKS)
    assert eval_task("Arithmetic").name == "Arithmetic" and len(eval_task("TinyQuiz")) == 256
    with pytest.raises(ValueError, match="unknown task 'GSM9K'"):
        eval_task("GSM9K")
