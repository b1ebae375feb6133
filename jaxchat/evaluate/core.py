"""The DCLM CORE metric (nanochat `core_eval.py` + `base_eval.py`), framework-agnostic.

Bundle layout (`eval_bundle_dir()`):
    core.yaml            icl_tasks: [{label, dataset_uri, num_fewshot: [K], icl_task_type, continuation_delimiter?}]
    eval_data/<category>/<file>.jsonl
    eval_meta_data.csv   columns include `Eval Task` and `Random baseline` (percent)

Scoring needs only `logits_fn(tokens_BxT: int32 np.ndarray) -> np.ndarray (B, T, V)`, so any model (or a fake
one in tests) plugs in; `model_logits_fn(graphdef, params)` wraps `jaxchat.model.forward` under jit.
Prompts of one example form one batch, right-padded with BOS; T is bucketed to a power of two (>= 16) and B to a
power of two, so only a handful of shapes ever compile.
"""
from __future__ import annotations

import csv
import json
import os
import random
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from jaxchat.paths import eval_bundle_dir

BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
TASK_TYPES = ("multiple_choice", "schema", "language_modeling")

LogitsFn = Callable[[np.ndarray], np.ndarray]


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
def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << max(0, n - 1).bit_length())


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


def score_example(
    logits_fn: LogitsFn,
    tokenizer,
    item: dict,
    meta: dict,
    fewshot: Sequence[dict] = (),
    max_seq_len: int | None = None,
) -> bool:
    """One example -> correct? `meta`: {"task_type", "continuation_delimiter"}."""
    task_type = meta["task_type"]
    prompts = render_prompts(item, task_type, meta.get("continuation_delimiter", " "), fewshot)
    bos = tokenizer.bos_id
    tokens = [tokenizer.encode(p, prepend=bos) for p in prompts]
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
    longest = max(len(t) for t in tokens)
    T = _bucket(longest, 16)
    if max_seq_len is not None:
        T = min(T, max_seq_len)
    B = _bucket(len(tokens), 1)
    batch = np.full((B, T), bos, dtype=np.int32)
    for i, t in enumerate(tokens):
        batch[i, : len(t)] = t
    logits = np.asarray(logits_fn(batch))[: len(tokens)]

    if task_type == "language_modeling":
        (s, e), = sp
        predicted = logits[0, s - 1 : e - 1].argmax(axis=-1)
        return bool(np.array_equal(predicted, batch[0, s:e]))
    mean_losses = []
    for i, (s, e) in enumerate(sp):
        logp = _log_softmax(logits[i, s - 1 : e - 1])
        targets = batch[i, s:e]
        mean_losses.append(float(-logp[np.arange(len(targets)), targets].mean()))
    return int(np.argmin(mean_losses)) == int(item["gold"])


def model_logits_fn(graphdef, params) -> LogitsFn:
    """Wrap jaxchat.model.forward as a LogitsFn (one jit; shapes are bucketed by score_example)."""
    import jax

    from jaxchat import model

    fwd = jax.jit(lambda p, x: model.forward(graphdef, p, x))
    return lambda tokens: np.asarray(jax.device_get(fwd(params, tokens)))


# -- bundle ----------------------------------------------------------------------------------------
def load_bundle(bundle_dir: str | os.PathLike | None = None) -> list[dict]:
    """core.yaml's icl_tasks as dicts: label, dataset_uri, num_fewshot (int: the first entry), task_type,
    continuation_delimiter (default " ")."""
    import yaml

    bundle_dir = Path(bundle_dir or eval_bundle_dir())
    with open(bundle_dir / "core.yaml", encoding="utf-8") as f:
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
    with open(csv_path, newline="", encoding="utf-8") as f:
        return {row["Eval Task"]: float(row["Random baseline"]) for row in csv.DictReader(f)}


def load_task_data(bundle_dir: str | os.PathLike, dataset_uri: str, max_per_task: int = -1) -> list[dict]:
    """The jsonl rows, shuffled with random.Random(1337), cropped to max_per_task when > 0."""
    with open(Path(bundle_dir) / "eval_data" / dataset_uri, encoding="utf-8") as f:
        data = [json.loads(line) for line in f if line.strip()]
    random.Random(1337).shuffle(data)
    return data[:max_per_task] if max_per_task > 0 else data


def centered(acc: float, baseline_pct: float) -> float:
    b = 0.01 * baseline_pct
    return (acc - b) / (1.0 - b)


def evaluate_task(logits_fn: LogitsFn, tokenizer, data: Sequence[dict], task: dict, max_seq_len: int | None = None) -> float:
    correct = [
        score_example(logits_fn, tokenizer, item, task, sample_fewshot(data, idx, task["num_fewshot"]), max_seq_len)
        for idx, item in enumerate(data)
    ]
    return float(np.mean(correct)) if correct else 0.0


def evaluate_core(
    logits_fn: LogitsFn,
    tokenizer,
    bundle_dir: str | os.PathLike | None = None,
    max_per_task: int = -1,
    max_seq_len: int | None = None,
    log: Callable[[str], None] | None = print,
) -> dict:
    """-> {"results": {label: acc}, "centered": {label: centered acc}, "core": mean centered}."""
    bundle_dir = Path(bundle_dir or eval_bundle_dir())
    baselines = random_baselines(bundle_dir / "eval_meta_data.csv")
    results, centered_results = {}, {}
    for task in load_bundle(bundle_dir):
        label = task["label"]
        data = load_task_data(bundle_dir, task["dataset_uri"], max_per_task)
        acc = evaluate_task(logits_fn, tokenizer, data, task, max_seq_len)
        if label not in baselines:
            raise KeyError(f"no random baseline for task {label!r} in eval_meta_data.csv")
        results[label] = acc
        centered_results[label] = centered(acc, baselines[label])
        if log:
            log(f"{label:<35} acc {acc:.4f}  centered {centered_results[label]:.4f}  ({len(data)} examples)")
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
    """Fetch the zip and extract it to `dest` atomically (tmp dir, then rename). No-op if dest/core.yaml exists.
    The zip may hold the files at its root or under one top-level folder (the real one has `eval_bundle/`)."""
    from jaxchat.data.fetch import fetch

    dest = Path(dest or eval_bundle_dir())
    if (dest / "core.yaml").exists():
        return dest
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
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(root, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    zip_path.unlink(missing_ok=True)
    return dest
