"""Tasks: conversations to train on and problems to evaluate (see base.py for the interface).

`EVAL_TASKS` are the chat evaluations by name; `ONLINE` marks those that need the hub's data, so an offline run can
evaluate what it has and say what it skipped. The offline ones: SpellingBee (once its word list is downloaded; without
it the task is skipped, naming the command that fetches it), TinySpellingBee (on the embedded corpus's words), and the
synthetic Arithmetic and TinyQuiz.
"""
from __future__ import annotations

from jaxchat.tasks.base import Task


def _arc_easy():
    from jaxchat.tasks.multiple_choice import ARC
    return ARC("ARC-Easy", "test")


def _arc_challenge():
    from jaxchat.tasks.multiple_choice import ARC
    return ARC("ARC-Challenge", "test")


def _mmlu():
    from jaxchat.tasks.multiple_choice import MMLU
    return MMLU("all", "test")


def _gsm8k():
    from jaxchat.tasks.gsm8k import GSM8K
    return GSM8K("main", "test")


def _humaneval():
    from jaxchat.tasks.humaneval import HumanEval
    return HumanEval()


def _spelling_bee():
    from jaxchat.tasks.spelling import SpellingBee
    return SpellingBee(size=256, split="test")


def _tiny_spelling_bee():
    from jaxchat.tasks.spelling import SpellingBee
    from jaxchat.tasks.words import fallback_words
    return SpellingBee(size=256, split="test", words=fallback_words())


def _arithmetic():
    from jaxchat.tasks.synthetic import Arithmetic
    return Arithmetic(size=256, split="test")


def _tiny_quiz():
    from jaxchat.tasks.synthetic import TinyQuiz
    return TinyQuiz(size=256, split="test")


EVAL_TASKS = {
    "ARC-Easy": _arc_easy, "ARC-Challenge": _arc_challenge, "MMLU": _mmlu, "GSM8K": _gsm8k, "HumanEval": _humaneval,
    "SpellingBee": _spelling_bee, "TinySpellingBee": _tiny_spelling_bee, "Arithmetic": _arithmetic, "TinyQuiz": _tiny_quiz,
}
ONLINE = frozenset({"ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval"})
CHATCORE_TASKS = ("ARC-Easy", "ARC-Challenge", "MMLU", "GSM8K", "HumanEval", "SpellingBee")


def eval_task(name: str) -> Task:
    if name not in EVAL_TASKS:
        raise ValueError(f"unknown task {name!r}; choose from {', '.join(EVAL_TASKS)}")
    return EVAL_TASKS[name]()
