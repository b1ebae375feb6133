"""The pretraining data pipeline: parquet row groups -> packed (B, T) batches, by stream or best-fit packing.

A grain chain:

    MapDataset.source(row groups of this process)   row group r of the global list -> process r % count
      .map(read_row_group)                          pyarrow, docs as strings
    PackedBatches (an IterDataset)                  tokenize 128 docs at a time with BOS prepended,
                                                    pack them into a (B, T) batch the chosen way

Reading and tokenizing are the same for both packings; only the packer differs (`config.packing`):

* "stream" — the reference's October 2025 loader (nanochat-reference.md §4.2): every doc, BOS first, is
  appended to one token stream, and each batch is the stream's next B*T+1 tokens, inputs = buf[:-1] and
  targets = buf[1:] reshaped to (B, T). Documents flow across rows and batches (rows start mid-document)
  and nothing is cropped; the batch's last token is a target only, popped with the batch as the reference
  does (one token in B*T+1 never serves as an input).
* "bestfit" — the reference's 2026 loader (§4.3): keep >= `buffer_docs` tokenized docs; fill each row of
  T+1 tokens by repeatedly taking the largest doc that fits entirely; when none fits, take the shortest
  doc and crop it to fill the row exactly (its tail is dropped). So there is no padding, and every row
  starts with BOS and a document's beginning. Ties go to the oldest doc, like the reference's
  first-in-buffer scan. ~35% of FineWeb-Edu's tokens are cropped at T=2048.
The fraction of tokens cropped away is counted (`stats()`; 0 for stream).

Exact resume. The state is taken between batches, where no row is half built, so the position is:
  * the stream index of the row group being tokenized and the next doc in it (epoch = index // n + 1),
  * the docs waiting in the packer, as (row-group stream index, doc index) references, not tokens, plus
    (stream) how many tokens of the first waiting doc were already emitted,
  * the counters.
That is small JSON (a few thousand ints at most) and restoring it re-reads only the row groups the
waiting docs refer to and re-tokenizes only those docs. Best-fit's long docs can wait in the buffer for a
long time, so the references may span many row groups: restore cost is bounded by the buffer size
(<= `buffer_docs` row-group reads), never by how far training has run.

`val_batches` builds the same chain over the validation shard for a single pass (no epochs); the last
partial batch is dropped so every batch has the same static shape. `data_horizon` measures, before base
training, how many tokens the train shards on disk hold after packing, against the run's horizon.
"""
import bisect
import collections
import dataclasses
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grain
import numpy as np

from jaxchat.config import PACKINGS
from jaxchat.data.datasets import ShardNeed
from jaxchat.data.shards import num_docs, num_row_groups, read_row_group

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


class _Packer:
    """How tokenized docs waiting to be packed become a batch: the one thing the packings do differently.

    `batch(B, T, refill)` returns (inputs, targets) as int32 (B, T), calling `refill()` (which adds docs with
    `add` and returns False once a finite stream has ended) as often as it needs docs; None when the stream ran
    out before the batch was full. `packed` counts tokens put into batches, `cropped` tokens thrown away.
    """

    def __init__(self):
        self.packed = self.cropped = 0

    def add(self, ref: tuple[int, int], tokens: list[int]) -> None:
        raise NotImplementedError

    def batch(self, batch_size: int, seq_len: int, refill) -> tuple[np.ndarray, np.ndarray] | None:
        raise NotImplementedError

    def refs_by_row_group(self) -> list[list]:
        """The waiting docs as [[row_group, [doc, ...]], ...] sorted: stream order, JSON-ready."""
        raise NotImplementedError

    def state(self) -> dict[str, Any]:
        """What the packer needs besides the waiting docs to resume exactly."""
        return {}

    def restore(self, state: dict[str, Any]) -> None:
        """After the waiting docs were re-added in stream order, apply `state()`."""


class _BestFit(_Packer):
    """Best-fit BOS-aligned rows (§4.3): B rows of T+1 tokens, each starting with a document."""

    def __init__(self, buffer_docs: int):
        super().__init__()
        self.buffer_docs = buffer_docs
        self._buffer = _DocBuffer()

    def add(self, ref, tokens):
        self._buffer.add(ref, tokens)

    def _row(self, capacity: int, refill) -> np.ndarray | None:
        row = np.empty(capacity, np.int32)
        pos = 0
        while pos < capacity:
            while len(self._buffer) < self.buffer_docs and refill():
                pass
            if not len(self._buffer):
                return None
            space = capacity - pos
            doc = self._buffer.pop_largest_fitting(space)
            if doc is None:
                doc = self._buffer.pop_shortest()
                self.cropped += len(doc) - space
                self.packed += space
                doc = doc[:space]
            else:
                self.packed += len(doc)
            row[pos:pos + len(doc)] = doc
            pos += len(doc)
        return row

    def batch(self, batch_size, seq_len, refill):
        rows = []
        for _ in range(batch_size):
            row = self._row(seq_len + 1, refill)
            if row is None:
                return None
            rows.append(row)
        rows_BxT1 = np.stack(rows)
        return rows_BxT1[:, :-1], rows_BxT1[:, 1:]

    def refs_by_row_group(self):
        return self._buffer.refs_by_row_group()


class _Stream(_Packer):
    """October's stream (§4.2): the BOS-joined docs cut into consecutive batches of B*T+1 tokens."""

    def __init__(self):
        super().__init__()
        self._docs: collections.deque[tuple[tuple[int, int], list[int]]] = collections.deque()  # stream order
        self._offset = 0  # tokens of the first waiting doc already emitted
        self._waiting = 0  # tokens not yet emitted

    def add(self, ref, tokens):
        self._docs.append((ref, tokens))
        self._waiting += len(tokens)

    def batch(self, batch_size, seq_len, refill):
        need = batch_size * seq_len + 1
        while self._waiting < need:
            if not refill():
                return None
        buf = np.empty(need, np.int32)
        pos = 0
        while pos < need:
            tokens = self._docs[0][1]
            n = min(need - pos, len(tokens) - self._offset)
            buf[pos:pos + n] = tokens if n == len(tokens) else tokens[self._offset:self._offset + n]
            pos += n
            self._offset += n
            if self._offset == len(tokens):
                self._docs.popleft()
                self._offset = 0
        self._waiting -= need
        self.packed += need
        return buf[:-1].reshape(batch_size, seq_len), buf[1:].reshape(batch_size, seq_len)

    def refs_by_row_group(self):
        grouped: dict[int, list[int]] = {}
        for (rg, doc), _ in self._docs:
            grouped.setdefault(rg, []).append(doc)
        return [[rg, docs] for rg, docs in grouped.items()]

    def state(self):
        return {"offset": self._offset}

    def restore(self, state):
        self._offset = state["offset"]
        self._waiting -= self._offset


def make_packer(packing: str, buffer_docs: int = 1000) -> _Packer:
    if packing == "stream":
        return _Stream()
    if packing == "bestfit":
        return _BestFit(buffer_docs)
    raise ValueError(f"packing must be one of {', '.join(PACKINGS)}, got {packing!r}")


class PackedBatches(grain.IterDataset):
    """Packed `{"inputs", "targets"}` int32 (B, T) batches from a MapDataset of row groups (lists of docs)."""

    def __init__(self, row_groups: grain.MapDataset, tokenizer, batch_size: int, seq_len: int,
                 buffer_docs: int = 1000, tokenizer_batch: int = 128, num_epochs: int | None = None,
                 packing: str = "bestfit"):
        super().__init__(row_groups)
        if len(row_groups) == 0:
            raise ValueError("no row groups to read")
        make_packer(packing)  # a bad name fails here, not at the first batch
        self.row_groups = row_groups
        self.tokenizer = tokenizer
        self.batch_size, self.seq_len, self.packing = batch_size, seq_len, packing
        self.buffer_docs, self.tokenizer_batch, self.num_epochs = buffer_docs, tokenizer_batch, num_epochs

    def config(self) -> dict[str, Any]:
        """The settings a saved state is only valid for."""
        return {"packing": self.packing, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "buffer_docs": self.buffer_docs, "tokenizer_batch": self.tokenizer_batch,
                "row_groups": len(self.row_groups)}

    def __iter__(self) -> "PackedIterator":
        return PackedIterator(self)

    def __str__(self) -> str:
        return (f"PackedBatches(packing={self.packing}, B={self.batch_size}, T={self.seq_len}, "
                f"buffer_docs={self.buffer_docs})")


class PackedIterator(grain.DatasetIterator):
    def __init__(self, ds: PackedBatches):
        super().__init__()
        self._ds = ds
        self._n = len(ds.row_groups)
        self._bos = ds.tokenizer.bos_id
        self._reset()

    def _reset(self) -> None:
        self._rg = -1  # stream index of the row group being tokenized; epoch = rg // n + 1
        self._texts: list[str] | None = None
        self._doc = 0  # next doc of that row group to tokenize
        self._packer = make_packer(self._ds.packing, self._ds.buffer_docs)
        self._batches = 0

    # -- reading and tokenizing (the same for every packing) ---------------------------------------

    def _refill(self) -> bool:
        """Tokenize the next `tokenizer_batch` docs into the packer; False once a finite stream has ended."""
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
            self._packer.add((self._rg, start + j), tokens)
        return True

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        out = self._packer.batch(self._ds.batch_size, self._ds.seq_len, self._refill)
        if out is None:  # end of a finite stream: drop the partial batch, shapes stay static
            raise StopIteration
        self._batches += 1
        inputs_BxT, targets_BxT = out
        return {"inputs": np.ascontiguousarray(inputs_BxT), "targets": np.ascontiguousarray(targets_BxT)}

    # -- progress and state ------------------------------------------------------------------------

    @property
    def epoch(self) -> int:
        """1-based epoch of the row group being read (the reference counts epochs from 1)."""
        return max(self._rg, 0) // self._n + 1

    def stats(self) -> dict[str, Any]:
        """Deterministic counters; `cropped_fraction` = tokens cropped away / tokens taken from the packer."""
        packed, cropped = self._packer.packed, self._packer.cropped
        taken = packed + cropped
        return {"epoch": self.epoch, "batches": self._batches, "tokens_packed": packed,
                "tokens_cropped": cropped, "cropped_fraction": cropped / taken if taken else 0.0}

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "config": self._ds.config(), "epoch": self.epoch,
                "row_group": self._rg, "doc": self._doc, "buffer": self._packer.refs_by_row_group(),
                **self._packer.state(), "batches": self._batches, "tokens_packed": self._packer.packed,
                "tokens_cropped": self._packer.cropped}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"pretraining data state has version {state.get('version')!r}, this code reads "
                             f"version {STATE_VERSION}; resume with the code that saved it or restart the data stream")
        saved = {"packing": "bestfit", **state["config"]}  # states from before the packing choice were best-fit
        expected = self._ds.config()
        diff = {k: (saved.get(k), v) for k, v in expected.items() if saved.get(k) != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a}, now {b}" for k, (a, b) in diff.items())
            raise ValueError(f"pretraining data state does not match this pipeline ({detail}); exact resume needs "
                             f"the same data settings and shards — restore them or restart the data stream")
        self._reset()
        self._rg, self._doc, self._batches = state["row_group"], state["doc"], state["batches"]
        self._packer.packed, self._packer.cropped = state["tokens_packed"], state["tokens_cropped"]
        for rg, docs in state["buffer"]:
            texts = self._ds.row_groups[rg % self._n]
            tokenized = self._ds.tokenizer.encode_batch([texts[d] for d in docs], prepend=self._bos)
            for d, tokens in zip(docs, tokenized):
                self._packer.add((rg, d), tokens)
        self._packer.restore(state)

    def __str__(self) -> str:
        return f"PackedIterator({self._ds})"


def pretrain_dataset(paths: Sequence[Path | str], tokenizer, batch_size: int, seq_len: int, process_index: int = 0,
                     process_count: int = 1, buffer_docs: int = 1000, tokenizer_batch: int = 128,
                     num_epochs: int | None = None, packing: str = "bestfit") -> PackedBatches:
    """The training stream of this process: endless epochs over its row groups unless `num_epochs` is set."""
    row_groups = process_row_groups(paths, process_index, process_count)
    return PackedBatches(row_groups, tokenizer, batch_size, seq_len, buffer_docs, tokenizer_batch, num_epochs,
                         packing=packing)


def val_batches(val_path: Path | str, tokenizer, batch_size: int, seq_len: int, process_index: int = 0,
                process_count: int = 1, buffer_docs: int = 1000, tokenizer_batch: int = 128,
                packing: str = "bestfit") -> PackedIterator:
    """A fresh single pass over the validation shard; build one per evaluation so every eval sees the same batches.

    Processes read disjoint row groups and may get different batch counts: evaluate a fixed number of steps.
    """
    return iter(pretrain_dataset([val_path], tokenizer, batch_size, seq_len, process_index, process_count,
                                 buffer_docs, tokenizer_batch, num_epochs=1, packing=packing))


# -- the data horizon: how many tokens the train shards hold after packing ------------------------------------------


@dataclasses.dataclass(frozen=True)
class DataHorizon(ShardNeed):
    """The train shards on disk against a run's horizon, from a measured sample (see `data_horizon`): chars per
    token and the packer's crop fraction are measured on it."""

    docs: int  # documents in all train shards (parquet metadata)
    sample_docs: int  # documents tokenized to measure chars_per_token, tokens_per_doc and the crop
    tokens_per_doc: float  # BOS included

    @property
    def tokens_available(self) -> float:
        return self.docs * self.tokens_per_doc * (1 - self.crop_fraction)

    @property
    def tokens_per_shard(self) -> float:
        return self.tokens_available / self.train_shards

    @property
    def epochs(self) -> float:
        return self.horizon_tokens / self.tokens_available

    def record(self) -> dict[str, Any]:
        """The JSON form logged in metrics.jsonl."""
        return {"packing": self.packing, "train_shards": self.train_shards, "docs": self.docs,
                "sample_docs": self.sample_docs, "tokens_per_doc": self.tokens_per_doc,
                "chars_per_token": self.chars_per_token, "crop_fraction": self.crop_fraction,
                "tokens_available": round(self.tokens_available), "tokens_per_shard": round(self.tokens_per_shard),
                "horizon_tokens": self.horizon_tokens, "epochs": self.epochs, "shards_needed": self.shards_needed}


def crop_fraction(docs: Sequence[list[int]], packing: str, seq_len: int, buffer_docs: int = 1000) -> float:
    """Fraction of the tokens read that `packing` never puts in a batch, by running the pipeline's packer over `docs`.

    Stream packing loses nothing. Best-fit crops the shortest doc when none fits, and docs longer than a row wait in
    its buffer until they are the shortest left: both are tokens read but never trained on. The cropped share alone
    rises slowly (the buffer first fills up with long docs instead of cropping them) but cropped + newly waiting
    tokens settle within one pass over a few thousand docs. So the docs go round twice and the figure is the second
    pass's (read - packed) / read: on FineWeb-like lengths (lognormal, median 600 tokens, T=2048) 4,096 docs give
    0.32 against 0.31 measured over 300,000 distinct docs.
    """
    if packing == "stream":
        return 0.0
    packer = make_packer(packing, buffer_docs)
    n = len(docs)
    fed = read = 0

    def refill() -> bool:
        nonlocal fed, read
        if fed >= 2 * n:
            return False
        packer.add((fed, 0), docs[fed % n])
        read += len(docs[fed % n])
        fed += 1
        return True

    while fed < n:
        packer.batch(1, seq_len, refill)
    read0, packed0 = read, packer.packed
    while fed < 2 * n and packer.batch(1, seq_len, refill) is not None:
        pass
    return min(1.0, max(0.0, 1 - (packer.packed - packed0) / max(1, read - read0)))


def data_horizon(train_paths: Sequence[Path | str], tokenizer, seq_len: int, packing: str, horizon_tokens: int,
                 sample_docs: int = 4096, buffer_docs: int = 1000, tokenizer_batch: int = 128) -> DataHorizon:
    """Tokens the train shards hold after `packing`, measured on their first `sample_docs` docs.

    Tokens per doc (BOS included) come from tokenizing the sample; the crop from running the packer over it
    (`crop_fraction`); the doc count of every shard from its parquet metadata (no text read). The first shards are a
    fair sample: the reference's shards are cut from a dataset shuffled as a whole.
    """
    texts: list[str] = []
    for path in train_paths:
        for i in range(num_row_groups(path)):
            if len(texts) >= sample_docs:
                break
            texts += read_row_group(path, i)
    texts = texts[:sample_docs]
    if not texts:
        raise ValueError(f"the train shards ({train_paths[0]}, ...) hold no documents to measure")
    docs = [tokens for i in range(0, len(texts), tokenizer_batch)
            for tokens in tokenizer.encode_batch(texts[i:i + tokenizer_batch], prepend=tokenizer.bos_id)]
    n_tokens = sum(len(d) for d in docs)
    return DataHorizon(
        packing=packing, train_shards=len(train_paths), docs=sum(num_docs(p) for p in train_paths),
        sample_docs=len(docs), tokens_per_doc=n_tokens / len(docs),
        chars_per_token=sum(len(t) for t in texts) / max(1, n_tokens - len(docs)),
        crop_fraction=crop_fraction(docs, packing, seq_len, buffer_docs), horizon_tokens=horizon_tokens)
