"""Throughput of the pretraining pipeline (read -> tokenize -> best-fit pack -> batch), in tokens/s.

Writes a corpus in the shard format into a scratch dir: by default the Python standard library's
source split into docs at top-level definitions (~38 MB of code, comments and docstrings: varied
enough for a vocab-8192 BPE; the tiny corpus only supports ~1,900 tokens), or `--corpus tiny`.
Trains a tokenizer on it (jaxchat.tokenizer; `--tokenizer byte` uses bytes as ids instead), then
pulls batches of (B, T) for `--seconds`. Reports tokens/s of one process (wall clock) and per core
(tokens per CPU-second of this process, which counts the tokenizer's worker threads too), plus the
tokenizer alone on the same docs, the cropped fraction and how long an exact resume takes.

The target from the issue: >= 200k tokens/s per process (what one H100 consumes at d20).

It also splits the pipeline's wall time into the tokenizer's calls and the rest (reading, packing, stacking: Python
under the GIL, so it does not get faster with more cores or threads), and from that gives one process's ceiling
with unlimited tokenizer cores (an upper bound: GIL-held work inside the tokenizer's calls, such as turning ids into
Python lists, counts as the tokenizer's). `--threads N` runs N pipelines (disjoint reader slots, as one process with N slots
would) on N threads at once. `--tokenizer tiktoken` is jaxchat's own encoder (tiktoken over the trained BPE's ranks:
identical ids, Tokenizer.fast_encoder), `--tokenizer hf` the HF encoder it replaces (JAXCHAT_TOKENIZER=hf). Last,
what a node needs: tokens/s of 8 H100s at 50% MFU for d12 and d20 (FLOPs per token from
jaxchat.config.derive), and the processes or cores that reach twice that at the measured rates.

    python bench/dataloader.py [--batch-size 32] [--seq-len 2048] [--seconds 10] [--packing stream|bestfit]
                               [--tokenizer tiktoken|hf|byte] [--threads N]
Last line: one JSON object.
"""
import argparse
import json
import math
import os
import shutil
import sys
import sysconfig
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from jaxchat.data import pretrain, shards, tiny_corpus  # noqa: E402
from jaxchat.data.datasets import shard_name  # noqa: E402


class ByteTokenizer:
    """Bytes as ids, specials after them: the cheapest possible tokenizer, to isolate the packer's cost."""
    vocab_size, bos_id = 265, 256

    def encode_batch(self, texts, prepend=None, append=None):
        return [[prepend] + list(t.encode()) for t in texts]


def stdlib_shards(out: Path, docs_per_shard: int = 8192) -> list[Path]:
    """The stdlib's .py files, split into docs at blank-line pairs (between top-level definitions)."""
    docs = []
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        text = f.read_text(encoding="utf-8", errors="replace")
        docs += [d for d in text.split("\n\n\n") if d.strip()]
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(0, len(docs), docs_per_shard):
        paths.append(out / shard_name(len(paths)))
        tiny_corpus.write_shard(docs[i:i + docs_per_shard], paths[-1])
    return paths


def cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class Timed:
    """A tokenizer whose encode_batch calls are timed (wall seconds, summed over threads)."""

    def __init__(self, tok):
        self._tok, self.seconds = tok, 0.0
        self.vocab_size, self.bos_id = tok.vocab_size, tok.bos_id

    def encode_batch(self, texts, prepend=None, append=None):
        t0 = time.perf_counter()
        try:
            return self._tok.encode_batch(texts, prepend=prepend, append=append)
        finally:
            self.seconds += time.perf_counter() - t0


def build_tokenizer(kind: str, train_paths, vocab_size: int):
    if kind == "byte":
        return ByteTokenizer(), 0.0
    from jaxchat.tokenizer import Tokenizer
    t0 = time.perf_counter()
    tok = Tokenizer.train(shards.iter_texts(train_paths), vocab_size)
    train_s = time.perf_counter() - t0
    if (tok.fast_encoder() is None) != (kind == "hf"):
        raise SystemExit(f"--tokenizer {kind}: this process encodes with "
                         f"{'HF' if tok.fast_encoder() is None else 'tiktoken'} (JAXCHAT_TOKENIZER, tiktoken installed?)")
    return tok, train_s


def node_needs(rate_per_process: float, rate_per_cpu_s: float, ceiling: float) -> dict:
    """Tokens/s of one 8-H100 node at 50% MFU for d12 and d20, and what reaches twice that at the measured rates."""
    from jaxchat import config as C
    from jaxchat.hardware import PEAK_FLOPS

    out = {}
    for depth in (12, 20):
        c = C.default_config()
        c.depth = depth
        need = 0.5 * 8 * PEAK_FLOPS["H100"] / C.derive(c, 8).flops_per_token
        out[f"d{depth}"] = {"tokens_per_s_at_50pct_mfu": round(need),
                            "processes_for_2x": math.ceil(2 * need / rate_per_process),
                            "cores_for_2x": round(2 * need / rate_per_cpu_s, 1),
                            "one_process_reaches_2x": ceiling >= 2 * need}
    return out


def threaded(train_paths, tok, args, n: int) -> float:
    """Aggregate tokens/s of n pipelines (reader slots 0..n-1 of n) pulled on n threads at once."""
    its = [iter(pretrain.pretrain_dataset(train_paths, tok, args.batch_size, args.seq_len, i, n, packing=args.packing))
           for i in range(n)]
    for it in its:
        next(it)
    counts = [0] * n
    deadline = time.perf_counter() + args.seconds

    def pull(i):
        while time.perf_counter() < deadline:
            next(its[i])
            counts[i] += 1

    t0 = time.perf_counter()
    threads = [threading.Thread(target=pull, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) * args.batch_size * args.seq_len / (time.perf_counter() - t0)


def main(argv=None):
    home = Path(tempfile.mkdtemp(prefix="jaxchat-bench-"))
    try:
        run(argv, home)
    finally:
        shutil.rmtree(home, ignore_errors=True)


def run(argv, home: Path):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=2048)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--corpus", choices=("stdlib", "tiny"), default="stdlib")
    ap.add_argument("--tokenizer", choices=("tiktoken", "hf", "byte"), default="tiktoken")
    ap.add_argument("--vocab-size", type=int, default=8192)
    ap.add_argument("--packing", choices=("bestfit", "stream"), default="bestfit")
    ap.add_argument("--threads", type=int, default=1, help="also run this many pipelines on as many threads")
    args = ap.parse_args(argv)

    os.environ["JAXCHAT_HOME"] = str(home)
    t0 = time.perf_counter()
    if args.corpus == "tiny":
        tiny_corpus.generate()
        train_paths, _ = shards.list_shards("tiny")
    else:
        train_paths = stdlib_shards(home / "stdlib")
    gen_s = time.perf_counter() - t0
    if args.tokenizer == "hf":
        os.environ["JAXCHAT_TOKENIZER"] = "hf"
    tok, tok_train_s = build_tokenizer(args.tokenizer, train_paths, args.vocab_size)

    # the tokenizer alone, on one epoch of the same docs in the pipeline's batches of 128
    docs = list(shards.iter_texts(train_paths, doc_cap=10**9))
    c0, w0 = cpu_seconds(), time.perf_counter()
    n_tok = sum(len(ids) for i in range(0, len(docs), 128) for ids in tok.encode_batch(docs[i:i + 128], prepend=tok.bos_id))
    enc_wall, enc_cpu = time.perf_counter() - w0, cpu_seconds() - c0

    timed = Timed(tok)
    it = iter(pretrain.pretrain_dataset(train_paths, timed, args.batch_size, args.seq_len, packing=args.packing))
    next(it)  # warm: first row groups read, buffer filled
    c0, w0, batches, timed.seconds = cpu_seconds(), time.perf_counter(), 0, 0.0
    while time.perf_counter() - w0 < args.seconds:
        next(it)
        batches += 1
    wall, cpu = time.perf_counter() - w0, cpu_seconds() - c0
    tokens = batches * args.batch_size * args.seq_len
    rest_s = wall - timed.seconds  # reading, packing, stacking: serial Python

    state = json.loads(json.dumps(it.get_state()))
    r0 = time.perf_counter()
    iter(pretrain.pretrain_dataset(train_paths, tok, args.batch_size, args.seq_len, packing=args.packing)).set_state(state)
    restore_s = time.perf_counter() - r0
    threads_tps = {n: round(threaded(train_paths, tok, args, n)) for n in sorted({1, args.threads})} \
        if args.threads > 1 else {}

    stats = it.stats()
    result = {
        "bench": "dataloader", "machine_cpus": os.cpu_count(), "corpus": args.corpus, "tokenizer": args.tokenizer,
        "vocab_size": tok.vocab_size, "batch_size": args.batch_size, "seq_len": args.seq_len,
        "corpus_gen_s": round(gen_s, 2), "tokenizer_train_s": round(tok_train_s, 2),
        "batches": batches, "epochs_reached": stats["epoch"],
        "tokens_per_s_per_process": round(tokens / wall),
        "tokens_per_cpu_s": round(tokens / cpu) if cpu > 0 else None,
        "cpu_cores_busy": round(cpu / wall, 2),
        "tokenizer_only_tokens_per_s": round(n_tok / enc_wall),
        "tokenizer_only_tokens_per_cpu_s": round(n_tok / enc_cpu) if enc_cpu > 0 else None,
        "cropped_fraction": round(stats["cropped_fraction"], 4),
        "state_json_bytes": len(json.dumps(state)), "restore_s": round(restore_s, 3),
        "target_tokens_per_s_per_process": 200_000, "packing": args.packing,
        "tokenizer_share_of_wall": round(timed.seconds / wall, 3),
        "rest_us_per_token": round(rest_s / tokens * 1e6, 3),
        "one_process_ceiling_tokens_per_s": round(tokens / rest_s),  # with tokenizer time -> 0 (unlimited cores)
        "threads_tokens_per_s": threads_tps,
    }
    result["node_needs"] = node_needs(result["tokens_per_s_per_process"], result["tokens_per_cpu_s"],
                                      result["one_process_ceiling_tokens_per_s"])
    print(f"pipeline: {result['tokens_per_s_per_process']:,} tokens/s per process, "
          f"{result['tokens_per_cpu_s']:,} tokens per CPU-second ({result['cpu_cores_busy']} cores busy); "
          f"tokenizer alone {result['tokenizer_only_tokens_per_s']:,} tokens/s; cropped {stats['cropped_fraction']:.1%}")
    print(f"tokenizer calls {timed.seconds / wall:.0%} of the pipeline's wall time; the rest is "
          f"{result['rest_us_per_token']:.2f} us/token of serial Python: one process tops out near "
          f"{result['one_process_ceiling_tokens_per_s']:,} tokens/s however many cores tokenize"
          + "".join(f"; {n} thread(s): {v:,} tokens/s" for n, v in threads_tps.items()))
    for name, need in result["node_needs"].items():
        print(f"{name} on 8 H100s at 50% MFU eats {need['tokens_per_s_at_50pct_mfu']:,} tokens/s; twice that takes "
              f"{need['processes_for_2x']} processes like this one or {need['cores_for_2x']} cores at this per-core "
              f"rate (one process {'can' if need['one_process_reaches_2x'] else 'cannot'} get there)")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
