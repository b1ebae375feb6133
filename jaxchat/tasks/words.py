"""The English word list behind SpellingBee and SimpleSpelling (nanochat-reference.md §6.4).

The reference downloads dwyl/english-words' `words_alpha.txt` (~370K lowercase words, CRLF line endings).
`load_words()` looks for it as `$JAXCHAT_HOME/words_alpha.txt`, downloads it there when missing, and otherwise
falls back to the vocabulary of the embedded tiny corpus (a few hundred words), warning which file to place.

    JAXCHAT_WORDS_URL     replaces the download URL (mirrors, tests)
    JAXCHAT_OFFLINE=1     never download (HF_HUB_OFFLINE=1 too, as for the hub datasets)

The fallback exists so the tiny offline recipe and the tests run anywhere; the spelling tasks then draw from far
fewer words, so their examples differ from a run with the full list.
"""
from __future__ import annotations

import functools
import os
import random
import re
import warnings
from pathlib import Path

from jaxchat import paths
from jaxchat.data.fetch import FetchError, fetch

WORDS_URL = "https://raw.githubusercontent.com/dwyl/english-words/refs/heads/master/words_alpha.txt"
WORDS_FILENAME = "words_alpha.txt"
# The real list has 370,105 words; anything far smaller is an error page or a truncated mirror, not the list.
MIN_DOWNLOADED_WORDS = 10_000
FALLBACK_MIN_LEN = 3
FALLBACK_DOCS = 2000  # the vocabulary saturates by ~1000 documents (508 words); twice that for margin
_WORD = re.compile(r"[a-z]+")


class WordListError(ValueError):
    """A word-list file that is not a list of lowercase a–z words."""


def words_path() -> Path:
    return paths.home() / WORDS_FILENAME


def words_url() -> str:
    return os.environ.get("JAXCHAT_WORDS_URL") or WORDS_URL


def offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes") for k in ("JAXCHAT_OFFLINE", "HF_HUB_OFFLINE"))


def parse_words(text: str, source: str = "word list", min_words: int = 1) -> list[str]:
    """One word per line (LF or CRLF, blank lines ignored); every word lowercase a–z."""
    words = []
    for lineno, line in enumerate(text.splitlines(), 1):
        word = line.strip()
        if word and not _WORD.fullmatch(word):
            raise WordListError(f"{source}: line {lineno} is {word[:40]!r}; expected one lowercase a-z word per line")
        if word:
            words.append(word)
    if len(words) < min_words:
        raise WordListError(f"{source}: only {len(words):,} words; expected at least {min_words:,} "
                            f"(is it {WORDS_FILENAME}?)")
    return words


def verify_word_file(path: Path) -> None:
    """fetch()'s verify hook: reject an HTML error page or a truncated list before it is renamed into place."""
    parse_words(Path(path).read_text(encoding="utf-8", errors="strict"), str(path), MIN_DOWNLOADED_WORDS)


@functools.lru_cache(maxsize=4)
def _read_cached(path: str, mtime_ns: int, size: int) -> tuple[str, ...]:
    # Keyed on mtime and size so a replaced file is read again, while the several tasks of one mixture share one read.
    return tuple(parse_words(Path(path).read_text(encoding="utf-8"), path))


def read_words(path: str | os.PathLike) -> list[str]:
    st = Path(path).stat()
    return list(_read_cached(str(path), st.st_mtime_ns, st.st_size))


@functools.lru_cache(maxsize=1)
def fallback_words() -> tuple[str, ...]:
    """Distinct lowercase words (length >= 3) of the embedded tiny corpus, sorted; deterministic and offline."""
    from jaxchat.data import tiny_corpus  # pyarrow comes with it; only pay for that on the fallback path

    rng = random.Random("jaxchat-words-fallback")
    words = set()
    for _ in range(FALLBACK_DOCS):
        words.update(w for w in _WORD.findall(tiny_corpus.document(rng).lower()) if len(w) >= FALLBACK_MIN_LEN)
    return tuple(sorted(words))


def _warn_fallback(reason: str, dest: Path) -> None:
    warnings.warn(
        f"{reason}; using the {len(fallback_words())} words of the embedded tiny corpus instead. For the full list, "
        f"place {WORDS_FILENAME} (from {WORDS_URL}) at {dest}",
        RuntimeWarning, stacklevel=3,
    )


def load_words(url: str | None = None, *, dest: str | os.PathLike | None = None, retries: int = 3,
               backoff: float = 1.0, timeout: float = 30) -> list[str]:
    """The word list: `dest` (default `$JAXCHAT_HOME/words_alpha.txt`) if present, else downloaded from `url`
    (default `$JAXCHAT_WORDS_URL` or dwyl's list), else the tiny-corpus fallback with a warning.

    A present file that is not a word list is an error rather than a fallback: it was put there on purpose.
    """
    dest = Path(dest) if dest is not None else words_path()
    if dest.exists():
        return read_words(dest)
    if offline():
        _warn_fallback(f"no {dest} and offline mode is on (JAXCHAT_OFFLINE / HF_HUB_OFFLINE)", dest)
        return list(fallback_words())
    url = url or words_url()
    try:
        fetch(url, dest, verify=verify_word_file, retries=retries, backoff=backoff, timeout=timeout)
    except (FetchError, OSError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        _warn_fallback(f"could not download the word list ({first_line})", dest)
        return list(fallback_words())
    return read_words(dest)
