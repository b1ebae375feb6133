"""The tokenizer: GPT-4-style byte-level BPE on HuggingFace `tokenizers`, plus chat rendering.

- Training: regex split (nanochat's pattern: GPT-4's with `\\p{N}{1,2}`, possessive quantifiers, run by
  HF's Oniguruma `Split`) then byte-level mapping (`ByteLevel(use_regex=False)`), then `BpeTrainer`
  with the 256 byte symbols as the initial alphabet, so any byte sequence is encodable.
- The 9 chat special tokens are the *last 9 ids* (vocab_size - 9 ... vocab_size - 1), exactly as in
  nanochat. They live in the BPE model's vocabulary but are *not* HF "added tokens": HF splits added
  tokens out of any input text, and we want `"<|bos|>"` typed by a user to stay ordinary text. No merge
  produces them, so they can only enter a sequence by id (`prepend=`, `append=`, `special_id`).
- `token_bytes`: raw byte length of every token (0 for specials), for bits-per-byte, computed from the
  byte-level symbols, never by decoding to `str` (that would count U+FFFD for partial UTF-8 tokens).
- `StreamDecoder`: incremental decoding for a streaming server; it never emits half a character.
- `render_conversation` / `render_for_completion`: nanochat's chat format with the supervision mask.
- On disk (`paths.tokenizer_dir(name)`): `tokenizer.json` (HF format) and `token_bytes.npy`.
"""
from __future__ import annotations

import codecs
import copy
import json
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np
from tokenizers import Regex, decoders, models, pre_tokenizers, trainers
from tokenizers import Tokenizer as HFTokenizer

SPLIT_PATTERN = (
    r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|\s+(?!\S)|\s+"""
)
SPECIAL_TOKENS = (
    "<|bos|>",
    "<|user_start|>",
    "<|user_end|>",
    "<|assistant_start|>",
    "<|assistant_end|>",
    "<|python_start|>",
    "<|python_end|>",
    "<|output_start|>",
    "<|output_end|>",
)
N_BYTES = 256
TOKENIZER_FILE = "tokenizer.json"
TOKEN_BYTES_FILE = "token_bytes.npy"
# Words whose BPE result HF keeps in memory. The default (10k) thrashes on web text; 256k entries of a
# few dozen bytes each costs tens of MB and measurably speeds up encoding (see bench/tokenizer.py).
BPE_CACHE_CAPACITY = 1 << 18
TokenRef = int | str | None


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable-char table, the alphabet HF's ByteLevel pre-tokenizer works in.

    Printable Latin-1 bytes map to themselves; the other 68 are shifted to U+0100 onwards, so every
    byte is one visible char and a BPE token string is a reversible spelling of its raw bytes.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for b in range(N_BYTES):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(N_BYTES + shifted)
            shifted += 1
    return table


_UNICODE_TO_BYTE = {c: b for b, c in bytes_to_unicode().items()}


def _symbol_to_bytes(token: str) -> bytes:
    return bytes(_UNICODE_TO_BYTE[c] for c in token)


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def _not_found_error(directory: Path) -> FileNotFoundError:
    # Without the config, name the recipe whose default tokenizer this is (tokenizer_name) when one of ours is; else
    # the tokenizer's name is what the training command must match.
    name = directory.name
    recipe = Path(__file__).resolve().parent.parent / "configs" / f"{name}.py"
    config = f"configs/{name}.py" if recipe.is_file() else f"<your config> --config.tokenizer={name}"
    return FileNotFoundError(
        f"no tokenizer at {directory} ({TOKENIZER_FILE} missing) — train it with "
        f"`python train.py --config={config} --stage=tokenizer`"
    )


def tokenizer_name(config) -> str:
    """The tokenizer a config uses: `config.tokenizer`, which load_config_file sets to the config file's name (so every
    run of a recipe, whatever its --config.run, shares one); the run's name only for a config built in code."""
    return config.get("tokenizer") or config.run


def config_dir(config) -> Path:
    """Where the config's tokenizer lives: the tokenizer stage saves it here and every reader loads it from here."""
    from jaxchat import paths

    return paths.tokenizer_dir(tokenizer_name(config))


def load_for_config(config) -> Tokenizer:
    """The config's tokenizer. FileNotFoundError naming the command (this config's own arguments) that trains it;
    ConfigError when its vocabulary is not the config's `vocab_size` (the model's)."""
    from jaxchat.config import ConfigError, command

    directory = config_dir(config)
    if not (directory / TOKENIZER_FILE).is_file():
        train = command(config, "train.py", "--stage=tokenizer")
        raise FileNotFoundError(f"no tokenizer at {directory} — run `{train}`")
    tok = Tokenizer.load(directory)
    if tok.vocab_size != config.vocab_size:
        # Retraining under the same name would replace the tokenizer other runs of this recipe use: name a new one.
        retrain = command(config, "train.py", f"--config.tokenizer={tokenizer_name(config)}-{config.vocab_size}",
                          "--stage=tokenizer")
        raise ConfigError(
            f"tokenizer {directory} has {tok.vocab_size:,} ids but the config's vocab_size is {config.vocab_size:,}; "
            f"set --config.tokenizer to the tokenizer the run was trained with, --config.vocab_size="
            f"{tok.vocab_size} to use this one, or train one under another name: `{retrain}` (and pass that "
            "--config.tokenizer to every stage)")
    return tok


class Tokenizer:
    """Byte-level BPE with nanochat's 9 chat special tokens as the last 9 ids."""

    def __init__(self, hf: HFTokenizer):
        self._hf = hf
        vocab = hf.get_vocab()  # token string -> id, specials included
        self._vocab_size = len(vocab)
        n_ordinary = self._vocab_size - len(SPECIAL_TOKENS)
        for i, name in enumerate(SPECIAL_TOKENS):
            if vocab.get(name) != n_ordinary + i:
                raise ValueError(
                    f"tokenizer vocabulary has {name!r} at id {vocab.get(name)}, expected {n_ordinary + i} "
                    "(the 9 chat specials must be the last 9 ids) — retrain it with --stage=tokenizer"
                )
        self._special_ids = {name: n_ordinary + i for i, name in enumerate(SPECIAL_TOKENS)}
        raw: list[bytes] = [b""] * self._vocab_size
        for token, i in vocab.items():
            raw[i] = token.encode("utf-8") if token in self._special_ids else _symbol_to_bytes(token)
        self._raw = raw  # id -> the bytes it stands for (specials: their UTF-8 text, for display)
        lengths = [len(b) for b in raw]
        for i in self._special_ids.values():
            lengths[i] = 0  # specials are not text: they must not count towards bits-per-byte
        self._token_bytes = np.asarray(lengths, dtype=np.int32)

    # ---- training and persistence -------------------------------------------------------------

    @classmethod
    def train(
        cls,
        text_iterator: Iterable[str],
        vocab_size: int,
        progress: bool | Callable[[int, float], None] | None = None,
    ) -> Tokenizer:
        """Learn `vocab_size - 9 - 256` merges from the texts, then append the 9 specials.

        `progress`: True prints chars read and the read rate to stderr every few seconds; a callable
        gets `(chars_read, seconds)` instead. Counting chunks streams the iterator; computing merges
        happens after the iterator is exhausted and is reported once when done.
        """
        n_ordinary = vocab_size - len(SPECIAL_TOKENS)
        if n_ordinary < N_BYTES:
            raise ValueError(f"vocab_size must be at least {N_BYTES + len(SPECIAL_TOKENS)} (256 bytes + 9 specials), got {vocab_size}")
        report = _progress_printer() if progress is True else (progress or None)
        hf = HFTokenizer(models.BPE(cache_capacity=BPE_CACHE_CAPACITY))
        hf.pre_tokenizer = _pre_tokenizer()
        hf.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=n_ordinary,
            min_frequency=0,
            show_progress=False,
            special_tokens=[],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        )
        counter = _CharCounter(report)
        hf.train_from_iterator(counter.batches(text_iterator), trainer=trainer)
        if progress is True:
            print(f"\rtokenizer: {counter.chars / 1e6:.1f}M chars, trained in {time.perf_counter() - counter.t0:.1f}s", file=sys.stderr)
        learned = hf.get_vocab_size()
        if learned != n_ordinary:
            raise ValueError(
                f"the training text only supports {learned - N_BYTES} merges but vocab_size={vocab_size} needs "
                f"{n_ordinary - N_BYTES} — give more text or lower vocab_size"
            )
        return cls(_with_specials(hf))

    def save(self, directory: str | os.PathLike) -> Path:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self._hf.save(str(directory / TOKENIZER_FILE))
        np.save(directory / TOKEN_BYTES_FILE, self._token_bytes)
        return directory

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Tokenizer:
        """Load from `paths.tokenizer_dir(name)`; the error names the command that creates it."""
        path = Path(directory) / TOKENIZER_FILE
        if not path.is_file():
            raise _not_found_error(Path(directory))
        hf = HFTokenizer.from_file(str(path))
        # The cache size is a runtime setting that tokenizer.json does not keep.
        hf.model = _bpe_with_cache(hf)
        return cls(hf)

    # ---- vocabulary ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    @property
    def bos_id(self) -> int:
        return self._special_ids["<|bos|>"]

    def special_id(self, name: str) -> int:
        try:
            return self._special_ids[name]
        except KeyError:
            raise KeyError(f"unknown special token {name!r}; known: {', '.join(SPECIAL_TOKENS)}") from None

    @property
    def token_bytes(self) -> np.ndarray:
        """int32 (vocab_size,): raw bytes per token, 0 for the specials (for bits-per-byte)."""
        return self._token_bytes

    def token_to_bytes(self, token_id: int) -> bytes:
        """The raw bytes of one token (a special's is its UTF-8 name)."""
        if not 0 <= token_id < self._vocab_size:
            raise ValueError(f"token id {token_id} is outside the vocabulary [0, {self._vocab_size})")
        return self._raw[token_id]

    # ---- encode / decode ----------------------------------------------------------------------

    def _ref(self, ref: TokenRef) -> list[int]:
        if ref is None:
            return []
        if isinstance(ref, str):
            return [self.special_id(ref)]
        if not 0 <= int(ref) < self._vocab_size:
            raise ValueError(f"token id {ref} is outside the vocabulary [0, {self._vocab_size})")
        return [int(ref)]

    def encode(self, text: str, prepend: TokenRef = None, append: TokenRef = None) -> list[int]:
        """Ordinary text -> ids. Special-token spellings in `text` stay text; `prepend`/`append`
        take an id or a special's name (e.g. "<|bos|>")."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes a str, got {type(text).__name__} (use encode_batch for lists)")
        return self.encode_batch([text], prepend, append)[0]

    def encode_batch(self, texts: list[str], prepend: TokenRef = None, append: TokenRef = None) -> list[list[int]]:
        """Encode many texts on all cores: with tiktoken over this BPE's own ranks where it is installed (the same ids,
        ~4x faster: `fast_encoder`), else HF's (its rayon pool; `TOKENIZERS_PARALLELISM=false` turns that off)."""
        if isinstance(texts, str):
            raise TypeError("encode_batch takes a list of str, got one str (use encode)")
        head, tail = self._ref(prepend), self._ref(append)
        fast = self.fast_encoder()
        if fast is not None:
            return [head + ids + tail for ids in fast.encode_ordinary_batch(list(texts), num_threads=os.cpu_count())]
        _warn_if_parallelism_off()
        # encode_batch_fast skips character offsets, which we never use.
        encodings = self._hf.encode_batch_fast(list(texts), add_special_tokens=False)
        return [head + e.ids + tail for e in encodings]

    def fast_encoder(self):
        """tiktoken's `Encoding` over this BPE's ranks, or None where tiktoken is missing or JAXCHAT_TOKENIZER=hf.

        The same split pattern and the same merges (a byte-level BPE's ids are its merge ranks) give the same ids as
        HF's encoder; tests hold the two to each other. tiktoken is ~4x faster to encode (bench/RESULTS.md: 2.65 M vs
        0.6 M tokens per CPU-second in the pretraining pipeline), because HF spends most of its time building
        offset-tracking pre-tokens: at d12 on 8 GPUs the loader needs 7.6 M tokens/s, which HF cannot reach in one
        process on these cores."""
        if not hasattr(self, "_fast"):
            self._fast = None
            if os.environ.get("JAXCHAT_TOKENIZER", "").lower() != "hf":
                try:
                    import tiktoken
                except ImportError:
                    pass
                else:
                    n = self._vocab_size - len(SPECIAL_TOKENS)
                    self._fast = tiktoken.Encoding(f"jaxchat-{n}", pat_str=SPLIT_PATTERN, special_tokens={},
                                                   mergeable_ranks={self._raw[i]: i for i in range(n)})
        return self._fast

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """ids -> the raw bytes they stand for (may end mid-character)."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self._vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self._vocab_size})")
        return b"".join([self._raw[i] for i in ids])

    def decode(self, ids: Iterable[int]) -> str:
        """ids -> text; specials appear as their names, invalid UTF-8 as U+FFFD."""
        return self.decode_bytes(list(ids)).decode("utf-8", errors="replace")

    # ---- chat ---------------------------------------------------------------------------------

    def render_conversation(self, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
        return render_conversation(self, conversation, max_tokens)

    def render_for_completion(self, conversation: dict) -> list[int]:
        return render_for_completion(self, conversation)

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self._vocab_size}, bos_id={self.bos_id})"


def _with_specials(hf: HFTokenizer) -> HFTokenizer:
    """Append the 9 specials to the BPE vocabulary itself (see the module docstring for why)."""
    spec = json.loads(hf.to_str())
    vocab = spec["model"]["vocab"]
    clash = [name for name in SPECIAL_TOKENS if name in vocab]
    if clash:
        raise ValueError(f"learned tokens collide with special tokens {clash}; this cannot happen with SPLIT_PATTERN")
    n = len(vocab)
    for i, name in enumerate(SPECIAL_TOKENS):
        vocab[name] = n + i
    out = HFTokenizer.from_str(json.dumps(spec))
    out.model = _bpe_with_cache(out)
    return out


def _bpe_with_cache(hf: HFTokenizer) -> models.BPE:
    spec = json.loads(hf.to_str())["model"]
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in spec["merges"]]
    return models.BPE(vocab=spec["vocab"], merges=merges, cache_capacity=BPE_CACHE_CAPACITY)


def _warn_if_parallelism_off() -> None:
    if os.environ.get("TOKENIZERS_PARALLELISM", "").lower() in ("0", "false", "off", "no"):
        warnings.warn("TOKENIZERS_PARALLELISM is off: encode_batch runs on one core", stacklevel=3)


# ---- training progress ------------------------------------------------------------------------


class _CharCounter:
    """Counts chars as HF pulls them, and batches docs so each pull crosses into Rust once per batch."""

    BATCH = 128

    def __init__(self, report: Callable[[int, float], None] | None, every_s: float = 2.0):
        self.report, self.every_s = report, every_s
        self.chars, self.t0 = 0, time.perf_counter()

    def batches(self, texts: Iterable[str]) -> Iterator[list[str]]:
        batch: list[str] = []
        last = self.t0
        for text in texts:
            if not isinstance(text, str):
                raise TypeError(f"the training iterator must yield str, got {type(text).__name__}")
            batch.append(text)
            self.chars += len(text)
            if len(batch) == self.BATCH:
                yield batch
                batch = []
                now = time.perf_counter()
                if self.report is not None and now - last >= self.every_s:
                    self.report(self.chars, now - self.t0)
                    last = now
        if batch:
            yield batch
        if self.report is not None:
            self.report(self.chars, time.perf_counter() - self.t0)


def _progress_printer() -> Callable[[int, float], None]:
    def show(chars: int, seconds: float) -> None:
        rate = chars / max(seconds, 1e-9)
        print(f"\rtokenizer: read {chars / 1e6:,.1f}M chars ({rate / 1e6:.1f}M chars/s, {seconds:.0f}s)", end="", file=sys.stderr, flush=True)

    return show


# ---- streaming decode -------------------------------------------------------------------------


class StreamDecoder:
    """Feed ids one at a time; get back only complete characters.

    A token may end in the middle of a multi-byte character (emoji, CJK are often split across
    tokens); the incremental UTF-8 decoder holds such a tail until the next token completes it.
    Bytes that can never become valid UTF-8 come out as U+FFFD, as in `Tokenizer.decode`.
    """

    def __init__(self, tokenizer: Tokenizer):
        self._tokenizer = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, token_id: int) -> str:
        return self._utf8.decode(self._tokenizer.token_to_bytes(token_id))

    def flush(self) -> str:
        """End of stream: whatever is still held (an unfinished character) comes out as U+FFFD."""
        out = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return out


# ---- chat rendering ---------------------------------------------------------------------------

PART_TYPES = ("text", "python", "python_output")


def _messages(conversation: dict) -> list[dict]:
    if not isinstance(conversation, dict) or not isinstance(conversation.get("messages"), list):
        raise ValueError('a conversation is a dict {"messages": [{"role": ..., "content": ...}, ...]}')
    messages = conversation["messages"]
    if not messages:
        raise ValueError("the conversation has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise ValueError(f'message {i} must be a dict with "role" and "content", got {m!r}')
    return messages


def _merge_system(messages: list[dict]) -> list[dict]:
    """nanochat has no system turn: the system text is prepended to the first user message."""
    if messages[0]["role"] != "system":
        return messages
    system = messages[0]["content"]
    if not isinstance(system, str):
        raise ValueError("the system message content must be a string")
    if len(messages) < 2 or messages[1]["role"] != "user":
        raise ValueError("a system message must be followed by a user message")
    first = dict(messages[1])
    if not isinstance(first["content"], str):
        raise ValueError("message 1 (user): user content must be a string")
    first["content"] = system + "\n\n" + first["content"]
    return [first, *messages[2:]]


def _check_turns(messages: list[dict]) -> None:
    for i, m in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if m["role"] != expected:
            where = "after the system merge, " if m["role"] == "system" else ""
            raise ValueError(f"{where}message {i} has role {m['role']!r}, expected {expected!r}: roles must alternate user, assistant, ... (a system message may only come first)")
        content = m["content"]
        if expected == "user" and not isinstance(content, str):
            raise ValueError(f"message {i} (user): user content must be a string, got {type(content).__name__}")
        # Empty content (a string or a list of no parts) renders as the reference renders it: the turn's markers only.
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise ValueError(f"message {i} (assistant): content must be a string or a list of parts")
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") not in PART_TYPES or not isinstance(part.get("text"), str):
                raise ValueError(f'message {i} part {j}: expected {{"type": one of {PART_TYPES}, "text": str}}, got {part!r}')


def _assistant_parts(content: str | list[dict]) -> list[tuple[str, str]]:
    return [("text", content)] if isinstance(content, str) else [(p["type"], p["text"]) for p in content]


def _render(tokenizer: Tokenizer, messages: list[dict]) -> tuple[list[int], list[int]]:
    sid = tokenizer.special_id
    ids: list[int] = [tokenizer.bos_id]
    mask: list[int] = [0]

    def emit(tokens: list[int], supervised: int) -> None:
        ids.extend(tokens)
        mask.extend([supervised] * len(tokens))

    for m in messages:
        if m["role"] == "user":
            emit([sid("<|user_start|>"), *tokenizer.encode(m["content"]), sid("<|user_end|>")], 0)
            continue
        # The model is prompted with <|assistant_start|>, so it never has to predict it: mask 0.
        emit([sid("<|assistant_start|>")], 0)
        for kind, text in _assistant_parts(m["content"]):
            if kind == "text":
                emit(tokenizer.encode(text), 1)
            elif kind == "python":
                emit([sid("<|python_start|>"), *tokenizer.encode(text), sid("<|python_end|>")], 1)
            else:  # python_output is written by the tool at inference time, not by the model
                emit([sid("<|output_start|>"), *tokenizer.encode(text), sid("<|output_end|>")], 0)
        # Ending its turn is a decision the model must learn: mask 1.
        emit([sid("<|assistant_end|>")], 1)
    return ids, mask


def render_conversation(tokenizer: Tokenizer, conversation: dict, max_tokens: int = 2048) -> tuple[list[int], list[int]]:
    """Conversation -> (ids, mask), mask 1 where the model is trained to predict the token.

    Layout: <|bos|> then per turn <|user_start|> text <|user_end|> or <|assistant_start|> parts
    <|assistant_end|>; assistant parts are text, <|python_start|> code <|python_end|>, or
    <|output_start|> tool output <|output_end|>. Truncated to `max_tokens`.
    """
    messages = _merge_system(_messages(conversation))
    _check_turns(messages)
    ids, mask = _render(tokenizer, messages)
    return ids[:max_tokens], mask[:max_tokens]


def render_for_completion(tokenizer: Tokenizer, conversation: dict) -> list[int]:
    """Prompt ids ending in <|assistant_start|>, for the model to write the next assistant turn.

    A final assistant message (e.g. an eval's reference answer) is dropped first, as in nanochat;
    a conversation ending with the user's turn is used as is.
    """
    messages = copy.deepcopy(_messages(conversation))
    if messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages:
        raise ValueError("nothing left to complete: the conversation held only an assistant message")
    messages = _merge_system(messages)
    _check_turns(messages)
    if messages[-1]["role"] != "user":
        raise ValueError("render_for_completion needs the conversation to end with a user turn (optionally followed by the assistant turn to drop)")
    ids, _ = _render(tokenizer, messages)
    return ids + [tokenizer.special_id("<|assistant_start|>")]
