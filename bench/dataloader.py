"""Throughput of the pretraining pipeline (read -> tokenize -> best-fit pack -> batch), in tokens/s.

Writes a corpus in the shard format into a scratch dir: by default the Python standard library's
source split into docs at top-level definitions (~38 MB of code, comments and docstrings: varied
enough for a vocab-8192 BPE; the tiny corpus only supports ~1,900 tokens), or `--corpus tiny`.
Trains a tokenizer on it (jaxchat.tokenizer; `--tokenizer byte` uses bytes as ids instead), then
pulls batches of (B, T) for `--seconds`. Reports tokens/s of one process (wall clock) and per core
(tokens per CPU-second of this process, which counts the tokenizer's worker threads too), plus the
tokenizer alone on the same docs, the cropped fraction and how long an exact resume takes.

The target from the issue: >= 200k tokens/s per process (what one H100 consumes at d20).

    python bench/dataloader.py [--batch-size 32] [--seq-len 2048] [--seconds 10]
Last line: one JSON object.
"""
import argparse
import json
import os
import shutil
import sys
import sysconfig
import tempfile
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


def build_tokenizer(kind: str, train_paths, vocab_size: int):
    if kind == "byte":
        return ByteTokenizer(), 0.0
    from jaxchat.tokenizer import Tokenizer
    t0 = time.perf_counter()
    tok = Tokenizer.train(shards.iter_texts(train_paths), vocab_size)
    return tok, time.perf_counter() - t0


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
    ap.add_argument("--tokenizer", choices=("bpe", "byte"), default="bpe")
    ap.add_argument("--vocab-size", type=int, default=8192)
    args = ap.parse_args(argv)

    os.environ["JAXCHAT_HOME"] = str(home)
    t0 = time.perf_counter()
    if args.corpus == "tiny":
        tiny_corpus.generate()
        train_paths, _ = shards.list_shards("tiny")
    else:
        train_paths = stdlib_shards(home / "stdlib")
    gen_s = time.perf_counter() - t0
    tok, tok_train_s = build_tokenizer(args.tokenizer, train_paths, args.vocab_size)

    # the tokenizer alone, on one epoch of the same docs in the pipeline's batches of 128
    docs = list(shards.iter_texts(train_paths, doc_cap=10**9))
    c0, w0 = cpu_seconds(), time.perf_counter()
    n_tok = sum(len(ids) for i in range(0, len(docs), 128) for ids in tok.encode_batch(docs[i:i + 128], prepend=tok.bos_id))
    enc_wall, enc_cpu = time.perf_counter() - w0, cpu_seconds() - c0

    it = iter(pretrain.pretrain_dataset(train_paths, tok, args.batch_size, args.seq_len))
    next(it)  # warm: first row groups read, buffer filled
    c0, w0, batches = cpu_seconds(), time.perf_counter(), 0
    while time.perf_counter() - w0 < args.seconds:
        next(it)
        batches += 1
    wall, cpu = time.perf_counter() - w0, cpu_seconds() - c0
    tokens = batches * args.batch_size * args.seq_len

    state = json.loads(json.dumps(it.get_state()))
    r0 = time.perf_counter()
    iter(pretrain.pretrain_dataset(train_paths, tok, args.batch_size, args.seq_len)).set_state(state)
    restore_s = time.perf_counter() - r0

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
        "target_tokens_per_s_per_process": 200_000,
    }
    print(f"pipeline: {result['tokens_per_s_per_process']:,} tokens/s per process, "
          f"{result['tokens_per_cpu_s']:,} tokens per CPU-second ({result['cpu_cores_busy']} cores busy); "
          f"tokenizer alone {result['tokenizer_only_tokens_per_s']:,} tokens/s; cropped {stats['cropped_fraction']:.1%}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
