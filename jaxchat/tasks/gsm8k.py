"""GSM8K: grade-school math with calculator annotations turned into tool calls.

The reference answers carry `<<48/2=24>>` annotations; each becomes a python part `48/2` (what the model writes
between <|python_start|> and <|python_end|>) and a python_output part `24` (what the engine forces in), so SFT teaches
the model to call the calculator. The final answer follows `#### ` and is compared as a string, commas removed.
"""
from __future__ import annotations

import re

from jaxchat.tasks.base import Task, extract_answer, last_text
from jaxchat.tasks.hub_rows import HubTask

_CALC = re.compile(r"(<<[^<>]*>>)")


def answer_parts(answer: str) -> list[dict]:
    """A GSM8K answer string -> assistant parts (text / python / python_output)."""
    parts = []
    for piece in _CALC.split(answer):
        if not piece:
            continue
        if piece.startswith("<<") and piece.endswith(">>"):
            inner = piece[2:-2]
            if "=" not in inner:  # not a calculator call after all; keep the text as written
                parts.append({"type": "text", "text": piece})
                continue
            expr, result = inner.rsplit("=", 1)
            parts.append({"type": "python", "text": expr})
            parts.append({"type": "python_output", "text": result})
        else:
            parts.append({"type": "text", "text": piece})
    return parts


def gsm8k_conversation(question: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": question},
                         {"role": "assistant", "content": answer_parts(answer)}]}


class AnswerTask(Task):
    """Generative tasks graded by the `#### N` answer (GSM8K, SpellingBee, the synthetic arithmetic)."""

    def evaluate(self, conversation: dict, completion: str) -> bool:
        reference = extract_answer(last_text(conversation))
        if reference is None:
            raise ValueError(f"{self.name}: the reference answer has no '#### N' line: {last_text(conversation)[-200:]!r}")
        return extract_answer(completion) == reference


class GSM8K(HubTask, AnswerTask):
    def __init__(self, subset: str = "main", split: str = "test", **slice_kw):
        if subset not in ("main", "socratic"):
            raise ValueError(f"GSM8K subset must be main or socratic, got {subset!r}")
        if split not in ("train", "test"):
            raise ValueError(f"GSM8K split must be train or test, got {split!r}")
        super().__init__("openai/gsm8k", subset, split, **slice_kw)

    def example(self, index: int) -> dict:
        row = self.rows[index]
        return gsm8k_conversation(row["question"], row["answer"])
