"""Synthetic spelling tasks (nanochat-reference.md §6.4): SpellingBee counts a letter in a word, SimpleSpelling
spells one.

Small models see tokens, not letters, so "how many r in strawberry" is hard for them. SpellingBee teaches a
two-step habit: spell the word out and count by hand, then check with the calculator tool and answer in GSM8K's
`#### N` form, so the same `evaluate`/`reward` code serves both tasks. SimpleSpelling drills the first half
(word -> letters) on its own.

Every example is a pure function of (split, index, word list): example i is drawn from `random.Random(seed)` with
seed = i for train and 10_000_000 + i for test. (The reference first used -(i+1) for test, but `random.seed(-x)`
equals `random.seed(x)`, so test examples repeated train ones.)
"""
from __future__ import annotations

import random
import re
from collections.abc import Sequence

from jaxchat.sandbox import FORBIDDEN_WORDS, MAX_EXPR_CHARS
from jaxchat.tasks.base import Task, extract_answer, last_text
from jaxchat.tasks.words import load_words

LETTERS = "abcdefghijklmnopqrstuvwxyz"
SPLITS = ("train", "test")
TEST_SEED_OFFSET = 10_000_000
LETTER_FROM_WORD_P = 0.9  # otherwise a random a-z, so the model also learns that the answer can be 0
LOWERCASE_P = 0.3
QUESTION_MARK_P = 0.5
QUOTES = ("", "'", '"')

# Each holds {letter} and {word} once. No template ends in "?": half the examples get one appended. The Spanish ones
# leave out the opening "¿" for the same reason, since a question without its closing mark would read as broken.
USER_TEMPLATES = (
    # English
    "How many {letter} are in the word {word}",
    "How many {letter} are there in {word}",
    "How many times does {letter} appear in {word}",
    "How many times does the letter {letter} occur in {word}",
    "Count the number of {letter} in {word}",
    "Count the {letter} in the word {word}",
    "Count how many times {letter} shows up in {word}",
    "What is the count of {letter} in {word}",
    "How often does {letter} appear in the word {word}",
    "In the word {word}, how many {letter} are there",
    "In {word}, how many times does {letter} occur",
    "Tell me how many {letter} are in {word}",
    "Can you count the {letter} in {word}",
    "Could you tell me the number of {letter} in the word {word}",
    "Please count the letter {letter} in {word}",
    "Number of {letter} in {word}",
    "How many letter {letter} does {word} have",
    "How many {letter} does the word {word} contain",
    "Does {word} contain the letter {letter}, and how many times",
    "I need the number of times {letter} appears in {word}",
    "Find the number of {letter} in {word}",
    # Spanish
    "Cuántas {letter} hay en la palabra {word}",
    "Cuenta cuántas veces aparece {letter} en {word}",
    "Cuántas veces aparece la letra {letter} en {word}",
    "Dime el número de {letter} en la palabra {word}",
    "En la palabra {word}, cuántas {letter} hay",
    # French
    "Combien de {letter} y a-t-il dans le mot {word}",
    "Combien de fois la lettre {letter} apparaît-elle dans {word}",
    "Compte le nombre de {letter} dans {word}",
    "Dans le mot {word}, combien de {letter} y a-t-il",
    "Quel est le nombre de {letter} dans {word}",
    # German
    "Wie viele {letter} sind im Wort {word}",
    "Wie oft kommt der Buchstabe {letter} in {word} vor",
    "Zähle die {letter} in {word}",
    "Wie oft erscheint {letter} im Wort {word}",
    "Wie viele Buchstaben {letter} hat {word}",
    # Chinese
    "{word}中有几个{letter}",
    "单词{word}里有多少个{letter}",
    "{letter}在{word}中出现了几次",
    "数一数{word}里有几个{letter}",
    "请问{word}这个单词中有多少个字母{letter}",
    # Korean ("글자" after the letter sidesteps particles that would depend on how the letter is read)
    "{word}에 {letter} 글자가 몇 개 있나요",
    "단어 {word}에서 {letter} 글자는 몇 번 나오나요",
    "단어 {word}에 들어 있는 {letter} 글자의 개수는",
    "{word}에서 {letter} 글자를 세어 주세요",
    "{word} 안에 {letter} 글자가 몇 개예요",
    # Japanese
    "{word}に{letter}はいくつありますか",
    "単語{word}の中に{letter}は何個ありますか",
    "{word}という単語に{letter}は何回出てきますか",
    "{word}に含まれる{letter}の数を数えてください",
    "{letter}は{word}に何回現れますか",
)

_WORD = re.compile(r"[a-z]+")
_REFUSED_BY_CALCULATOR = re.compile("|".join(re.escape(w) for w in FORBIDDEN_WORDS))


def spell(word: str) -> str:
    """`word:w,o,r,d`: commas keep every letter its own token, which is the point of spelling it out."""
    return f"{word}:{','.join(word)}"


def count_log(word: str, letter: str) -> str:
    """The by-hand count, one numbered line per character, so each step is a trivially checkable claim."""
    lines, count = [], 0
    for i, char in enumerate(word, 1):
        if char == letter:
            count += 1
            lines.append(f"{i}:{char} hit! count={count}")
        else:
            lines.append(f"{i}:{char}")
    return "\n".join(lines)


def python_expression(word: str, letter: str) -> str:
    """The calculator call; a form `jaxchat.sandbox.use_calculator` accepts (a string literal's .count)."""
    return f"'{word}'.count('{letter}')"


def calculator_can_count(word: str) -> bool:
    """Whether use_calculator will evaluate `python_expression(word, letter)` for a lowercase a-z word.

    The calculator scans the whole expression, string literals included, for forbidden words, so it refuses
    'medieval'.count('e') ("eval"), 'directory'.count('r') ("dir"), 'profile'.count('f') ("file"), ... Quotes and
    ".count(" separate the word from the letter, so only the word itself can hold one. The reference has the same
    check and kept such words, teaching tool calls that return nothing at inference; we leave them out.
    """
    return len(python_expression(word, "a")) <= MAX_EXPR_CHARS and not _REFUSED_BY_CALCULATOR.search(word)


class _SpellingTask(Task):
    def __init__(self, size: int, split: str = "train", words: Sequence[str] | None = None, **slice_kwargs):
        super().__init__(**slice_kwargs)
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{type(self).__name__}: size must be a positive int, got {size!r}")
        if split not in SPLITS:
            raise ValueError(f"{type(self).__name__}: split must be one of {SPLITS}, got {split!r}")
        self.size, self.split = size, split
        self.words = _checked(words) if words is not None else load_words()

    def num_examples(self) -> int:
        return self.size

    def _rng(self, index: int) -> random.Random:
        if not 0 <= index < self.size:
            raise IndexError(f"{self.name} index {index} out of range for size {self.size}")
        return random.Random(index if self.split == "train" else TEST_SEED_OFFSET + index)


def _checked(words: Sequence[str]) -> list[str]:
    words = list(words)
    if not words:
        raise ValueError("words is empty; the spelling tasks need at least one word")
    for i, w in enumerate(words):
        # Anything beyond a-z could break out of the quoted string in the calculator expression.
        if not isinstance(w, str) or not _WORD.fullmatch(w):
            raise ValueError(f"words[{i}] is {w!r}; spelling words must be non-empty lowercase a-z")
    return words


class SpellingBee(_SpellingTask):
    """"How many r in strawberry?" answered by a spelled-out count, a calculator check, and `#### N`."""

    eval_type = "generative"
    baseline = 0.0

    def __init__(self, size: int, split: str = "train", words: Sequence[str] | None = None, **slice_kwargs):
        super().__init__(size, split, words, **slice_kwargs)
        self.words = [w for w in self.words if calculator_can_count(w)]
        if not self.words:
            raise ValueError("SpellingBee: every word contains something the calculator refuses "
                             f"(one of {', '.join(FORBIDDEN_WORDS)}); give other words")

    def example(self, index: int) -> dict:
        rng = self._rng(index)
        word = rng.choice(self.words)
        letter = rng.choice(word) if rng.random() < LETTER_FROM_WORD_P else rng.choice(LETTERS)
        count = word.count(letter)

        template = rng.choice(USER_TEMPLATES)
        if rng.random() < LOWERCASE_P:
            template = template.lower()
        letter_quote, word_quote = rng.choice(QUOTES), rng.choice(QUOTES)
        user = template.format(letter=f"{letter_quote}{letter}{letter_quote}", word=f"{word_quote}{word}{word_quote}")
        if rng.random() < QUESTION_MARK_P:
            user += "?"

        manual = (f"We are asked to find the number '{letter}' in the word '{word}'. "
                  "Let me try a manual approach first.\n\n"
                  f"First spell the word out:\n{spell(word)}\n\n"
                  f"Then count the occurrences of '{letter}':\n{count_log(word, letter)}\n\n"
                  f"This gives us {count}.")
        parts = [
            {"type": "text", "text": manual},
            {"type": "text", "text": "\n\nLet me double check this using Python:\n\n"},
            {"type": "python", "text": python_expression(word, letter)},
            {"type": "python_output", "text": str(count)},
            {"type": "text", "text": f"\n\nPython gives us {count}.\n\nMy final answer is:\n\n#### {count}"},
        ]
        return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": parts}]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """The `#### N` of the completion equals the reference's (GSM8K's rule)."""
        reference = extract_answer(last_text(conversation))
        if reference is None:
            raise ValueError(f"{self.name}: the reference conversation has no '#### N' answer to grade against")
        return extract_answer(completion) == reference


class SimpleSpelling(_SpellingTask):
    """`Spell the word: apple` -> `apple:a,p,p,l,e`."""

    eval_type = "generative"
    baseline = 0.0

    def __init__(self, size: int, split: str = "train", words: Sequence[str] | None = None, **slice_kwargs):
        super().__init__(size, split, words, **slice_kwargs)
        random.Random(42).shuffle(self.words)  # as the reference; self.words is already a private copy

    def example(self, index: int) -> dict:
        word = self._rng(index).choice(self.words)
        return {"messages": [{"role": "user", "content": f"Spell the word: {word}"},
                             {"role": "assistant", "content": spell(word)}]}

    def evaluate(self, conversation: dict, completion: str) -> bool:
        """Exact match of the spelling, ignoring surrounding whitespace."""
        return completion.strip() == last_text(conversation)
