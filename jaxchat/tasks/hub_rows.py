"""A hub split as a lazily loaded, shuffled row source: the reference shuffles every task with seed 42 (`datasets`'
order, reproduced by `hub.shuffled_indices`), so example i here is example i there."""
from __future__ import annotations

import numpy as np

from jaxchat.data.hub import load_hub_dataset, shuffled_indices
from jaxchat.tasks.base import Task


class HubRows:
    def __init__(self, repo_id: str, subset: str, split: str, seed: int | None = 42):
        self.repo_id, self.subset, self.split, self.seed = repo_id, subset, split, seed
        self._table = self._order = None

    def _load(self):
        if self._table is None:
            self._table = load_hub_dataset(self.repo_id, self.subset, self.split)
            n = self._table.num_rows
            self._order = shuffled_indices(n, self.seed) if self.seed is not None else np.arange(n)
        return self._table

    def __len__(self) -> int:
        return self._load().num_rows

    def __getitem__(self, index: int) -> dict:
        table = self._load()
        # take() of one row keeps memory flat: SmolTalk's 460K conversations never become Python objects at once.
        return table.take([int(self._order[index])]).to_pylist()[0]


class HubTask(Task):
    """A task whose examples are the rows of one hub split (`self.rows`), converted by `example`."""

    def __init__(self, repo_id: str, subset: str, split: str, **slice_kw):
        super().__init__(**slice_kw)
        self.subset, self.split = subset, split
        self.rows = HubRows(repo_id, subset, split)

    def num_examples(self) -> int:
        return len(self.rows)
