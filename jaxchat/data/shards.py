"""Finding and reading pretraining shards: which files are train, which is val, and their text.

Shards are parquet files with one `text` column, read a row group at a time (1024 docs in FineWeb
shards) so memory stays bounded whatever the shard size. The validation shard is the dataset's
pinned `val_index` (see datasets.py); every other `shard_*.parquet` on disk is training data.
"""
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow.parquet as pq

from jaxchat import paths
from jaxchat.data.datasets import get_dataset, shard_name

_SHARD_RE = re.compile(r"shard_(\d{5})\.parquet")


def fetch_command(dataset: str) -> str:
    """The command that puts `dataset`'s shards on disk."""
    if get_dataset(dataset).base_url is None:
        return "python -m jaxchat.data.tiny_corpus"
    return f"python -m jaxchat.data.download -n 8 --dataset {dataset}"


def list_shards(dataset: str) -> tuple[list[Path], Path]:
    """(train shard paths sorted by index, the pinned val shard path); raises if either is missing."""
    ds = get_dataset(dataset)
    directory = paths.data_dir(dataset)
    found = {}
    if directory.is_dir():
        for p in directory.iterdir():
            m = _SHARD_RE.fullmatch(p.name)
            if m:
                found[int(m.group(1))] = p
    if not found:
        raise FileNotFoundError(f"no shards for dataset {dataset!r} in {directory}; run `{fetch_command(dataset)}`")
    val_path = directory / shard_name(ds.val_index)
    if ds.val_index not in found:
        raise FileNotFoundError(
            f"validation shard {val_path} is missing (dataset {dataset!r} pins shard {ds.val_index} as "
            f"validation); run `{fetch_command(dataset)}`, which fetches it along with the training shards")
    train = [found[i] for i in sorted(found) if i != ds.val_index]
    if not train:
        raise FileNotFoundError(f"only the validation shard of {dataset!r} is in {directory}; "
                                f"run `{fetch_command(dataset)}` for training shards")
    return train, val_path


def num_row_groups(path: Path | str) -> int:
    return pq.ParquetFile(path).metadata.num_row_groups


def read_row_group(path: Path | str, index: int) -> list[str]:
    """The docs of one row group, as Python strings."""
    return pq.ParquetFile(path).read_row_group(index, columns=["text"]).column("text").to_pylist()


def iter_texts(paths_: Iterable[Path | str], max_chars: int | None = None, doc_cap: int = 10_000) -> Iterator[str]:
    """Docs from `paths_` in order, each cropped to `doc_cap` chars, until `max_chars` have been yielded.

    This feeds tokenizer training (the reference crops docs at 10,000 chars and stops after
    `--max-chars`); the doc that crosses `max_chars` is still yielded whole, as the reference does.
    """
    seen = 0
    for path in paths_:
        f = pq.ParquetFile(path)
        for rg in range(f.metadata.num_row_groups):
            for doc in f.read_row_group(rg, columns=["text"]).column("text").to_pylist():
                doc = doc[:doc_cap]
                yield doc
                seen += len(doc)
                if max_chars is not None and seen >= max_chars:
                    return
