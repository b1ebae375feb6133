"""Chat mixtures through grain: tasks -> shuffled mixture -> rendered (ids, mask) -> masked (B, T) batches.

A grain chain:

    MapDataset.source((task, index) pairs).shuffle(seed).repeat(epochs)   reshuffled every epoch
      [process_index::process_count]                                      each process a disjoint stride
      .map(render)                                                        render_conversation(conv, cap)
    ChatBatches (an IterDataset)                                          rows of T+1, stacked B at a time

A task is any sequence of conversation dicts (`__len__`, `__getitem__`). Listing a task twice
oversamples it by repetition; within an epoch every listed (task, index) pair appears exactly once.

Rows, two modes:
  * "padded": one conversation per row (the V0 SFT layout, §7.2): rendered with the reference's cap of
    T tokens (2048 at d20), padded with `<|assistant_end|>` as the input pad, targets -1 on padding.
    The reference pads to the batch's longest row; we pad to T so the step compiles once. The loss is
    the same: attention is causal, so padding after a row's last token never reaches its real
    positions, and padding is never a target.
  * "packed": best-fit packing of whole conversations from a buffer of `buffer_size` (the HEAD SFT
    loader, §7.3): repeatedly take the largest that fits; when none fits, pad the rest with BOS.
    A conversation is never cropped except by render's `max_tokens` = T+1 cap.
Targets are the next tokens, set to -1 wherever the *target* token is unsupervised (mask 0: BOS,
user turns, tool output, padding), so the loss ignores them. With `supervise="all"` (the reference's
mid-training) every real token is a target and only padding is ignored.

Exact resume: the state is (next stream index, stream indices waiting in the buffer, counters);
restoring re-renders at most `buffer_size` conversations. On a finite stream (`num_epochs`, e.g.
validation) the last batch is filled with empty rows (all targets -1) so shapes stay static.
"""
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

STATE_VERSION = 1
MODES = ("padded", "packed")
SUPERVISE = ("assistant", "all")


class _Lookup:
    """(task, index) -> the conversation; a class rather than a lambda so the chain pickles."""

    def __init__(self, tasks):
        self.tasks = tasks

    def __call__(self, pair):
        return self.tasks[pair[0]][pair[1]]


class _Render:
    def __init__(self, tokenizer, max_tokens: int):
        self.tokenizer, self.max_tokens = tokenizer, max_tokens

    def __call__(self, conversation):
        return self.tokenizer.render_conversation(conversation, max_tokens=self.max_tokens)


def mixture_pairs(tasks: Sequence[Sequence[dict]]) -> list[tuple[int, int]]:
    """Every (task position, example index): one epoch of the mixture, before shuffling."""
    return [(t, i) for t, task in enumerate(tasks) for i in range(len(task))]


def mixture(tasks: Sequence[Sequence[dict]], seed: int = 0, num_epochs: int | None = None,
            process_index: int = 0, process_count: int = 1) -> grain.MapDataset:
    """This process's stream of conversations: the mixture reshuffled each epoch, strided by process."""
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index}")
    pairs = mixture_pairs(tasks)
    if not pairs:
        raise ValueError("the chat mixture is empty: every task has length 0")
    ds = grain.MapDataset.source(pairs).shuffle(seed=seed).repeat(num_epochs)
    return ds[process_index::process_count].map(_Lookup(tasks))


class ChatBatches(grain.IterDataset):
    """`{"inputs", "targets"}` int32 (B, T) batches from a MapDataset of rendered (ids, mask) pairs."""

    def __init__(self, rendered: grain.MapDataset, tokenizer, batch_size: int, seq_len: int, mode: str = "packed",
                 buffer_size: int = 100, examples_per_epoch: float | None = None, supervise: str = "assistant"):
        super().__init__(rendered)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if supervise not in SUPERVISE:
            raise ValueError(f"supervise must be one of {SUPERVISE}, got {supervise!r}")
        self.supervise = supervise
        self.rendered, self.tokenizer = rendered, tokenizer
        self.batch_size, self.seq_len, self.mode, self.buffer_size = batch_size, seq_len, mode, buffer_size
        # This process's share of one epoch; progress = examples consumed / this.
        self.examples_per_epoch = examples_per_epoch or len(rendered)

    def config(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "seq_len": self.seq_len, "mode": self.mode,
                "buffer_size": self.buffer_size, "examples_per_epoch": self.examples_per_epoch,
                "supervise": self.supervise}

    def __iter__(self) -> "ChatIterator":
        return ChatIterator(self)

    def __str__(self) -> str:
        return f"ChatBatches(B={self.batch_size}, T={self.seq_len}, mode={self.mode})"


def render_cap(mode: str, seq_len: int) -> int:
    """Tokens a conversation keeps when rendered: the reference's V0 SFT renders with its default cap of 2048 = T
    (so a row has at most T-1 inputs), HEAD's packer fills rows of T+1."""
    return seq_len if mode == "padded" else seq_len + 1


def pad_id(tokenizer, mode: str) -> int:
    """The input token of padding: V0 SFT pads with <|assistant_end|>, the packer with BOS."""
    return tokenizer.special_id("<|assistant_end|>") if mode == "padded" else tokenizer.bos_id


class ChatIterator(grain.DatasetIterator):
    def __init__(self, ds: ChatBatches):
        super().__init__()
        self._ds = ds
        self._pad = pad_id(ds.tokenizer, ds.mode)
        self._next = 0  # stream index of the next conversation to fetch
        self._buffer: list[tuple[int, list[int], list[int]]] = []  # (stream index, ids, mask), fetch order
        self._consumed = self._batches = 0

    def _load(self, i: int) -> tuple[int, list[int], list[int]]:
        ids, mask = self._ds.rendered[i]
        capacity = render_cap(self._ds.mode, self._ds.seq_len)  # render already caps; this guards a task that does not
        return i, list(ids[:capacity]), list(mask[:capacity])

    def _fetch(self) -> bool:
        if self._next >= len(self._ds.rendered):
            return False
        self._buffer.append(self._load(self._next))
        self._next += 1
        return True

    def _pick(self, space: int) -> tuple[list[int], list[int]] | None:
        """Pop the next conversation for a row with `space` tokens free, or None if none fits."""
        want = 1 if self._ds.mode == "padded" else self._ds.buffer_size
        while len(self._buffer) < want and self._fetch():
            pass
        if self._ds.mode == "padded":
            return self._buffer.pop(0)[1:] if self._buffer else None
        best = -1
        for i, (_, ids, _) in enumerate(self._buffer):  # largest that fits; the oldest wins ties
            if len(ids) <= space and (best < 0 or len(ids) > len(self._buffer[best][1])):
                best = i
        return self._buffer.pop(best)[1:] if best >= 0 else None

    def _next_row(self) -> tuple[np.ndarray, np.ndarray, int] | None:
        capacity = self._ds.seq_len + 1
        ids_T1 = np.full(capacity, self._pad, np.int32)
        mask_T1 = np.zeros(capacity, np.int32)
        pos = 0
        while pos < capacity:
            picked = self._pick(capacity - pos)
            if picked is None:
                break
            ids, mask = picked
            # "all": every real token is supervised; padding (never written here) stays 0
            ids_T1[pos:pos + len(ids)] = ids
            mask_T1[pos:pos + len(ids)] = 1 if self._ds.supervise == "all" else mask
            pos += len(ids)
            self._consumed += 1
            if self._ds.mode == "padded":
                break
        return (ids_T1, mask_T1, pos) if pos else None

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        B, capacity = self._ds.batch_size, self._ds.seq_len + 1
        ids_BxT1 = np.full((B, capacity), self._pad, np.int32)
        mask_BxT1 = np.zeros((B, capacity), np.int32)
        lengths = []
        n = 0
        while n < B:
            row = self._next_row()
            if row is None:
                break
            ids_BxT1[n], mask_BxT1[n], length = row
            lengths.append(length)
            n += 1
        if n == 0:
            raise StopIteration
        self._batches += 1
        targets_BxT = np.where(mask_BxT1[:, 1:] == 1, ids_BxT1[:, 1:], -1).astype(np.int32)
        inputs_BxT = ids_BxT1[:, :-1].copy()
        if self._ds.mode == "padded":  # the reference's inputs are ids[:-1]: a row's last token is only a target
            inputs_BxT[np.arange(n), np.array(lengths) - 1] = self._pad
        return {"inputs": inputs_BxT, "targets": targets_BxT}

    @property
    def progress(self) -> float:
        """Epochs consumed, as a float (1.0 = this process has placed one epoch's share of conversations)."""
        return self._consumed / self._ds.examples_per_epoch

    @property
    def epoch(self) -> int:
        return int(self.progress) + 1

    def stats(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "progress": self.progress, "batches": self._batches,
                "conversations": self._consumed}

    def get_state(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "config": self._ds.config(), "epoch": self.epoch, "next": self._next,
                "buffer": [i for i, _, _ in self._buffer], "consumed": self._consumed, "batches": self._batches}

    def set_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION or state.get("config") != self._ds.config():
            raise ValueError(f"chat data state {state.get('config')} (version {state.get('version')}) does not match "
                             f"this pipeline {self._ds.config()} (version {STATE_VERSION}); exact resume needs the "
                             f"same tasks and data settings — restore them or restart the data stream")
        self._next, self._consumed, self._batches = state["next"], state["consumed"], state["batches"]
        self._buffer = [self._load(i) for i in state["buffer"]]

    def __str__(self) -> str:
        return f"ChatIterator({self._ds})"


def chat_dataset(tasks: Sequence[Sequence[dict]], tokenizer, batch_size: int, seq_len: int, mode: str = "packed",
                 seed: int = 0, num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
                 buffer_size: int = 100, supervise: str = "assistant") -> ChatBatches:
    """Batches of a task mixture; endless unless `num_epochs` is set (use 1 for validation)."""
    convs = mixture(tasks, seed, num_epochs, process_index, process_count)
    rendered = convs.map(_Render(tokenizer, render_cap(mode, seq_len)))
    per_process = sum(len(t) for t in tasks) / process_count
    return ChatBatches(rendered, tokenizer, batch_size, seq_len, mode, buffer_size, per_process, supervise)
