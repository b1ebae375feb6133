"""The pretraining data pipeline: parquet row groups -> BOS-aligned best-fit packed (B, T) batches.

A grain chain:

    MapDataset.source(row groups of this process)   row group r of the global list -> process r % count
      .map(read_row_group)                          pyarrow, docs as strings
    BestFitBatches (an IterDataset)                 tokenize 128 docs at a time with BOS prepended,
                                                    best-fit pack rows of T+1 tokens, stack B rows

Packing follows the reference's HEAD loader (nanochat-reference.md §4.3): keep >= `buffer_docs`
tokenized docs; fill each row by repeatedly taking the largest doc that fits entirely; when none
fits, take the shortest doc and crop it to fill the row exactly (its tail is dropped). So there is no
padding, and every row starts with BOS and a document's beginning. Ties go to the oldest doc, like the
reference's first-in-buffer scan. The fraction of tokens cropped away is counted (`stats()`).

Exact resume. The state is taken between batches, where no row is half built, so the position is:
  * the stream index of the row group being tokenized and the next doc in it (epoch = index // n + 1),
  * the docs waiting in the buffer, as (row-group stream index, doc index) references, not tokens,
  * the counters.
That is small JSON (a few thousand ints at most) and restoring it re-reads only the row groups the
buffer refers to and re-tokenizes only the referenced docs. Docs longer than a row can wait in the
buffer for a long time, so the references may span many row groups: restore cost is bounded by the
buffer size (≤ `buffer_docs` row-group reads), never by how far training has run.

`val_batches` builds the same chain over the validation shard for a single pass (no epochs); the last
partial batch is dropped so every batch has the same static shape.
"""
import bisect
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from jaxchat.data.shards import num_row_groups, read_row_group

STATE_VERSION = 1


def row_group_refs(paths: Sequence[Path | str]) -> list[tuple[str, int]]:
    """(path, row group index) for every row group of every shard, in shard order."""
    return [(str(p), i) for p in paths for i in range(num_row_groups(p))]


def _read(ref: tuple[str, int]) -> list[str]:
    return read_row_group(*ref)


def process_row_groups(paths: Sequence[Path | str], process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """This process's row groups (global row group r goes to process r % process_count), read on access."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    refs = row_group_refs(paths)
    mine = refs[process_index::process_count]
    if not mine:
        raise ValueError(f"process {process_index} of {process_count} gets no row groups: the {len(paths)} shard(s) "
                         f"hold only {len(refs)}; download more shards or run fewer processes")
    return grain.MapDataset.source(mine).map(_read)


class _DocBuffer:
    """Tokenized docs waiting to be packed, kept sorted by length so best-fit lookups are a bisect.

    Keys are (length, -row_group, -doc): among docs of equal length the oldest sorts last, so the
    last key at or below a length is the oldest of the longest docs that fit.
    """

    def __init__(self):
        self._keys: list[tuple[int, int, int]] = []
        self._docs: dict[tuple[int, int], list[int]] = {}

    def __len__(self) -> int:
        return len(self._keys)

    def add(self, ref: tuple[int, int], tokens: list[int]) -> None:
        bisect.insort(self._keys, (len(tokens), -ref[0], -ref[1]))
        self._docs[ref] = tokens

    def _pop(self, i: int) -> list[int]:
        _, neg_rg, neg_doc = self._keys.pop(i)
        return self._docs.pop((-neg_rg, -neg_doc))

    def pop_largest_fitting(self, space: int) -> list[int] | None:
        i = bisect.bisect_right(self._keys, (space, math.inf))
        return self._pop(i - 1) if i else None

    def pop_shortest(self) -> list[int]:
        return self._pop(bisect.bisect_right(self._keys, (self._keys[0][0], math.inf)) - 1)

    def refs_by_row_group(self) -> list[list]:
        """[[row_group, [doc, ...]], ...] sorted: the compact, JSON-ready form of the buffer."""
        grouped: dict[int, list[int]] = {}
        for rg, doc in sorted(self._docs):
            grouped.setdefault(rg, []).append(doc)
        return [[rg, docs] for rg, docs in grouped.items()]


class BestFitBatches(grain.IterDataset):
    """Packed `{"inputs", "targets"}` int32 (B, T) batches from a MapDataset of row groups (lists of docs)."""

    def __init__(self, row_groups: grain.MapDataset, tokenizer, batch_size: int, seq_len: int,
                 buffer_docs: int = 1000, tokenizer_batch: int = 128, num_epochs: int | None = None):
        super().__init__(row_groups)
        if len(row_groups) == 0:
            raise ValueError("no row groups to read")
        self.row_groups = row_groups
        self.tokenizer = tokenizer
        self.batch_size, self.seq_len = batch_size, seq_len
        self.buffer_docs, self.tokenizer_batch, self.num_epochs = buffer_docs, tokenizer_batch, num_epochs

    def config(self) -> dict[str, int]:
        """The settings a saved state is only valid for."""
        return {"batch_size": self.batch_size, "seq_len": self.seq_len, "buffer_docs": self.buffer_docs,
                "tokenizer_batch": self.tokenizer_batch, "row_groups": len(self.row_groups)}

    def __iter__(self) -> "BestFitIterator":
        return BestFitIterator(self)

    def __str__(self) -> str:
        return f"BestFitBatches(B={self.batch_size}, T={self.seq_len}, buffer_docs={self.buffer_docs})"


class BestFitIterator(grain.DatasetIterator):
    def __init__(self, ds: BestFitBatches):
        super().__init__()
        self._ds = ds
        self._n = len(ds.row_groups)
        self._bos = ds.tokenizer.bos_id
        self._reset()

    def _reset(self) -> None:
        self._rg = -1  # stream index of the row group being tokenized; epoch = rg // n + 1
        self._texts: list[str] | None = None
        self._doc = 0  # next doc of that row group to tokenize
        self._buffer = _DocBuffer()
        self._batches = self._consumed = self._cropped = 0

    # -- reading and tokenizing --------------------------------------------------------------------

    def _refill(self) -> bool:
        """Tokenize the next `tokenizer_batch` docs into the buffer; False once a finite stream has ended."""
        if self._texts is None and self._rg >= 0:
            self._texts = self._ds.row_groups[self._rg % self._n]  # lazily, after set_state
        empty_in_a_row = 0
        while self._texts is None or self._doc >= len(self._texts):
            nxt = self._rg + 1
            if self._ds.num_epochs is not None and nxt >= self._ds.num_epochs * self._n:
                return False
            self._rg, self._texts, self._doc = nxt, self._ds.row_groups[nxt % self._n], 0
            empty_in_a_row += 1
            if empty_in_a_row > self._n:
                raise ValueError("every row group of this process is empty: the shards hold no documents")
        start = self._doc
        chunk = self._texts[start:start + self._ds.tokenizer_batch]
        self._doc += len(chunk)
        for j, tokens in enumerate(self._ds.tokenizer.encode_batch(chunk, prepend=self._bos)):
            self._buffer.add((self._rg, start + j), tokens)
        return True

    # -- packing -----------------------------------------------------------------------------------

    def _next_row(self) -> np.ndarray | None:
        capacity = self._ds.seq_len + 1
        row = np.empty(capacity, np.int32)
        pos = 0
        while pos < capacity:
            while len(self._buffer) < self._ds.buffer_docs and self._refill():
                pass
            if not len(self._buffer):
                return None
            space = capacity - pos
            doc = self._buffer.pop_largest_fitting(space)
            if doc is None:
                doc = self._buffer.pop_shortest()
                self._cropped += len(doc) - space
                self._consumed += space
                doc = doc[:space]
            else:
                self._consumed += len(doc)
            row[pos:pos + len(doc)] = doc
            pos += len(doc)
        return row

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        rows = []
        for _ in range(self._ds.batch_size):
            row = self._next_row()
            if row is None:  # end of a finite stream: drop the partial batch, shapes stay static
                raise StopIteration
            rows.append(row)
        rows_BxT1 = np.stack(rows)
        self._batches += 1
        return {"inputs": np.ascontiguousarray(rows_BxT1[:, :-1]),
                "targets": np.ascontiguousarray(rows_BxT1[:, 1:])}

    # -- progress and state ------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """1-based epoch of the row group being read (the reference counts epochs from 1)."""
        return max(self._rg, 0) // self._n + 1

    def stats(self) -> dict[str, Any]:
        """Deterministic counters; `cropped_fraction` = tokens cropped away / tokens taken from the buffer."""
        taken = self._consumed + self._cropped
        return {"epoch": self.epoch, "batches": self._batches, "tokens_packed": self._consumed,
                "tokens_cropped": self._cropped, "cropped_fraction": self._cropped / taken if taken else 0.0}

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "config": self._ds.config(), "epoch": self.epoch,
                "row_group": self._rg, "doc": self._doc, "buffer": self._buffer.refs_by_row_group(),
                "batches": self._batches, "tokens_packed": self._consumed, "tokens_cropped": self._cropped}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"pretraining data state has version {state.get('version')!r}, this code reads "
                             f"version {STATE_VERSION}; resume with the code that saved it or restart the data stream")
        expected = self._ds.config()
        diff = {k: (state["config"].get(k), v) for k, v in expected.items() if state["config"].get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in diff.items())
            raise ValueError(f"pretraining data state does not match this pipeline ({detail}); exact resume needs "
                             f"the same data settings and shards — restore them or restart the data stream")
        self._reset()
        self._rg, self._doc = state["row_group"], state["doc"]
        self._batches, self._consumed, self._cropped = state["batches"], state["tokens_packed"], state["tokens_cropped"]
        for rg, docs in state["buffer"]:
            texts = self._ds.row_groups[rg % self._n]
            tokenized = self._ds.tokenizer.encode_batch([texts[d] for d in docs], prepend=self._bos)
            for d, tokens in zip(docs, tokenized):
                self._buffer.add((rg, d), tokens)

    def __str__(self) -> str:
        return f"BestFitIterator({self._ds})"


def pretrain_dataset(paths: Sequence[Path | str], tokenizer, batch_size: int, seq_len: int, process_index: int = 0,
                     process_count: int = 1, buffer_docs: int = 1000, tokenizer_batch: int = 128,
                     num_epochs: int | None = None) -> BestFitBatches:
    """The training stream of this process: endless epochs over its row groups unless `num_epochs` is set."""
    row_groups = process_row_groups(paths, process_index, process_count)
    return BestFitBatches(row_groups, tokenizer, batch_size, seq_len, buffer_docs, tokenizer_batch, num_epochs)


def val_batches(val_path: Path | str, tokenizer, batch_size: int, seq_len: int, process_index: int = 0,
                process_count: int = 1, buffer_docs: int = 1000, tokenizer_batch: int = 128) -> BestFitIterator:
    """A fresh single pass over the validation shard; build one per evaluation so every eval sees the same batches.

    Processes read disjoint row groups and may get different batch counts: evaluate a fixed number of steps.
    """
    return iter(pretrain_dataset([val_path], tokenizer, batch_size, seq_len, process_index, process_count,
                                 buffer_docs, tokenizer_batch, num_epochs=1))
