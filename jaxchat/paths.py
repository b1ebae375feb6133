"""Where everything lives: one base dir, `$JAXCHAT_HOME` (default `~/.cache/jaxchat`).

    data/<dataset>/shard_*.parquet     pretraining shards
    tasks/                             task dataset cache (SmolTalk, MMLU, ...)
    eval_bundle/                       the DCLM CORE bundle
    words_alpha.txt                    the spelling tasks' word list
    tokenizer/<name>/                  tokenizer.json + token_bytes.npy (<name>: the config file's, unless set)
    runs/<run>/<stage>/                checkpoints/, metrics.jsonl, report section
"""
import os
from pathlib import Path


def home() -> Path:
    return Path(os.environ.get("JAXCHAT_HOME") or Path.home() / ".cache" / "jaxchat").expanduser()


def data_dir(dataset: str) -> Path:
    return home() / "data" / dataset


def tasks_dir() -> Path:
    return home() / "tasks"


def eval_bundle_dir() -> Path:
    return home() / "eval_bundle"


def tokenizer_dir(name: str) -> Path:
    return home() / "tokenizer" / name


def run_dir(run: str, stage: str | None = None) -> Path:
    d = home() / "runs" / run
    return d / stage if stage else d
