"""The pretraining datasets jaxchat knows: where the shards live and which one is validation.

Every dataset is a directory of `shard_{i:05d}.parquet` files with a single `text` column. The
validation shard is pinned to the dataset's last shard (as the reference's later versions do), so
which shard validates never depends on how many shards happen to be on disk.

Each dataset also records what is known about its size in tokens, so that a config can say how many shards
its horizon needs without tokenizing anything (`python -m jaxchat.config`); base training measures the
real figures on the shards at start-up (data/pretrain.py `data_horizon`) before it trusts them.
"""
import dataclasses
import math

# Download this much more than the arithmetic needs: the reference's speedrun fetches 240 shards for the ~216
# its comment computes for d20 (nanochat-reference.md §12.1), about 10% spare.
SHARD_SPARE = 0.10


@dataclasses.dataclass(frozen=True)
class ShardDataset:
    name: str
    base_url: str | None  # None: generated locally, never downloaded
    num_shards: int
    # Known figures (None: unknown until base training measures them on the shards):
    chars_per_shard: float | None = None  # characters of text per shard
    chars_per_token: float | None = None  # compression of the reference-sized tokenizer on this text
    bestfit_crop: float | None = None  # fraction of tokens best-fit packing crops away ...
    bestfit_crop_seq_len: int = 0  # ... at this sequence length (the crop grows as rows shorten)

    @property
    def val_index(self) -> int:
        return self.num_shards - 1

    def tokens_per_shard(self, packing: str) -> float | None:
        """Tokens a shard yields after `packing` ("stream" crops nothing), from the known figures; None if unknown."""
        if self.chars_per_shard is None or self.chars_per_token is None:
            return None
        crop = 0.0 if packing == "stream" else self.bestfit_crop
        if crop is None:
            return None
        return self.chars_per_shard / self.chars_per_token * (1 - crop)


def shards_needed(tokens: float, tokens_per_shard: float, spare: float = SHARD_SPARE) -> int:
    """Train shards to download for `tokens` of training at `tokens_per_shard`, with `spare` on top."""
    return math.ceil(tokens * (1 + spare) / tokens_per_shard)


@dataclasses.dataclass(frozen=True)
class ShardNeed:
    """A base horizon against a dataset's train shards. Where the tokens per shard come from is the subclass's:
    the dataset's known figures at config time (config.DataPlan), or a sample of the shards on disk at start-up
    (pretrain.DataHorizon)."""

    packing: str
    train_shards: int  # train shards the dataset has (DataPlan) or that are on disk (DataHorizon)
    chars_per_token: float
    crop_fraction: float  # of the tokens read, cropped away by the packing (0 for stream)
    horizon_tokens: int

    @property
    def tokens_per_shard(self) -> float:
        raise NotImplementedError

    @property
    def shards_exact(self) -> float:
        return self.horizon_tokens / self.tokens_per_shard

    @property
    def shards_needed(self) -> int:
        """Train shards to download: the exact need plus the downloads' spare."""
        return shards_needed(self.horizon_tokens, self.tokens_per_shard)


def shard_name(index: int) -> str:
    return f"shard_{index:05d}.parquet"


DATASETS = {
    "fineweb-edu": ShardDataset(
        "fineweb-edu",
        "https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main",
        1823,
        # Shards are cut at >= 250,000,000 chars (the reference's repackaging script, nanochat-reference.md §4.1).
        chars_per_shard=250_000_000,
        # The reference's own arithmetic (speedrun.sh / run1000.sh comments, §12.1): "about ~4.8 chars/token".
        # tok_eval measured its 65K tokenizer at 4.91 (train) and 4.86 (val) bytes/token on FineWeb-Edu (§5.3);
        # 4.8 is the reference's rounding down, so the estimate errs towards more shards.
        chars_per_token=4.8,
        # Best-fit packing crops ~35% of the tokens at T=2048 (the reference's HEAD loader docstring, §4.3).
        bestfit_crop=0.35,
        bestfit_crop_seq_len=2048,
    ),
    "climbmix": ShardDataset(
        "climbmix",
        "https://huggingface.co/datasets/karpathy/climbmix-400b-shuffle/resolve/main",
        6543,
    ),
    # The embedded corpus for configs/tiny.py: written by jaxchat.data.tiny_corpus, same format.
    # Figures: tiny_corpus.generate's 900,000 chars per shard; its 1,536-id tokenizer measured 3.41 chars/token on
    # the train split (tok_eval); best-fit loses ~45% at T=256 (data_horizon's measure): 5% of the docs are long
    # multi-paragraph ones holding a third of the tokens past the 257-token row.
    "tiny": ShardDataset("tiny", None, 8, chars_per_shard=900_000, chars_per_token=3.41, bestfit_crop=0.45,
                         bestfit_crop_seq_len=256),
}


def get_dataset(name: str) -> ShardDataset:
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(sorted(DATASETS))}")
    return DATASETS[name]


def download_command(name: str, n: int) -> str | None:
    """The command that fetches `n` train shards of dataset `name`; None for a dataset generated locally."""
    if get_dataset(name).base_url is None:
        return None
    return f"python -m jaxchat.data.download -n {n}" + ("" if name == "fineweb-edu" else f" --dataset {name}")
