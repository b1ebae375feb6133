"""Finding and reading pretraining shards: which files are train, which is val, and their text.

Shards are parquet files with one `text` column, read a row group at a time (1024 docs in FineWeb
shards) so memory stays bounded whatever the shard size. The validation shard is the dataset's
pinned `val_index` (see datasets.py); every other `shard_*.parquet` on disk is training data.

Every read goes through `open_shard`, which parses the footer and checks the `text` column: a truncated or corrupt
shard is a DamagedFileError naming the file, what is wrong and the command that fetches it again (the downloader
replaces damaged files it finds), never a bare pyarrow error from deep inside the data pipeline.
"""
import re
from collections.abc import Iterable, Iterator
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jaxchat import paths
from jaxchat.data.datasets import DATASETS, get_dataset, shard_name
from jaxchat.data.fetch import DamagedFileError

# What pyarrow raises on a damaged file: ArrowInvalid ("Parquet magic bytes not found in footer", a bad thrift
# header), ArrowException's IO/decompression errors, OSError.
_READ_ERRORS = (pa.ArrowException, OSError)

_SHARD_RE = re.compile(r"shard_(\d{5})\.parquet")


def fetch_command(dataset: str) -> str:
    """The command that puts `dataset`'s shards on disk."""
    if get_dataset(dataset).base_url is None:
        return "python -m jaxchat.data.tiny_corpus"
    return f"python -m jaxchat.data.download -n 8 --dataset {dataset}"


def refetch_command(path: Path | str) -> str:
    """The command that puts this one shard back: for train shard i of a downloaded dataset `-n i+1` (shards already
    there and intact are skipped), for the validation shard `-n 0` (it is always fetched)."""
    p = Path(path)
    m, ds = _SHARD_RE.fullmatch(p.name), DATASETS.get(p.parent.name)
    if ds is None or m is None:
        return "python -m jaxchat.data.download -n N --dataset DATASET (python -m jaxchat.data.tiny_corpus for tiny)"
    if ds.base_url is None:
        return fetch_command(ds.name)
    index = int(m.group(1))
    n = 0 if index == ds.val_index else index + 1
    return f"python -m jaxchat.data.download -n {n} --dataset {ds.name}"


def _damaged(path: Path | str, e: Exception) -> DamagedFileError:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    return DamagedFileError(path, f"not a readable parquet shard ({type(e).__name__}: {first})", refetch_command(path))


def open_shard(path: Path | str) -> pq.ParquetFile:
    """The shard's ParquetFile, its footer parsed and its `text` column checked; DamagedFileError if either fails."""
    try:
        f = pq.ParquetFile(path)
        names = f.schema_arrow.names
    except FileNotFoundError:
        raise
    except _READ_ERRORS as e:
        raise _damaged(path, e) from None
    if "text" not in names:
        raise DamagedFileError(path, f"it has no 'text' column (columns: {names})", refetch_command(path))
    return f


def _read_text(f: pq.ParquetFile, path: Path | str, index: int) -> list[str]:
    try:
        return f.read_row_group(index, columns=["text"]).column("text").to_pylist()
    except _READ_ERRORS as e:  # a footer that parses over pages that do not (bytes damaged in the middle)
        raise _damaged(path, e) from None


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
    return open_shard(path).metadata.num_row_groups


def num_docs(path: Path | str) -> int:
    """Documents in a shard, from its parquet metadata (no text is read)."""
    return open_shard(path).metadata.num_rows


def read_row_group(path: Path | str, index: int) -> list[str]:
    """The docs of one row group, as Python strings."""
    return _read_text(open_shard(path), path, index)


def iter_texts(paths_: Iterable[Path | str], max_chars: int | None = None, doc_cap: int = 10_000) -> Iterator[str]:
    """Docs from `paths_` in order, each cropped to `doc_cap` chars, until `max_chars` have been yielded.

    This feeds tokenizer training (the reference crops docs at 10,000 chars and stops after
    `--max-chars`); the doc that crosses `max_chars` is still yielded whole, as the reference does.
    """
    seen = 0
    for path in paths_:
        f = open_shard(path)
        for rg in range(f.metadata.num_row_groups):
            for doc in _read_text(f, path, rg):
                doc = doc[:doc_cap]
                yield doc
                seen += len(doc)
                if max_chars is not None and seen >= max_chars:
                    return
