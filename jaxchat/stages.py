"""The stages: what data, loss and schedule each one brings to the shared loop (trainer.py).

- tokenizer: BPE on the first `tokenizer_max_chars` characters of the pretraining shards, then the compression table.
- base: pretraining on BOS-aligned best-fit packed shards, validation bits-per-byte on the pinned val shard.
(mid, sft and rl plug in here as they land.)
"""
from __future__ import annotations

import sys
import time

import jax

from jaxchat import config as C
from jaxchat import optim, paths, tok_eval, trainer
from jaxchat.data import shards, tiny_corpus
from jaxchat.data.pretrain import pretrain_dataset, val_batches
from jaxchat.tokenizer import Tokenizer


def tokenizer_name(config) -> str:
    return config.tokenizer or config.run


def prepare_data(config) -> None:
    """The tiny corpus is generated on demand; real datasets must have been downloaded (shards.py says how)."""
    if config.dataset == "tiny":
        tiny_corpus.ensure_tiny_corpus()


def load_tokenizer(config) -> Tokenizer:
    directory = paths.tokenizer_dir(tokenizer_name(config))
    if not (directory / "tokenizer.json").exists():
        raise FileNotFoundError(
            f"no tokenizer at {directory} — run `python train.py --config=configs/{config.run}.py --stage=tokenizer`")
    tok = Tokenizer.load(directory)
    if tok.vocab_size != config.vocab_size:
        raise ValueError(f"tokenizer {directory} has {tok.vocab_size:,} ids but the config's vocab_size is "
                         f"{config.vocab_size:,}; retrain it (--stage=tokenizer) or set --config.vocab_size")
    return tok


def run_tokenizer(config, log=print) -> Tokenizer:
    prepare_data(config)
    train_paths, val_path = shards.list_shards(config.dataset)
    log(f"tokenizer: training {config.vocab_size:,} ids on up to {config.tokenizer_max_chars:,} chars of "
        f"{config.dataset} (docs cropped to {config.tokenizer_doc_cap:,} chars)")
    t0 = time.perf_counter()
    texts = shards.iter_texts(train_paths, max_chars=config.tokenizer_max_chars, doc_cap=config.tokenizer_doc_cap)
    tok = Tokenizer.train(texts, config.vocab_size, progress=True)
    directory = tok.save(paths.tokenizer_dir(tokenizer_name(config)))
    log(f"tokenizer: trained in {time.perf_counter() - t0:.1f}s, saved to {directory}")
    samples = {
        f"{config.dataset}-train": "\n".join(shards.read_row_group(train_paths[0], 0)),
        f"{config.dataset}-val": "\n".join(shards.read_row_group(val_path, 0)),
    }
    references, notes = tok_eval.load_reference_encoders()
    log(tok_eval.format_table(tok_eval.compression_table(tok, samples, references), notes))
    return tok


def base_stage(config, tokenizer) -> trainer.Stage:
    prepare_data(config)
    train_paths, val_path = shards.list_shards(config.dataset)
    derived = C.derive(config, len(jax.devices()))

    def train_data(rows, pidx, pcount):
        return iter(pretrain_dataset(train_paths, tokenizer, rows, config.sequence_len, pidx, pcount))

    def val_data(rows, pidx, pcount):
        return val_batches(val_path, tokenizer, rows, config.sequence_len, pidx, pcount)

    return trainer.Stage(
        name="base",
        num_iterations=derived.num_iterations,
        train_data=train_data,
        val_data=val_data,
        schedule=lambda step: optim.schedule(config, derived, step),
    )


STAGES = ("tokenizer", "base")


def run_stage(config, stage: str, log=print):
    if stage == "tokenizer":
        return run_tokenizer(config, log)
    tokenizer = load_tokenizer(config)
    if stage == "base":
        return trainer.run(config, base_stage(config, tokenizer), tokenizer, log=log)
    raise ValueError(f"unknown stage {stage!r}; choose from {', '.join(STAGES + ('all',))}")


def run_all(config, log=print):
    """Every stage in order; each resumes (or is skipped when complete) so re-running continues where it stopped."""
    if not (paths.tokenizer_dir(tokenizer_name(config)) / "tokenizer.json").exists():
        run_tokenizer(config, log)
    else:
        log(f"tokenizer: using {paths.tokenizer_dir(tokenizer_name(config))}")
    result = None
    for stage in STAGES[1:]:
        result = run_stage(config, stage, log)
        if not result.completed:
            log(f"stopped during {stage}; re-run the same command to continue")
            sys.exit(0)
    return result
