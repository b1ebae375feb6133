"""The pretraining datasets jaxchat knows: where the shards live and which one is validation.

Every dataset is a directory of `shard_{i:05d}.parquet` files with a single `text` column. The
validation shard is pinned to the dataset's last shard (as the reference's later versions do), so
which shard validates never depends on how many shards happen to be on disk.
"""
import dataclasses


@dataclasses.dataclass(frozen=True)
class ShardDataset:
    name: str
    base_url: str | None  # None: generated locally, never downloaded
    num_shards: int

    @property
    def val_index(self) -> int:
        return self.num_shards - 1


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


DATASETS = {
    "fineweb-edu": ShardDataset(
        "fineweb-edu",
        "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main",
        1823,
    ),
    "climbmix": ShardDataset(
        "climbmix",
        "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main",
        6543,
    ),
    # The embedded corpus for configs/tiny.py: written by jaxchat.data.tiny_corpus, same format.
    "tiny": ShardDataset("tiny", None, 8),
}


def get_dataset(name: str) -> ShardDataset:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]
