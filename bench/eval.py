"""Generative-eval throughput: GSM8K-shaped problems through the engine, batched vs one problem at a time.

    python bench/eval.py [--config=configs/tiny.py] [--problems=256] [--max-tokens=256] [--batch=64] [--single=32]

Random weights (any config; d20 on a GPU) restricted to printable tokens so every answer runs to --max-tokens, a
tokenizer trained in seconds on the embedded corpus (bench/random_model.py: at most 1,536 tokens, the model keeps the
config's vocabulary), prompts of GSM8K's length (~150 tokens: several word problems in one question), greedy decoding
as the chat eval does, every answer graded. `--batch` problems share each decode loop; the baseline is the same eval
with one problem per loop, run on `--single` problems (it is slow) and compared by problems/s. Last line: one JSON
object.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from jaxchat.config import model_config, parse_command  # noqa: E402
from jaxchat.engine import Engine  # noqa: E402
from jaxchat.evaluate.chat_eval import generative_eval  # noqa: E402
from jaxchat.tasks.gsm8k import AnswerTask, gsm8k_conversation  # noqa: E402
from jaxchat.tasks.synthetic import example_rng, word_problem  # noqa: E402
from random_model import corpus_tokenizer, printable_params  # noqa: E402


class GSM8KShaped(AnswerTask):
    """Four word problems per question, so prompts are GSM8K's length."""

    def __init__(self, size):
        super().__init__()
        self.size = size

    def num_examples(self):
        return self.size

    def example(self, index):
        r = example_rng("test", index)
        problems = [word_problem(r) for _ in range(4)]
        question = " ".join(q for q, _ in problems) + " What is the sum of those four answers?"
        return gsm8k_conversation(question, problems[-1][1])


def measure(config, problems: int = 256, max_tokens: int = 256, batch: int = 64, single: int = 32) -> dict:
    """Problems/s of the generative eval with `batch` problems per decode loop and with one, each after a warm-up
    pass that compiles its programs."""
    tok = corpus_tokenizer(config.vocab_size)
    cfg = model_config(config)
    engine = Engine(cfg, printable_params(cfg, tok, seed=config.seed, scale=0.02), tok)
    task = GSM8KShaped(problems)
    prompt_tokens = sum(len(tok.render_for_completion(task[i])) for i in range(min(16, problems))) / min(16, problems)

    def timed(n, per_batch):
        generative_eval(engine, tok, GSM8KShaped(per_batch), problems_per_batch=per_batch, max_tokens=max_tokens,
                        temperature=0.0)  # compile
        t0 = time.perf_counter()
        r = generative_eval(engine, tok, GSM8KShaped(n), problems_per_batch=per_batch, max_tokens=max_tokens,
                            temperature=0.0)
        return r.total / (time.perf_counter() - t0)

    batched = timed(problems, batch)
    one = timed(single, 1)
    return {"config": config.run, "device": jax.devices()[0].device_kind, "problems": problems,
            "prompt_tokens_mean": round(prompt_tokens, 1), "max_tokens": max_tokens, "batch": batch,
            "batched_problems_per_s": round(batched, 2), "single_problems_per_s": round(one, 2),
            "speedup": round(batched / one, 2)}


def main(argv):
    ap = argparse.ArgumentParser(prog="python bench/eval.py", description=__doc__.splitlines()[0])
    ap.add_argument("--problems", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--single", type=int, default=32)
    config, args = parse_command(argv, ap, default_config="configs/tiny.py")
    out = measure(config, args.problems, args.max_tokens, args.batch, args.single)
    print(f"{args.problems} GSM8K-shaped problems (~{out['prompt_tokens_mean']:.0f} prompt tokens, up to "
          f"{args.max_tokens} new): batched x{args.batch} {out['batched_problems_per_s']:.2f} problems/s vs one at a "
          f"time {out['single_problems_per_s']:.2f} problems/s ({out['speedup']:.1f}x)")
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
