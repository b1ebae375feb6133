"""The DCLM CORE metric (nanochat `core_eval.py` + `base_eval.py`), framework-agnostic.

Bundle layout (`eval_bundle_dir()`; `python -m jaxchat.evaluate.core` downloads it, or replaces a damaged one):
    core.yaml            icl_tasks: [{label, dataset_uri, num_fewshot: [K], icl_task_type, continuation_delimiter?}]
    eval_data/<category>/<file>.jsonl
    eval_meta_data.csv   columns include `Eval Task` and `Random baseline` (percent)
A file that differs from the checksums written at unpacking, or does not parse, is a DamagedFileError naming it.

Prompts are scored whole, as the reference scores its own models (their rotary tables reach 10x the training length;
ours are computed from positions, so any length works): `crop` > 0 crops longer prompts from the left instead, what
the reference does only for models that declare a max_seq_len (HF GPT-2, 1024). Config: `eval.core_crop`.

Scoring needs only a `StatsFn`: tokens (B, T) -> per-position loss and greedy match, so any model (or a fake one in
tests, through `stats_from_logits`) plugs in: jaxchat's model through `Engine.token_stats`, which computes both on the
devices (rows split over the engine's mesh), so (B, T, V) logits never reach the host.
Batching: every row of every example of a task is sorted by length and run `batch_rows` at a time, right-padded with
BOS to a power-of-two T (>= 16), B fixed, so a handful of shapes compile for the whole bundle; rows longer than
`row_tokens` (the model's sequence length) go fewer at a time, so no batch holds more tokens than `batch_rows` full
rows. Examples are strided across processes.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import os
import random
import shutil
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from jaxchat.data.fetch import DamagedFileError
from jaxchat.engine import bucket
from jaxchat.paths import eval_bundle_dir

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
FETCH_COMMAND = "python -m jaxchat.evaluate.core"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")

LogitsFn = Callable[[np.ndarray], np.ndarray]
# tokens (B, T) -> (nll (B, T): −log p(token t | tokens < t), 0 at t = 0; match (B, T): token t is the greedy choice)
StatsFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


# -- prompts ---------------------------------------------------------------------------------------
def render_prompts(item: dict, task_type: str, delimiter: str, fewshot_items: Sequence[dict] = ()) -> list[str]:
    """The Jinja templates of nanochat's core_eval.py, in plain Python; few-shot blocks end with a blank line."""
    d = delimiter
    if task_type == "multiple_choice":
        head = "".join(f"{ex['query']}{d}{ex['choices'][ex['gold']]}\n\n" for ex in fewshot_items)
        return [f"{head}{item['query']}{d}{choice}" for choice in item["choices"]]
    if task_type == "schema":
        head = "".join(f"{ex['context_options'][ex['gold']]}{d}{ex['continuation']}\n\n" for ex in fewshot_items)
        return [f"{head}{ctx}{d}{item['continuation']}" for ctx in item["context_options"]]
    if task_type == "language_modeling":
        head = "".join(f"{ex['context'].strip()}{d}{ex['continuation']}\n\n" for ex in fewshot_items)
        base = f"{head}{item['context'].strip()}{d}"
        # nanochat .strip()s only the prompt without continuation (its trailing delimiter whitespace goes away).
        return [base.strip(), base + item["continuation"]]
    raise ValueError(f"unknown icl_task_type {task_type!r} (expected one of {TASK_TYPES})")


def spans(token_lists: Sequence[Sequence[int]], task_type: str) -> list[tuple[int, int]]:
    """(start, end) of the scored continuation in each token list (end exclusive).

    multiple_choice: after the common prefix of all prompts; schema: the common suffix; language_modeling: the
    tokens of "with" (token_lists[1]) beyond "without" (token_lists[0]); returns a single span for "with"."""
    if task_type == "multiple_choice":
        n = min(len(t) for t in token_lists)
        p = 0
        while p < n and all(t[p] == token_lists[0][p] for t in token_lists):
            p += 1
        return [(p, len(t)) for t in token_lists]
    if task_type == "schema":
        n = min(len(t) for t in token_lists)
        s = 0
        while s < n and all(t[-1 - s] == token_lists[0][-1 - s] for t in token_lists):
            s += 1
        return [(len(t) - s, len(t)) for t in token_lists]
    if task_type == "language_modeling":
        without, with_ = token_lists
        start, end = len(without), len(with_)
        if not start < end or list(with_[:start]) != list(without):
            raise ValueError("language_modeling: tokens of the prompt without continuation are not a prefix of those with it")
        return [(start, end)]
    raise ValueError(f"unknown icl_task_type {task_type!r}")


# -- scoring ---------------------------------------------------------------------------------------
def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float32)
    m = x.max(axis=-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))


def sample_fewshot(data: Sequence[dict], idx: int, k: int) -> list[dict]:
    """K distinct examples other than `idx`, drawn with random.Random(1234 + idx) (as nanochat).
    K is clamped to len(data) - 1 (nanochat would raise when a tiny max_per_task leaves too few examples)."""
    k = min(k, len(data) - 1)
    if k <= 0:
        return []
    rng = random.Random(1234 + idx)
    available = [i for i in range(len(data)) if i != idx]
    return [data[i] for i in rng.sample(available, k)]


@dataclasses.dataclass
class Prepared:
    """One example as rows to run: token lists, the scored span of each, and how to score them."""

    rows: list[list[int]]
    spans: list[tuple[int, int]]
    task_type: str
    gold: int


def prepare_example(tokenizer, item: dict, meta: dict, fewshot: Sequence[dict] = (),
                    max_seq_len: int | None = None) -> Prepared:
    """Render and tokenize one example, whole; with `max_seq_len`, rows longer than it are cropped from the left (the
    reference's treatment of a model with a max_seq_len). `meta`: {"task_type", "continuation_delimiter"}."""
    task_type = meta["task_type"]
    prompts = render_prompts(item, task_type, meta.get("continuation_delimiter", " "), fewshot)
    tokens = [tokenizer.encode(p, prepend=tokenizer.bos_id) for p in prompts]
    sp = spans(tokens, task_type)
    if task_type == "language_modeling":
        tokens = [tokens[1]]  # only "with" is run; the span marks the continuation
    if max_seq_len is not None:  # crop from the left, shifting spans
        cropped = []
        for i, (t, (s, e)) in enumerate(zip(tokens, sp)):
            cut = max(0, len(t) - max_seq_len)
            cropped.append(t[cut:])
            sp[i] = (s - cut, e - cut)
            if s - cut < 1:
                raise ValueError("continuation does not fit in max_seq_len")
        tokens = cropped
    return Prepared([list(t) for t in tokens], sp, task_type, int(item.get("gold", 0)))


def score_prepared(p: Prepared, nll_rows: Sequence[np.ndarray], match_rows: Sequence[np.ndarray]) -> bool:
    """Multiple choice / schema: the option with the lowest mean loss over its span; language modelling: every
    span token is the greedy prediction. `nll_rows[i][t]` is −log p(token t | tokens < t) of row i."""
    if p.task_type == "language_modeling":
        (s, e), = p.spans
        return bool(match_rows[0][s:e].all())
    mean_losses = [float(nll[s:e].mean()) for nll, (s, e) in zip(nll_rows, p.spans)]
    return int(np.argmin(mean_losses)) == p.gold


def stats_from_logits(logits_fn: LogitsFn) -> StatsFn:
    """Turn a (B, T, V) logits function (a fake model in tests, any framework) into a StatsFn, on the host."""

    def stats(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits = np.asarray(logits_fn(tokens), np.float32)
        logp = _log_softmax(logits[:, :-1])
        nxt = tokens[:, 1:]
        nll = np.zeros(tokens.shape, np.float32)
        nll[:, 1:] = -np.take_along_axis(logp, nxt[..., None], axis=-1)[..., 0]
        match = np.zeros(tokens.shape, bool)
        match[:, 1:] = logits[:, :-1].argmax(-1) == nxt
        return nll, match

    return stats


def score_example(logits_fn: LogitsFn, tokenizer, item: dict, meta: dict, fewshot: Sequence[dict] = (),
                  max_seq_len: int | None = None) -> bool:
    """One example -> correct? (one forward of its rows; `evaluate_task` batches many examples instead)."""
    p = prepare_example(tokenizer, item, meta, fewshot, max_seq_len)
    nll, match = run_rows(stats_from_logits(logits_fn), p.rows, tokenizer.bos_id, max_seq_len, batch_rows=len(p.rows))
    return score_prepared(p, nll, match)


def run_rows(stats_fn: StatsFn, rows: Sequence[Sequence[int]], pad_id: int, max_seq_len: int | None = None,
             batch_rows: int = 32, row_tokens: int | None = None) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Per-row (nll, match) for many rows: rows are sorted by length and batched `batch_rows` at a time, right-padded
    to a power-of-two T (>= 16), B fixed (a power of two), so a handful of shapes compile and little is padding.
    With `row_tokens`, a batch whose T exceeds it takes fewer rows (B halved until B * T <= batch_rows * row_tokens),
    so prompts longer than the model's sequence length cost no more memory than a full batch of ordinary ones."""
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
    B = bucket(min(batch_rows, max(1, len(rows))), 1)
    budget = B * row_tokens if row_tokens else None
    nll_out: list = [None] * len(rows)
    match_out: list = [None] * len(rows)

    def width(n_rows: int) -> int:
        T = bucket(max(len(rows[i]) for i in order[start:start + n_rows]), 16)
        return T if max_seq_len is None else min(T, max_seq_len)

    start = 0
    while start < len(order):
        b = B
        T = width(b)
        while budget and b > 1 and b * T > budget:
            b //= 2
            T = width(b)
        chunk = order[start:start + b]
        start += b
        batch = np.full((b, T), pad_id, dtype=np.int32)
        for j, i in enumerate(chunk):
            batch[j, :len(rows[i])] = rows[i]
        nll, match = stats_fn(batch)
        nll, match = np.asarray(nll), np.asarray(match)
        for j, i in enumerate(chunk):
            nll_out[i], match_out[i] = nll[j, :len(rows[i])], match[j, :len(rows[i])]
    return nll_out, match_out


def model_logits_fn(graphdef, params) -> LogitsFn:
    """Wrap jaxchat.model.forward as a LogitsFn (full logits to the host: for tests and small models)."""
    import jax

    from jaxchat import model

    fwd = jax.jit(lambda p, x: model.forward(graphdef, p, x))
    return lambda tokens: np.asarray(jax.device_get(fwd(params, tokens)))


# -- bundle ----------------------------------------------------------------------------------------
def load_bundle(bundle_dir: str | os.PathLike | None = None) -> list[dict]:
    """core.yaml's icl_tasks as dicts: label, dataset_uri, num_fewshot (int: the first entry), task_type,
    continuation_delimiter (default " ")."""
    import yaml

    path = Path(bundle_dir or eval_bundle_dir()) / "core.yaml"
    with _damage_is_named(path):
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
        tasks = []
        for t in config["icl_tasks"]:
            k = t["num_fewshot"]
            tasks.append({
                "label": t["label"],
                "dataset_uri": t["dataset_uri"],
                "num_fewshot": int(k[0] if isinstance(k, list) else k),
                "task_type": t["icl_task_type"],
                "continuation_delimiter": t.get("continuation_delimiter", " "),
            })
    return tasks


def random_baselines(csv_path: str | os.PathLike) -> dict[str, float]:
    """`Eval Task` -> `Random baseline` (percent) from eval_meta_data.csv."""
    with _damage_is_named(csv_path), open(csv_path, newline="", encoding="utf-8") as f:
        return {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}


def load_task_data(bundle_dir: str | os.PathLike, dataset_uri: str, max_per_task: int = -1) -> list[dict]:
    """The jsonl rows, shuffled with random.Random(1337), cropped to max_per_task when > 0."""
    path = Path(bundle_dir) / "eval_data" / dataset_uri
    with _damage_is_named(path), open(path, encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    random.Random(1337).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


def crop_length(config) -> int | None:
    """evaluate_core's max_seq_len from `config.eval.core_crop`: None (score whole, the reference's way for its own
    models) unless it is > 0."""
    crop = config.eval.get("core_crop", 0)
    return crop if crop > 0 else None


def centered(acc: float, baseline_pct: float) -> float:
    b = 0.01 * baseline_pct
    return (acc - b) / (1.0 - b)


def evaluate_task(stats_fn: StatsFn, tokenizer, data: Sequence[dict], task: dict, max_seq_len: int | None = None,
                  batch_rows: int = 32, process_index: int = 0, process_count: int = 1,
                  row_tokens: int | None = None) -> tuple[int, int]:
    """(correct, examples) over this process's share of `data` (every process_count-th example). `max_seq_len`: crop
    longer rows from the left (None: whole); `row_tokens`: see run_rows."""
    mine = range(process_index, len(data), process_count)
    prepared = [prepare_example(tokenizer, data[i], task, sample_fewshot(data, i, task["num_fewshot"]), max_seq_len)
                for i in mine]
    rows = [r for p in prepared for r in p.rows]
    nll, match = run_rows(stats_fn, rows, tokenizer.bos_id, max_seq_len, batch_rows, row_tokens)
    correct, k = 0, 0
    for p in prepared:
        n = len(p.rows)
        correct += score_prepared(p, nll[k:k + n], match[k:k + n])
        k += n
    return correct, len(prepared)


def evaluate_core(
    stats_fn: StatsFn,
    tokenizer,
    bundle_dir: str | os.PathLike | None = None,
    max_per_task: int = -1,
    max_seq_len: int | None = None,
    log: Callable[[str], None] | None = print,
    batch_rows: int = 32,
    row_tokens: int | None = None,
) -> dict:
    """-> {"results": {label: acc}, "centered": {label: centered acc}, "core": mean centered}. Examples are strided
    across processes and the counts summed, so every host scores a disjoint share. `max_seq_len`: crop prompts longer
    than it from the left (None: score them whole, the reference's way for its own models); `row_tokens`: the model's
    sequence length, which bounds the tokens per batch (run_rows)."""
    import jax

    from jaxchat.sharding import sum_over_processes

    bundle_dir = Path(bundle_dir or eval_bundle_dir())
    verify_bundle(bundle_dir)
    baselines = random_baselines(bundle_dir / "eval_meta_data.csv")
    results, centered_results = {}, {}
    for task in load_bundle(bundle_dir):
        label = task["label"]
        if label not in baselines:
            raise KeyError(f"no random baseline for task {label!r} in eval_meta_data.csv")
        data = load_task_data(bundle_dir, task["dataset_uri"], max_per_task)
        t0 = time.perf_counter()
        correct, total = evaluate_task(stats_fn, tokenizer, data, task, max_seq_len, batch_rows,
                                       jax.process_index(), jax.process_count(), row_tokens)
        correct, total = sum_over_processes([correct, total])
        acc = correct / total if total else 0.0
        results[label] = acc
        centered_results[label] = centered(acc, baselines[label])
        if log:
            log(f"{label:<35} acc {acc:.4f}  centered {centered_results[label]:.4f}  ({total} examples, "
                f"{time.perf_counter() - t0:.1f}s)")
    core = float(np.mean(list(centered_results.values()))) if centered_results else 0.0
    return {"results": results, "centered": centered_results, "core": core}


def write_results_csv(out: dict, path: str | os.PathLike) -> Path:
    """nanochat's base_eval CSV: Task, Accuracy, Centered per row, then a CORE row."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(f"{'Task':<35}, {'Accuracy':<10}, {'Centered':<10}\n")
        for label, acc in out["results"].items():
            f.write(f"{label:<35}, {acc:<10.6f}, {out['centered'][label]:<10.6f}\n")
        f.write(f"{'CORE':<35}, {'':<10}, {out['core']:<10.6f}\n")
    os.replace(tmp, path)
    return path


def _verify_zip(path: Path) -> None:
    with zipfile.ZipFile(path) as zf:
        bad = zf.testzip()
    if bad is not None:
        raise zipfile.BadZipFile(f"corrupt member {bad!r} in {path}")


def download_bundle(url: str = BUNDLE_URL, dest: str | os.PathLike | None = None, **fetch_kwargs) -> Path:
    """Fetch the zip and extract it to `dest` atomically (tmp dir, then rename). No-op if dest holds an intact bundle
    (core.yaml present, checksums match); a damaged one is replaced.
    The zip may hold the files at its root or under one top-level folder (the real one has `eval_bundle/`)."""
    from jaxchat.data.fetch import fetch

    dest = Path(dest or eval_bundle_dir())
    if (dest / "core.yaml").exists():
        try:
            verify_bundle(dest)
            return dest
        except DamagedFileError as e:  # fetched again below, replacing the damaged copy
            print(f"{e.path} is damaged ({e.problem}); downloading the bundle again", flush=True)
    dest.parent.mkdir(parents=True, exist_ok=True)
    zip_path = dest.parent / (dest.name + ".zip")
    fetch(url, zip_path, verify=_verify_zip, **fetch_kwargs)
    tmp = Path(tempfile.mkdtemp(prefix=dest.name + ".", dir=dest.parent))
    try:
        with zipfile.ZipFile(zip_path) as zf:
            for name in zf.namelist():  # refuse paths escaping the tmp dir
                if name.startswith("/") or ".." in Path(name).parts:
                    raise ValueError(f"unsafe path in bundle zip: {name!r}")
            zf.extractall(tmp)
        root = tmp
        if not (root / "core.yaml").exists():
            found = [p.parent for p in tmp.glob("*/core.yaml")]
            if len(found) != 1:
                raise FileNotFoundError(f"core.yaml not found in {url}")
            root = found[0]
        write_tree_digest(root)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(root, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    zip_path.unlink(missing_ok=True)
    return dest


TREE_DIGEST = "jaxchat_tree.json"


def _tree_files(root: Path) -> dict[str, str]:
    import hashlib

    out = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != TREE_DIGEST):
        out[path.relative_to(root).as_posix()] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def write_tree_digest(root: Path) -> None:
    """Record the sha256 of every unpacked file, so later damage (a truncated copy, an edited file) is detected."""
    (Path(root) / TREE_DIGEST).write_text(json.dumps(_tree_files(Path(root)), indent=0) + "\n")


def verify_bundle(bundle_dir: str | os.PathLike) -> None:
    """Compare the bundle with the digest written when it was unpacked; DamagedFileError naming what differs. A bundle
    placed by hand (no digest) is accepted as is (its files are still checked as they are parsed)."""
    root = Path(bundle_dir)
    digest_path = root / TREE_DIGEST
    if not digest_path.exists():
        return
    with _damage_is_named(digest_path):
        expected = json.loads(digest_path.read_text())
    actual = _tree_files(root)
    missing = sorted(set(expected) - set(actual))
    changed = sorted(k for k in expected if k in actual and actual[k] != expected[k])
    if missing or changed:
        first = (changed or missing)[0]
        raise DamagedFileError(root / first, f"the CORE bundle does not match the checksums written when it was "
                               f"unpacked (missing: {missing[:5]}, changed: {changed[:5]})", FETCH_COMMAND)


@contextlib.contextmanager
def _damage_is_named(path):
    """A bundle file that is missing or does not parse is a DamagedFileError naming it and the command to refetch."""
    import yaml

    try:
        yield
    except FileNotFoundError as e:
        if isinstance(e, DamagedFileError):
            raise
        raise DamagedFileError(path, "it is missing from the bundle", FETCH_COMMAND) from None
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, yaml.YAMLError) as e:
        raise DamagedFileError(path, f"it does not parse ({type(e).__name__}: {e})", FETCH_COMMAND) from None


def main(argv: list[str] | None = None) -> int:
    """`python -m jaxchat.evaluate.core [--url URL]`: download the bundle, or replace a damaged one."""
    import argparse
    import sys

    from jaxchat.data.fetch import FetchError

    ap = argparse.ArgumentParser(prog=FETCH_COMMAND, description=f"Download the CORE eval bundle to "
                                 f"{eval_bundle_dir()} (again, if the copy there is damaged).")
    ap.add_argument("--url", default=BUNDLE_URL)
    args = ap.parse_args(argv)
    try:
        dest = download_bundle(args.url)
    except (FetchError, OSError, zipfile.BadZipFile, ValueError) as e:
        print(f"error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 1
    print(f"{len(load_bundle(dest))} CORE tasks in {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
