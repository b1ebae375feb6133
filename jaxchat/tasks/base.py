"""The task interface: a sliceable sequence of conversations, plus how to grade an answer to one.

A conversation is `{"messages": [{"role": "user"|"assistant"|"system", "content": str | [parts]}, ...]}` as
`Tokenizer.render_conversation` takes it; assistant parts are `{"type": "text"|"python"|"python_output", "text": str}`.
Categorical (multiple-choice) tasks add `"letters"`: the answer letters the model may choose between.

Tasks plug straight into the chat mixtures (`data/chat.py` only needs `len` and indexing) and into the evals
(`evaluate/chat_eval.py` needs `eval_type`, `evaluate` and, for RL, `reward`).
"""
from __future__ import annotations

import re

GSM8K_ANSWER = re.compile(r"#### (\-?[0-9\.\,]+)")


def extract_answer(text: str) -> str | None:
    """The number after `#### ` (GSM8K's and SpellingBee's answer marker), commas removed; None when absent."""
    match = GSM8K_ANSWER.search(text)
    return match.group(1).strip().replace(",", "") if match else None


def last_text(conversation: dict) -> str:
    """The text of the final assistant message (its last text part when it is a list of parts)."""
    content = conversation["messages"][-1]["content"]
    if isinstance(content, str):
        return content
    texts = [part["text"] for part in content if part["type"] == "text"]
    return texts[-1] if texts else ""


class Task:
    """`start:stop:step` view over `num_examples()` examples; subclasses define `example(i)` and, to be evaluated,
    `evaluate(conversation, completion)`."""

    eval_type = "generative"  # or "categorical": answered by one restricted argmax over `letters`
    baseline = 0.0  # accuracy of random guessing, for ChatCORE's centering

    def __init__(self, start: int = 0, stop: int | None = None, step: int = 1):
        if start < 0 or (stop is not None and stop < start) or step < 1:
            raise ValueError(f"bad task slice start={start} stop={stop} step={step}")
        self.start, self.stop, self.step = start, stop, step

    @property
    def name(self) -> str:
        return type(self).__name__

    def num_examples(self) -> int:
        raise NotImplementedError

    def example(self, index: int) -> dict:
        raise NotImplementedError

    def evaluate(self, conversation: dict, completion: str) -> bool:
        raise NotImplementedError(f"{self.name} has no evaluation")

    def reward(self, conversation: dict, completion: str) -> float:
        return float(self.evaluate(conversation, completion))

    def __len__(self) -> int:
        stop = self.num_examples() if self.stop is None else min(self.stop, self.num_examples())
        return max(0, -(-(stop - self.start) // self.step))

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"{self.name} index {index} out of range for {len(self)} examples")
        index %= len(self)
        return self.example(self.start + index * self.step)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def __repr__(self) -> str:
        return f"{self.name}(len={len(self)})"
