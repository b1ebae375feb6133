"""Multiple-choice tasks (ARC, MMLU) and the reference's prompt format for them.

The letter comes *after* its choice ("- Paris=A") so a small model binds letter to choice, and there is no space
before the letter, so the prompt's letter and the answer's letter are the same token (nanochat-reference.md §6.4).
Evaluation is categorical: one forward pass, logits restricted to `letters`, argmax (evaluate/chat_eval.py).
"""
from __future__ import annotations

from jaxchat.tasks.base import Task
from jaxchat.tasks.hub_rows import HubTask

LETTERS = "ABCDEFGHIJ"


def render_mc(question: str, letters: list[str], choices: list[str]) -> str:
    if len(letters) != len(choices):
        raise ValueError(f"{len(letters)} letters for {len(choices)} choices")
    options = "".join(f"- {choice}={letter}\n" for letter, choice in zip(letters, choices))
    return f"Multiple Choice question: {question}\n{options}\nRespond only with the letter of the correct answer."


def mc_conversation(question: str, letters: list[str], choices: list[str], answer: str, **extra) -> dict:
    if answer not in letters:
        raise ValueError(f"answer {answer!r} is not one of the letters {letters}")
    return {"messages": [{"role": "user", "content": render_mc(question, letters, choices)},
                         {"role": "assistant", "content": answer}],
            "letters": list(letters), **extra}


class MultipleChoice(Task):
    eval_type = "categorical"
    baseline = 0.25  # four options (ARC has a handful of 3- and 5-option questions; the reference uses 0.25 too)

    def evaluate(self, conversation: dict, completion: str) -> bool:
        return completion.strip() == conversation["messages"][-1]["content"]


class ARC(HubTask, MultipleChoice):
    SUBSETS = ("ARC-Easy", "ARC-Challenge")

    def __init__(self, subset: str, split: str = "test", **slice_kw):
        if subset not in self.SUBSETS:
            raise ValueError(f"ARC subset must be one of {self.SUBSETS}, got {subset!r}")
        if split not in ("train", "validation", "test"):
            raise ValueError(f"ARC split must be train, validation or test, got {split!r}")
        super().__init__("allenai/ai2_arc", subset, split, **slice_kw)

    @property
    def name(self) -> str:
        return self.subset

    def example(self, index: int) -> dict:
        row = self.rows[index]
        return mc_conversation(row["question"], row["choices"]["label"], row["choices"]["text"], row["answerKey"])


class MMLU(HubTask, MultipleChoice):
    def __init__(self, subset: str = "all", split: str = "test", **slice_kw):
        if split not in ("auxiliary_train", "validation", "dev", "test"):
            raise ValueError(f"MMLU split must be auxiliary_train, validation, dev or test, got {split!r}")
        super().__init__("cais/mmlu", subset, split, **slice_kw)

    @property
    def name(self) -> str:
        return "MMLU"

    def example(self, index: int) -> dict:
        row = self.rows[index]
        letters = list(LETTERS[:len(row["choices"])])
        return mc_conversation(row["question"], letters, row["choices"], letters[row["answer"]],
                               subject=row.get("subject", ""))
