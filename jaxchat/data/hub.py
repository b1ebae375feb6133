"""Task datasets from the Hugging Face hub, downloaded once as parquet and read with pyarrow.

    python -m jaxchat.data.hub fetch allenai/ai2_arc ARC-Easy test
    python -m jaxchat.data.hub fetch-all        # every dataset jaxchat's tasks use (TASK_DATASETS) + the word list
    python -m jaxchat.data.hub list             # those datasets and whether each is cached

As the reference does (no `datasets` dependency): `GET {endpoint}/api/datasets/{repo}/parquet/
{subset}/{split}` lists the split's parquet files; each is fetched and checked to be parquet into
`$JAXCHAT_HOME/tasks/<repo--id>/<subset>/<split>/`, and `manifest.json` is written last. A
directory without a manifest is an interrupted download and is fetched again from scratch.

A cached split loads with no network at all. `JAXCHAT_OFFLINE=1` (or `HF_HUB_OFFLINE=1`) forbids
downloads; a split missing from the cache then fails at once, naming the command that fetches it.
Cached files are checked when opened (size against the manifest, parquet footer): a damaged one is a
DamagedFileError naming it and the fetch command, and that command re-fetches just the damaged files.
`JAXCHAT_HUB_ENDPOINT` replaces https://huggingface.co (mirrors, tests).
"""
import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import json
import os
import shutil
import sys
import urllib.parse
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from jaxchat import paths
from jaxchat.data.fetch import DamagedFileError, FetchError, fetch

DEFAULT_ENDPOINT = "https://huggingface.co"
MANIFEST = "manifest.json"
LISTING = "listing.json"


@dataclasses.dataclass(frozen=True)
class HubSplit:
    repo_id: str
    subset: str
    split: str
    used_by: str


# Names checked against the reference (nanochat-reference.md §6.4).
TASK_DATASETS = (
    HubSplit("allenai/ai2_arc", "ARC-Easy", "train", "ARC: SFT mixture"),
    HubSplit("allenai/ai2_arc", "ARC-Easy", "test", "ARC: chat eval"),
    HubSplit("allenai/ai2_arc", "ARC-Challenge", "train", "ARC: SFT mixture"),
    HubSplit("allenai/ai2_arc", "ARC-Challenge", "test", "ARC: chat eval"),
    HubSplit("cais/mmlu", "all", "test", "MMLU: chat eval (val = test[:5200])"),
    # The reference's V0 read subset `auxiliary_train`, split `train`, whose rows arrive wrapped in
    # a single `train` struct column; HEAD reads subset `all`, split `auxiliary_train`, with flat
    # rows (question, subject, choices, answer). We follow HEAD.
    HubSplit("cais/mmlu", "all", "auxiliary_train", "MMLU: mid-training / SFT"),
    HubSplit("openai/gsm8k", "main", "train", "GSM8K: mid/SFT/RL"),
    HubSplit("openai/gsm8k", "main", "test", "GSM8K: chat eval, RL eval"),
    HubSplit("openai/openai_humaneval", "openai_humaneval", "test", "HumanEval: chat eval"),
    HubSplit("HuggingFaceTB/smol-smoltalk", "default", "train", "SmolTalk: mid/SFT"),
    HubSplit("HuggingFaceTB/smol-smoltalk", "default", "test", "SmolTalk: validation"),
)


class HubDatasetUnavailable(RuntimeError):
    """A task dataset is not cached and could not be downloaded."""


def hub_endpoint() -> str:
    return (os.environ.get("JAXCHAT_HUB_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("JAXCHAT_OFFLINE", "HF_HUB_OFFLINE"))


def dataset_dir(repo_id: str, subset: str, split: str) -> Path:
    return paths.tasks_dir() / repo_id.replace("/", "--") / subset / split


def listing_url(repo_id: str, subset: str, split: str) -> str:
    q = urllib.parse.quote
    return f"{hub_endpoint()}/api/datasets/{repo_id}/parquet/{q(subset, safe='')}/{q(split, safe='')}"


def fetch_command(repo_id: str, subset: str, split: str) -> str:
    return f"python -m jaxchat.data.hub fetch {repo_id} {subset} {split}"


def shuffled_indices(n: int, seed: int = 42) -> np.ndarray:
    """Row order of HF `datasets`' `.shuffle(seed)` on an n-row split (the reference relies on it)."""
    return np.random.default_rng(seed).permutation(n)


def read_manifest(directory: Path) -> dict | None:
    """The manifest of a complete download, or None (absent, unreadable, or a listed file is gone)."""
    try:
        manifest = json.loads((directory / MANIFEST).read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return manifest if all((directory / f).is_file() for f in files) else None


def verify_parquet(path: Path) -> None:
    pq.ParquetFile(path)  # parses the footer: raises on truncated or corrupt files


def damaged_files(directory: Path, manifest: dict) -> dict[str, str]:
    """{file: what is wrong} for the manifest's files that are not intact: size differs from the one recorded at
    download (manifests written since sizes were recorded) or the parquet footer does not parse. Cheap: no data read."""
    sizes = manifest.get("file_bytes") or [None] * len(manifest["files"])
    bad = {}
    for name, size in zip(manifest["files"], sizes):
        path = directory / name
        try:
            have = path.stat().st_size
            if size is not None and have != size:
                bad[name] = f"{have:,} bytes where {size:,} were downloaded (truncated or overwritten)"
                continue
            verify_parquet(path)
        except (OSError, pa.ArrowException) as e:
            bad[name] = f"not a readable parquet file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    return bad


def verify_listing(path: Path) -> None:
    urls = json.loads(path.read_text())
    if not isinstance(urls, list) or not urls or not all(isinstance(u, str) for u in urls):
        raise ValueError(f"expected a non-empty JSON list of parquet URLs, got {str(urls)[:200]}")


@contextlib.contextmanager
def _locked(directory: Path):
    """Serialise downloads of one split across processes (e.g. ranks sharing a home dir)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    with open(directory.parent / f".{directory.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def fetch_hub_dataset(repo_id: str, subset: str, split: str, *, retries: int = 5, backoff: float = 1.0,
                      timeout: float = 30) -> Path:
    """Download one split into its cache directory unless it is complete already; returns the directory.

    Raises FetchError when the listing or a file cannot be downloaded.
    """
    d = dataset_dir(repo_id, subset, split)
    kw = dict(retries=retries, backoff=backoff, timeout=timeout)
    with _locked(d):
        manifest = read_manifest(d)
        if manifest is not None:
            try:
                for name in damaged_files(d, manifest):  # replace what was damaged since, from where it came from
                    (d / name).unlink()
                    fetch(manifest["urls"][manifest["files"].index(name)], d / name, verify=verify_parquet, **kw)
            except FetchError:
                pass  # that URL is gone: the split is fetched afresh below
            if not damaged_files(d, manifest):  # else e.g. the hub's file changed since: start the split afresh
                return d
        shutil.rmtree(d, ignore_errors=True)  # leftovers of an interrupted download may be stale
        d.mkdir(parents=True)
        source = listing_url(repo_id, subset, split)
        listing = fetch(source, d / LISTING, verify=verify_listing, **kw)
        urls = [urllib.parse.urljoin(source, u) for u in json.loads(listing.read_text())]
        files = [f"{i:05d}.parquet" for i in range(len(urls))]  # listing order is row order
        for url, name in zip(urls, files):
            fetch(url, d / name, verify=verify_parquet, **kw)
        manifest = {
            "repo_id": repo_id, "subset": subset, "split": split,
            "files": files, "urls": urls, "listing_url": source,
            "num_rows": sum(pq.ParquetFile(d / f).metadata.num_rows for f in files),
            "num_bytes": sum((d / f).stat().st_size for f in files),
            "file_bytes": [(d / f).stat().st_size for f in files],
            "fetched_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        tmp = d / (MANIFEST + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=1) + "\n")
        os.replace(tmp, d / MANIFEST)  # last, and atomic: its presence means complete
        (d / LISTING).unlink()
    return d


def load_hub_dataset(repo_id: str, subset: str, split: str, *, retries: int = 5, backoff: float = 1.0,
                     timeout: float = 30) -> pa.Table:
    """The whole split as one pyarrow Table, downloading it first if it is not cached."""
    d = dataset_dir(repo_id, subset, split)
    manifest = read_manifest(d)
    if manifest is None:
        if offline():
            raise HubDatasetUnavailable(_unavailable(repo_id, subset, split, "offline mode is on (JAXCHAT_OFFLINE / HF_HUB_OFFLINE)"))
        try:
            fetch_hub_dataset(repo_id, subset, split, retries=retries, backoff=backoff, timeout=timeout)
        except FetchError as e:
            raise HubDatasetUnavailable(_unavailable(repo_id, subset, split, _why(e))) from None
        manifest = read_manifest(d)
    command = fetch_command(repo_id, subset, split)
    for name, problem in damaged_files(d, manifest).items():
        raise DamagedFileError(d / name, problem, command)
    tables = []
    for name in manifest["files"]:
        try:
            tables.append(pq.read_table(d / name))
        except (OSError, pa.ArrowException) as e:  # pages damaged under an intact footer
            raise DamagedFileError(d / name, f"unreadable ({type(e).__name__}: {e})", command) from None
    table = pa.concat_tables(tables)
    if table.num_rows != manifest["num_rows"]:
        raise DamagedFileError(d / MANIFEST, f"the files hold {table.num_rows} rows but it says "
                               f"{manifest['num_rows']}", command)
    return table


def _why(e: FetchError) -> str:
    if e.status == 404:
        return f"the hub has no such file (HTTP 404 for {e.url}); check the repo, subset and split names"
    return str(e).splitlines()[0]


def _unavailable(repo_id: str, subset: str, split: str, why: str) -> str:
    return (
        f"task dataset {repo_id} [{subset}/{split}] is not cached in {dataset_dir(repo_id, subset, split)} "
        f"and could not be downloaded: {why}.\n"
        f"Fetch it where the hub ({hub_endpoint()}) is reachable: `{fetch_command(repo_id, subset, split)}` "
        f"(or `python -m jaxchat.data.hub fetch-all`), with the same $JAXCHAT_HOME or a copy of its tasks/ folder."
    )


def main(argv: list[str] | None = None) -> int:
    from jaxchat.tasks import words

    parser = argparse.ArgumentParser(prog="python -m jaxchat.data.hub", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    one = sub.add_parser("fetch", help="download one split")
    one.add_argument("repo_id")
    one.add_argument("subset")
    one.add_argument("split")
    sub.add_parser("fetch-all", help="download every split in TASK_DATASETS and the spelling tasks' word list")
    sub.add_parser("list", help="show TASK_DATASETS and what is cached")
    for p in (one, sub.choices["fetch-all"]):
        p.add_argument("--retries", type=int, default=5)
        p.add_argument("--backoff", type=float, default=1.0)
        p.add_argument("--timeout", type=float, default=30.0)
    args = parser.parse_args(argv)

    if args.command == "list":
        for s in TASK_DATASETS:
            m = read_manifest(dataset_dir(s.repo_id, s.subset, s.split))
            state = f"{m['num_rows']:>9,} rows" if m else "  not cached"
            print(f"{state}  {s.repo_id} {s.subset} {s.split}  ({s.used_by})")
        state = "       cached" if words.words_path().exists() else "  not cached"
        print(f"{state}  {words.WORDS_FILENAME}  (SpellingBee, SimpleSpelling: `{words.FETCH_COMMAND}`)")
        return 0
    todo = TASK_DATASETS if args.command == "fetch-all" else (HubSplit(args.repo_id, args.subset, args.split, ""),)
    failed = []
    for s in todo:
        try:
            d = fetch_hub_dataset(s.repo_id, s.subset, s.split, retries=args.retries, backoff=args.backoff,
                                  timeout=args.timeout)
        except FetchError as e:
            failed.append(f"{s.repo_id} {s.subset} {s.split}: {_why(e)}")
            continue
        print(f"{read_manifest(d)['num_rows']:>9,} rows  {s.repo_id} {s.subset} {s.split} -> {d}")
    if args.command == "fetch-all":
        try:
            path = words.fetch_words(retries=args.retries, backoff=args.backoff, timeout=args.timeout)
            print(f"{len(words.read_words(path)):>9,} words {words.WORDS_FILENAME} -> {path}")
        except FetchError as e:
            failed.append(f"{words.WORDS_FILENAME}: {_why(e)}")
    for line in failed:
        print(f"error: {line}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
