"""Random-weight models and a corpus tokenizer for the benchmarks, at any config's size, offline.

The generated tiny corpus supports only about 1,900 merges, so a tokenizer at a real config's vocabulary (65,536)
cannot be trained on it: the benches train one at `min(vocab_size, CORPUS_VOCAB)` and keep the model at the config's
vocabulary (the head's cost is the config's). The head is restricted to printable tokens of that tokenizer, so greedy
decoding never stops early and never emits an id the tokenizer lacks: every request runs to its token limit.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxchat import model
from jaxchat.tokenizer import Tokenizer

CORPUS_VOCAB = 1536  # what configs/tiny.py trains on the same corpus
CORPUS_CHARS = 3_000_000


def corpus_tokenizer(vocab_size: int) -> Tokenizer:
    from jaxchat.data.tiny_corpus import shard_documents

    return Tokenizer.train(iter(shard_documents(0, 0, CORPUS_CHARS)), min(vocab_size, CORPUS_VOCAB))


def printable_params(cfg: model.GPTConfig, tok: Tokenizer, *, seed: int = 0, scale: float = 0.3):
    """Every weight ~ N(0, scale²) (init zero-initialises the head, which would make every logit equal), with the
    head's columns zeroed for ids that are not printable text in `tok` (specials and ids beyond its vocabulary)."""
    printable = np.zeros(cfg.vocab_size, bool)
    for i in range(tok.vocab_size - 9):  # the specials are the last 9 ids
        printable[i] = all(32 <= c < 127 for c in tok.token_to_bytes(i))
    _, params = model.init(cfg, seed)
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    params = treedef.unflatten([scale * jax.random.normal(k, x.shape, x.dtype) for k, x in zip(keys, leaves)])
    params["lm_head"]["kernel"] = jnp.where(jnp.asarray(printable), params["lm_head"]["kernel"], 0.0)
    return params
