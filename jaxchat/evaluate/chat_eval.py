"""Chat evaluations (nanochat `chat_eval.py`): categorical multiple choice and generative problems, then ChatCORE.

- Categorical (ARC, MMLU, TinyQuiz): prompts rendered for completion, right-padded with BOS into a (B, T) batch with
  T bucketed to a power of two, the engine's `last_logits` (each row's last position gathered on device, so only
  (B, V) crosses to the host), logits restricted to the problem's answer letters, argmax. Letters must be single tokens.
- Generative (GSM8K, HumanEval, SpellingBee, Arithmetic): many problems go through the engine in one batched
  `generate_batch` call (the engine buckets prompts, prompt length and cache length), `num_samples` each; a problem
  passes if any sample passes (pass@k). Tool calls run exactly as in chat.
- Problems are strided across processes and the counts summed, so every host evaluates a disjoint share; within a
  host the engine splits the rows over its mesh (every local device).
- ChatCORE = mean over the six reference tasks of (acc - baseline) / (1 - baseline), only when all six ran.
"""
from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from jaxchat.engine import bucket
from jaxchat.tasks import CHATCORE_TASKS
from jaxchat.tasks.base import Task

MIN_T = 16


@dataclasses.dataclass
class TaskResult:
    name: str
    correct: int
    total: int
    seconds: float
    baseline: float
    example: dict | None = None  # one problem with its completion, for the log and the report
    pass_at: list[int] | None = None  # generative: pass_at[k-1] = problems solved by one of the first k samples

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else 0.0

    @property
    def centered(self) -> float:
        return (self.accuracy - self.baseline) / (1.0 - self.baseline)


def _problem_indices(task: Task, max_problems: int, pidx: int, pcount: int) -> list[int]:
    n = len(task) if max_problems is None or max_problems < 0 else min(max_problems, len(task))
    return list(range(pidx, n, pcount))


def letter_ids(tokenizer, letters: Sequence[str]) -> list[int]:
    ids = []
    for letter in letters:
        encoded = tokenizer.encode(letter)
        if len(encoded) != 1:
            raise ValueError(f"answer letter {letter!r} is {len(encoded)} tokens with this tokenizer; categorical "
                             f"evaluation needs every letter to be a single token")
        ids.append(encoded[0])
    return ids


def _crop_left(ids: list[int], limit: int) -> list[int]:
    # Keep the end: the question's tail, the options and the assistant prompt are what the answer depends on.
    return ids if len(ids) <= limit else ids[len(ids) - limit:]


def categorical_eval(last_logits, tokenizer, task: Task, *, seq_len: int, batch_size: int = 8,
                     max_problems: int = -1, pidx: int = 0, pcount: int = 1) -> TaskResult:
    t0 = time.perf_counter()
    indices = _problem_indices(task, max_problems, pidx, pcount)
    correct, example = 0, None
    for start in range(0, len(indices), batch_size):
        chunk = [task[i] for i in indices[start:start + batch_size]]
        prompts = [_crop_left(tokenizer.render_for_completion(conv), seq_len) for conv in chunk]
        T = min(seq_len, bucket(max(len(p) for p in prompts), MIN_T))
        tokens = np.full((batch_size, T), tokenizer.bos_id, np.int32)  # fixed B: one compile per T bucket
        lengths = np.ones((batch_size,), np.int32)
        for i, p in enumerate(prompts):
            tokens[i, :len(p)], lengths[i] = p, len(p)
        logits = last_logits(tokens, lengths)
        for i, conv in enumerate(chunk):
            ids = letter_ids(tokenizer, conv["letters"])
            predicted = conv["letters"][int(np.argmax(logits[i, ids]))]
            ok = task.evaluate(conv, predicted)
            correct += ok
            if example is None:
                example = {"prompt": conv["messages"][0]["content"], "completion": predicted, "correct": bool(ok)}
    return TaskResult(task.name, correct, len(indices), time.perf_counter() - t0, task.baseline, example)


def generative_eval(engine, tokenizer, task: Task, *, num_samples: int = 1, max_tokens: int = 512,
                    temperature: float = 0.0, top_k: int = 50, problems_per_batch: int = 32, max_problems: int = -1,
                    seed: int = 0, pidx: int = 0, pcount: int = 1) -> TaskResult:
    t0 = time.perf_counter()
    seq_len = engine.cfg.sequence_len
    indices = _problem_indices(task, max_problems, pidx, pcount)
    correct, example = 0, None
    pass_at = [0] * num_samples
    for start in range(0, len(indices), problems_per_batch):
        idx = indices[start:start + problems_per_batch]
        convs = [task[i] for i in idx]
        # Leave room for at least a short answer; a prompt longer than the context keeps its end.
        prompts = [_crop_left(tokenizer.render_for_completion(c), seq_len - min(max_tokens, seq_len // 4))
                   for c in convs]
        budgets = [min(max_tokens, seq_len - len(p)) for p in prompts]
        rows, _ = engine.generate_batch(prompts, num_samples=num_samples, max_tokens=budgets,
                                        temperature=temperature, top_k=top_k, seed=[seed + i for i in idx])
        for j, conv in enumerate(convs):
            completions = [tokenizer.decode(rows[j * num_samples + s][len(prompts[j]):]) for s in range(num_samples)]
            outcomes = [bool(task.evaluate(conv, c)) for c in completions]
            correct += any(outcomes)
            for k in range(num_samples):
                pass_at[k] += any(outcomes[:k + 1])
            if example is None:
                example = {"prompt": tokenizer.decode(prompts[j]), "completion": completions[0],
                           "correct": bool(outcomes[0])}
    return TaskResult(task.name, correct, len(indices), time.perf_counter() - t0, task.baseline, example, pass_at)


def chat_core(results: dict[str, TaskResult]) -> dict[str, float]:
    """ChatCORE over the reference's six tasks (only when all ran), ChatCORE_cat over the categorical three."""
    out = {}
    if all(name in results for name in CHATCORE_TASKS):
        out["ChatCORE"] = float(np.mean([results[n].centered for n in CHATCORE_TASKS]))
    categorical = ("ARC-Easy", "ARC-Challenge", "MMLU")
    if all(name in results for name in categorical):
        out["ChatCORE_cat"] = float(np.mean([results[n].centered for n in categorical]))
    return out


def run_chat_eval(tasks: dict[str, Task], *, engine, eval_cfg, log: Callable[[str], None] = print) -> dict:
    """Evaluate every task; returns {"tasks": {name: {accuracy, centered, correct, total, seconds, example}},
    "ChatCORE"?: x, "ChatCORE_cat"?: x}."""
    import jax

    from jaxchat.sharding import sum_over_processes

    pidx, pcount = jax.process_index(), jax.process_count()
    tokenizer, seq_len = engine.tokenizer, engine.cfg.sequence_len
    results: dict[str, TaskResult] = {}
    for name, task in tasks.items():
        if task.eval_type == "categorical":
            r = categorical_eval(engine.last_logits, tokenizer, task, seq_len=seq_len, batch_size=eval_cfg.batch_size,
                                 max_problems=eval_cfg.max_problems, pidx=pidx, pcount=pcount)
        else:
            r = generative_eval(engine, tokenizer, task, num_samples=eval_cfg.num_samples,
                                max_tokens=eval_cfg.max_tokens, temperature=eval_cfg.temperature,
                                top_k=eval_cfg.top_k, problems_per_batch=eval_cfg.generate_batch,
                                max_problems=eval_cfg.max_problems, pidx=pidx, pcount=pcount)
        r.correct, r.total = sum_over_processes([r.correct, r.total])
        results[name] = r
        rate = r.total / r.seconds if r.seconds > 0 else math.inf
        log(f"{name:<14} {r.accuracy:7.2%}  ({r.correct}/{r.total}, {r.seconds:.1f}s, {rate:.1f} problems/s)")
    out = {"tasks": {n: {"accuracy": r.accuracy, "centered": r.centered, "correct": r.correct, "total": r.total,
                         "seconds": r.seconds, "example": r.example} for n, r in results.items()}}
    out.update(chat_core(results))
    for key in ("ChatCORE", "ChatCORE_cat"):
        if key in out:
            log(f"{key:<14} {out[key]:.4f}")
    return out
