"""Tokenizer benchmark: our HF-tokenizers BPE vs nanochat's rustbpe (training) and tiktoken (encoding).

The corpus (default 50 MB, deterministic for a given --seed) is synthetic but shaped like web text for
a byte-level BPE: a 30k-word vocabulary of English-like words built from syllables (~2% with accented
letters) drawn with Zipf frequencies, sentences with capitals and punctuation, numbers, and ~10% of
lines that look like Python code (assignments, calls, indentation). Documents are 300-3000 words.

Measured, on the same corpus and vocab size (default 8192, i.e. 8183 ranks + 9 specials):
  train   Tokenizer.train            vs  rustbpe.Tokenizer.train_from_iterator (same split regex)
  encode  Tokenizer.encode_batch     vs  tiktoken.Encoding(rustbpe's ranks).encode_ordinary_batch
          (both on all threads), plus HF variants that explain the gap (encode_batch vs _fast,
          BPE cache size, batch size, pre-tokenizer only).
Prints a table, then one JSON line with the figures.

    python bench/tokenizer.py [--mb 50] [--vocab-size 8192] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from jaxchat.tokenizer import SPLIT_PATTERN, Tokenizer  # noqa: E402

ONSETS = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "w", "th", "st", "ch", "pr", "tr", "gr", "sh", "br", "cl"]
NUCLEI = ["a", "e", "i", "o", "u", "ea", "ou", "ai", "io", "ee", "y"]
CODAS = ["", "", "n", "r", "s", "t", "l", "nd", "ng", "st", "ck", "rt", "m", "ll"]
ACCENTED = ["é", "è", "ü", "ö", "ñ", "ç", "ß", "å"]
SUFFIXES = ["", "", "", "", "", "", "", ",", ",", ".", ".", "?", "!", ";", ":", "'s", ")"]


def make_words(rng: np.random.Generator, n: int) -> list[str]:
    words = set()
    while len(words) < n:
        k = int(rng.choice([1, 1, 2, 2, 2, 3, 3, 4]))
        w = "".join(ONSETS[rng.integers(len(ONSETS))] + NUCLEI[rng.integers(len(NUCLEI))] + CODAS[rng.integers(len(CODAS))] for _ in range(k))
        if rng.random() < 0.02:
            i = int(rng.integers(len(w)))
            w = w[:i] + ACCENTED[rng.integers(len(ACCENTED))] + w[i + 1:]
        words.add(w)
    # Frequent words are short, as in English; otherwise the order is random.
    return sorted((str(w) for w in rng.permutation(sorted(words))), key=len)


def spelled_variants(words: list[str]) -> list[str]:
    """Every word with every suffix, lower-case then capitalised: the prose stream indexes into this."""
    return [w + s for w in words for s in SUFFIXES] + [w.capitalize() + s for w in words for s in SUFFIXES]


def make_prose_tokens(rng: np.random.Generator, words: list[str], variants: list[str], n_tokens: int) -> list[str]:
    """Word stream with punctuation/capitals/numbers, vectorised: index into the spelled variants."""
    # Zipf-Mandelbrot frequencies over a finite vocabulary, as in natural text.
    weights = 1.0 / (np.arange(len(words)) + 2.7)
    ranks = rng.choice(len(words), size=n_tokens, p=weights / weights.sum())
    suffix = rng.integers(0, len(SUFFIXES), size=n_tokens)
    capital = rng.random(n_tokens) < 0.08
    index = (capital * len(words) + ranks) * len(SUFFIXES) + suffix
    out = [variants[i] for i in index.tolist()]
    numbers = np.flatnonzero(rng.random(n_tokens) < 0.03)
    values = rng.integers(0, 100_000, size=len(numbers))
    for i, v in zip(numbers.tolist(), values.tolist()):
        out[i] = str(v) if v % 3 else f"{v / 100:.2f}"
    return out


def make_code_line(rng: np.random.Generator, words: list[str]) -> str:
    a, b, c = (words[i] for i in rng.integers(0, 2000, size=3))
    n = int(rng.integers(0, 1000))
    indent = "    " * int(rng.integers(0, 3))
    kind = int(rng.integers(0, 4))
    if kind == 0:
        return f"{indent}{a}_{b} = {c}({a}, {n})"
    if kind == 1:
        return f"{indent}def {a}_{c}(self, {b}: int = {n}) -> dict:"
    if kind == 2:
        return f"{indent}if {a}.{b} >= {n}:  # {c} {a}"
    return f'{indent}return {{"{a}": {b}[{n}], "{c}": None}}'


def make_corpus(megabytes: float, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    words = make_words(rng, 30_000)
    target = int(megabytes * 1e6)
    variants = spelled_variants(words)
    docs, size = [], 0
    while size < target:
        tokens = make_prose_tokens(rng, words, variants, 1_000_000)
        lengths = rng.integers(300, 3000, size=len(tokens) // 300)
        start = 0
        for n in lengths.tolist():
            if start + n > len(tokens) or size >= target:
                break
            body = tokens[start:start + n]
            start += n
            # line breaks every ~12-40 words, ~10% of lines replaced by code
            lines, j = [], 0
            while j < len(body):
                k = int(rng.integers(12, 40))
                lines.append(make_code_line(rng, words) if rng.random() < 0.1 else " ".join(body[j:j + k]))
                j += k
            doc = "\n".join(lines) + "\n"
            docs.append(doc)
            size += len(doc.encode("utf-8"))
    return docs


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def best_of(fn, repeats: int = 2) -> float:
    """Fastest of a few runs: the machine is shared, and HF's word cache is warm after the first."""
    return min(timed(fn)[1] for _ in range(repeats))


def hf_ids(hf, docs: list[str], *, fast: bool = True, batch: int | None = None) -> list[list[int]]:
    """One way of calling HF, ids extracted to Python lists as users get them."""
    call = hf.encode_batch_fast if fast else hf.encode_batch
    step = batch or len(docs)
    return [e.ids for i in range(0, len(docs), step) for e in call(docs[i:i + step], add_special_tokens=False)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=50.0, help="corpus size in MB (UTF-8)")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variant-mb", type=float, default=5.0, help="corpus slice for the HF variant timings")
    args = parser.parse_args()
    import rustbpe
    import tiktoken
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import Regex, models, pre_tokenizers

    docs, t_gen = timed(lambda: make_corpus(args.mb, args.seed))
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    n_chars = sum(len(d) for d in docs)
    print(f"corpus: {len(docs):,} docs, {n_bytes / 1e6:.1f} MB, generated in {t_gen:.1f}s; {os.cpu_count()} CPUs", file=sys.stderr)

    reading = []  # (chars, seconds) reports; the last one comes when HF has pulled the whole iterator
    ours, t_train_ours = timed(lambda: Tokenizer.train(docs, args.vocab_size, progress=lambda c, s: reading.append(s)))
    t_count_ours = reading[-1]  # HF counts chunks while it reads, so this is ~the counting phase
    ref = rustbpe.Tokenizer()
    _, t_train_rust = timed(lambda: ref.train_from_iterator(iter(docs), args.vocab_size - 9, pattern=SPLIT_PATTERN))
    ranks = dict(ref.get_mergeable_ranks())
    enc = tiktoken.Encoding("rustbpe", pat_str=SPLIT_PATTERN, mergeable_ranks=ranks, special_tokens={})

    n_ours = sum(map(len, ours.encode_batch(docs)))
    n_tt = sum(map(len, enc.encode_ordinary_batch(docs, num_threads=os.cpu_count())))
    t_enc_ours = best_of(lambda: ours.encode_batch(docs), 2)
    t_enc_tt = best_of(lambda: enc.encode_ordinary_batch(docs, num_threads=os.cpu_count()), 2)

    # Variants on a slice, to see where HF's time goes.
    sub, size = [], 0
    for d in docs:
        if size >= args.variant_mb * 1e6:
            break
        sub.append(d)
        size += len(d.encode("utf-8"))
    spec = json.loads(ours._hf.to_str())["model"]
    default_cache = HFTokenizer.from_str(ours._hf.to_str())
    default_cache.model = models.BPE(vocab=spec["vocab"], merges=[tuple(m) for m in spec["merges"]])  # 10k words
    # Same pipeline with a one-entry WordLevel model: what regex + byte mapping + HF plumbing cost alone.
    def word_level(pre_tokenizer):
        hf = HFTokenizer(models.WordLevel(vocab={"[UNK]": 0}, unk_token="[UNK]"))
        if pre_tokenizer is not None:
            hf.pre_tokenizer = pre_tokenizer
        return hf

    split_only = word_level(ours._hf.pre_tokenizer)
    regex_only = word_level(pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"))
    bytes_only = word_level(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    no_pre = word_level(None)
    # nanochat's route: the same vocabulary as ranks for tiktoken (ids equal to ours?).
    ours_in_tiktoken = tiktoken.Encoding("ours", pat_str=SPLIT_PATTERN, special_tokens={},
                                         mergeable_ranks={ours.token_to_bytes(i): i for i in range(ours.vocab_size - 9)})
    same_ids_in_tiktoken = ours_in_tiktoken.encode_ordinary_batch(docs, num_threads=os.cpu_count()) == ours.encode_batch(docs)
    threads = os.cpu_count()
    n_sub = sum(len(e.ids) for e in ours._hf.encode_batch_fast(sub, add_special_tokens=False))
    variants = {
        "ours: encode_batch_fast, one call": lambda: hf_ids(ours._hf, sub),
        "encode_batch (with offsets)": lambda: hf_ids(ours._hf, sub, fast=False),
        "encode_batch_fast, batches of 128": lambda: hf_ids(ours._hf, sub, batch=128),
        "encode_batch_fast, batches of 1024": lambda: hf_ids(ours._hf, sub, batch=1024),
        "BPE cache 10k words (HF default)": lambda: hf_ids(default_cache, sub),
        "encode one by one (1 thread)": lambda: [ours.encode(d) for d in sub],
        "pre-tokenizer only (WordLevel model)": lambda: hf_ids(split_only, sub),
        "  Split regex only (WordLevel model)": lambda: hf_ids(regex_only, sub),
        "  ByteLevel only (WordLevel model)": lambda: hf_ids(bytes_only, sub),
        "  no pre-tokenizer (WordLevel model)": lambda: hf_ids(no_pre, sub),
        "our vocab as tiktoken ranks": lambda: ours_in_tiktoken.encode_ordinary_batch(sub, num_threads=threads),
        "tiktoken, all threads": lambda: enc.encode_ordinary_batch(sub, num_threads=threads),
        "tiktoken, 1 thread": lambda: [enc.encode_ordinary(d) for d in sub],
    }
    variants = {k: best_of(fn) for k, fn in variants.items()}

    figures = {
        "bench": "tokenizer",
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs",
        "corpus_mb": round(n_bytes / 1e6, 2),
        "corpus_chars": n_chars,
        "vocab_size": args.vocab_size,
        "train_s_ours": round(t_train_ours, 2),
        "train_s_rustbpe": round(t_train_rust, 2),
        "train_ratio_ours_over_rustbpe": round(t_train_ours / t_train_rust, 3),
        "train_read_and_count_s_ours": round(t_count_ours, 2),
        "tokens_ours": n_ours,
        "tokens_tiktoken": n_tt,
        "encode_tok_per_s_ours": round(n_ours / t_enc_ours),
        "encode_tok_per_s_tiktoken": round(n_tt / t_enc_tt),
        "encode_ratio_ours_over_tiktoken": round((n_ours / t_enc_ours) / (n_tt / t_enc_tt), 3),
        "same_ids_ours_vs_tiktoken_with_our_vocab": same_ids_in_tiktoken,
        "variant_slice_tokens": n_sub,
        "variants_s": {k: round(v, 3) for k, v in variants.items()},
    }
    print(f"\n{'':28}{'ours (HF)':>14}{'reference':>14}")
    print(f"{'train s':28}{t_train_ours:14.2f}{t_train_rust:14.2f}   (rustbpe)")
    print(f"{'encode tokens/s':28}{n_ours / t_enc_ours:14,.0f}{n_tt / t_enc_tt:14,.0f}   (tiktoken, {os.cpu_count()} threads)")
    print(f"{'tokens':28}{n_ours:14,}{n_tt:14,}")
    print(f"training: {t_count_ours:.2f}s reading + counting chunks, {t_train_ours - t_count_ours:.2f}s merging")
    print(f"tiktoken with our vocabulary as ranks gives identical ids on the whole corpus: {same_ids_in_tiktoken}")
    print(f"\nvariants on a {size / 1e6:.1f} MB slice ({n_sub:,} tokens):")
    for k, v in variants.items():
        print(f"  {k:40} {v:7.3f} s  {n_sub / v:12,.0f} tok/s")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
