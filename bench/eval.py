"""Generative-eval throughput: GSM8K-shaped problems through the engine, batched vs one problem at a time.

    python bench/eval.py [--config=configs/tiny.py] [--problems=256] [--max-tokens=256] [--batch=64] [--single=32]

Random weights (any config; d20 on a GPU), a tokenizer trained in seconds on the embedded corpus, prompts of GSM8K's
length (~150 tokens: several word problems in one question), greedy decoding as the chat eval does, every answer
graded. `--batch` problems share each decode loop; the baseline is the same eval with one problem per loop, run on
`--single` problems (it is slow) and compared by problems/s. Last line: one JSON object.
"""
import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import jax  # noqa: E402

from jaxchat import model  # noqa: E402
from jaxchat.config import parse_args  # noqa: E402
from jaxchat.data import tiny_corpus  # noqa: E402
from jaxchat.engine import Engine  # noqa: E402
from jaxchat.evaluate.chat_eval import generative_eval  # noqa: E402
from jaxchat.tasks.gsm8k import AnswerTask, gsm8k_conversation  # noqa: E402
from jaxchat.tasks.synthetic import example_rng, word_problem  # noqa: E402
from jaxchat.tokenizer import Tokenizer  # noqa: E402


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


def random_params(cfg, seed=0):
    _, params = model.init(cfg, seed)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return treedef.unflatten([0.02 * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])


def main(argv):
    config, rest = parse_args(argv if any(a.startswith("--config") for a in argv) else ["--config=configs/tiny.py", *argv])
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--single", type=int, default=32)
    args = ap.parse_args(rest)

    docs = tiny_corpus.shard_documents(0, 0, 3_000_000)
    tok = Tokenizer.train(iter(docs), config.vocab_size)
    cfg = model.GPTConfig.from_config(config)
    params = random_params(cfg)
    engine = Engine(cfg, params, tok)
    task = GSM8KShaped(args.problems)
    prompt_tokens = sum(len(tok.render_for_completion(task[i])) for i in range(16)) / 16
    common = dict(max_tokens=args.max_tokens, temperature=0.0)

    def timed(n, per_batch):
        sub = GSM8KShaped(n)
        generative_eval(engine, tok, GSM8KShaped(per_batch), problems_per_batch=per_batch, **common)  # compile
        t0 = time.perf_counter()
        r = generative_eval(engine, tok, sub, problems_per_batch=per_batch, **common)
        return r.total / (time.perf_counter() - t0)

    batched = timed(args.problems, args.batch)
    single = timed(args.single, 1)
    out = {"config": config.run, "device": jax.devices()[0].device_kind, "problems": args.problems,
           "prompt_tokens_mean": round(prompt_tokens, 1), "max_tokens": args.max_tokens, "batch": args.batch,
           "batched_problems_per_s": round(batched, 2), "single_problems_per_s": round(single, 2),
           "speedup": round(batched / single, 2)}
    print(f"{args.problems} GSM8K-shaped problems (~{prompt_tokens:.0f} prompt tokens, up to {args.max_tokens} new): "
          f"batched x{args.batch} {batched:.2f} problems/s vs one at a time {single:.2f} problems/s "
          f"({batched / single:.1f}x)")
    print(json.dumps(out))


if __name__ == "__main__":
    main(sys.argv[1:])
