"""The English word list behind SpellingBee and SimpleSpelling (nanochat-reference.md §6.4).

The reference downloads dwyl/english-words' `words_alpha.txt` (~370K lowercase words, CRLF line endings).
`load_words()` looks for it as `$JAXCHAT_HOME/words_alpha.txt` and downloads it there when missing; when it can have
neither it raises WordListUnavailable naming the command that fetches it:

    python -m jaxchat.tasks.words            # or `python -m jaxchat.data.hub fetch-all`, which fetches it too
    JAXCHAT_WORDS_URL     replaces the download URL (mirrors, tests)
    JAXCHAT_OFFLINE=1     never download (HF_HUB_OFFLINE=1 too, as for the hub datasets)

There is no silent fallback: a recipe whose spelling tasks drew from a few hundred words instead of 370K would train
on different data without saying so. The tiny recipe asks for `fallback_words()` (the embedded corpus's vocabulary)
by name: its `tiny` mixture and the TinySpellingBee eval pass them as `words=`, so it runs offline everywhere.
"""
from __future__ import annotations

import argparse
import functools
import os
import random
import re
import sys
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


FETCH_COMMAND = "python -m jaxchat.tasks.words"


class WordListError(ValueError):
    """A word-list file that is not a list of lowercase a–z words."""


class WordListUnavailable(FileNotFoundError):
    """The word list is not on disk and could not be downloaded; the message names the command that fetches it."""


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


def _unavailable(reason: str, dest: Path) -> WordListUnavailable:
    return WordListUnavailable(
        f"the spelling tasks need the word list {dest}, which is missing and {reason}. Fetch it where "
        f"{WORDS_URL} is reachable: `{FETCH_COMMAND}` (or `python -m jaxchat.data.hub fetch-all`), or place "
        f"{WORDS_FILENAME} there by hand. (The tiny recipe's spelling tasks use the embedded corpus's words instead.)")


def fetch_words(url: str | None = None, *, dest: str | os.PathLike | None = None, retries: int = 3,
                backoff: float = 1.0, timeout: float = 30) -> Path:
    """Download the list to `dest` unless a copy that passes verify_word_file is there (a damaged or truncated copy
    is replaced). Raises FetchError."""
    dest = Path(dest) if dest is not None else words_path()
    return fetch(url or words_url(), dest, verify=verify_word_file, retries=retries, backoff=backoff, timeout=timeout)


def load_words(url: str | None = None, *, dest: str | os.PathLike | None = None, retries: int = 3,
               backoff: float = 1.0, timeout: float = 30) -> list[str]:
    """The word list: `dest` (default `$JAXCHAT_HOME/words_alpha.txt`) if present, else downloaded from `url`
    (default `$JAXCHAT_WORDS_URL` or dwyl's list), else WordListUnavailable naming the command that fetches it.

    A present file is used as it is (a short list placed on purpose is the user's choice); one that is not a word
    list is a WordListError naming the fix.
    """
    dest = Path(dest) if dest is not None else words_path()
    if dest.exists():
        try:
            return read_words(dest)
        except (WordListError, UnicodeDecodeError) as e:
            raise WordListError(f"{e}. Delete it and run `{FETCH_COMMAND}` to fetch the list again") from None
    if offline():
        raise _unavailable("offline mode is on (JAXCHAT_OFFLINE / HF_HUB_OFFLINE)", dest)
    try:
        fetch_words(url, dest=dest, retries=retries, backoff=backoff, timeout=timeout)
    except (FetchError, OSError) as e:
        first_line = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise _unavailable(f"could not be downloaded ({first_line})", dest) from None
    return read_words(dest)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m jaxchat.tasks.words",
                                 description=f"Download the spelling tasks' word list to {words_path()}.")
    ap.add_argument("--url", default=None, help=f"default: $JAXCHAT_WORDS_URL or {WORDS_URL}")
    ap.add_argument("--retries", type=int, default=3)
    args = ap.parse_args(argv)
    try:
        path = fetch_words(args.url, retries=args.retries)
    except FetchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"{len(read_words(path)):,} words in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
