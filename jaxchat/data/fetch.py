"""Robust HTTP download of one file: resume, retry with backoff, verify, atomic rename.

Used for pretraining shards, task parquet files and the CORE eval bundle. Standard library only.

- Bytes stream into `<dest>.part`. A later attempt asks for the rest with `Range: bytes=N-`; a
  server answering 206 continues the file, one answering 200 (no range support) restarts it.
- Connection errors, timeouts, 5xx/408/429 and bodies shorter than the server announced are
  retried with exponential backoff (`backoff * 2**k` seconds). Other 4xx fail at once: asking
  again for a missing file only hides a wrong URL.
- `verify(part)` runs before the rename, so `dest` only ever holds a file that passed it; a file
  failing it is deleted and fetched again (that costs one retry).
"""
import http.client
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

CHUNK = 1 << 20
USER_AGENT = "jaxchat-fetch/1.0"
RETRYABLE_STATUS = frozenset({408, 429})
MAX_SLEEP_S = 60.0

_NETWORK_ERRORS = (
    urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError, ssl.SSLError,
)


class FetchError(RuntimeError):
    """A download that failed for good (retries used up, or a permanent HTTP error)."""

    def __init__(self, url: str, message: str, status: int | None = None):
        super().__init__(message)
        self.url = url
        self.status = status


class DamagedFileError(FileNotFoundError):
    """A data file that is present but unreadable (truncated, corrupt, wrong size or checksum). It counts as missing
    (so whatever handles a missing file handles it too); the message names the file, what is wrong with it and the
    command that fetches it again, which replaces damaged files it finds."""

    def __init__(self, path, problem: str, command: str):
        super().__init__(f"{path} is damaged: {problem}. Fetch it again with `{command}` (it replaces damaged files)")
        self.path, self.problem, self.command = Path(path), problem, command


class _Retry(Exception):
    """One attempt failed in a way that another attempt may fix."""

    def __init__(self, reason: str, wait_s: float | None = None):
        super().__init__(reason)
        self.wait_s = wait_s  # the server's Retry-After, when it sent one


def part_path(dest: Path) -> Path:
    return dest.with_suffix(dest.suffix + ".part")


def fetch(
    url: str,
    dest: Path,
    *,
    verify: Callable[[Path], None] | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float = 30,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Download `url` to `dest` (skipped when `dest` exists and passes `verify`); returns `dest`.

    `verify(path)` raises any exception to reject a file. `progress(n)` is called with the number
    of new bytes after every chunk written. `retries` counts attempts after the first.
    """
    dest = Path(dest)
    if dest.exists():
        try:
            if verify is not None:
                verify(dest)
            return dest
        except Exception:
            dest.unlink()  # a bad file must never be used; fetch it again below
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    failures: list[str] = []
    wait_s = None
    for attempt in range(retries + 1):
        if attempt:
            _sleep_before_retry(attempt, backoff, wait_s)
        try:
            _download_once(url, part, timeout, progress)
            if verify is not None:
                _verify_or_discard(verify, part)
            os.replace(part, dest)
            return dest
        except _Retry as e:
            failures.append(str(e))
            wait_s = e.wait_s
    # First line: a summary fit for one-line reports; then every attempt, for the curious.
    attempts = "".join(f"\n  attempt {k + 1}: {f}" for k, f in enumerate(failures))
    raise FetchError(url, f"GET {url} failed after {len(failures)} attempt(s); last error: {failures[-1]}{attempts}")


def _sleep_before_retry(attempt: int, backoff: float, wait_s: float | None) -> None:
    delay = backoff * 2 ** (attempt - 1)
    if wait_s is not None:
        delay = max(delay, wait_s)
    time.sleep(min(delay, MAX_SLEEP_S))


def _verify_or_discard(verify: Callable[[Path], None], part: Path) -> None:
    try:
        verify(part)
    except Exception as e:
        part.unlink(missing_ok=True)  # resuming onto bad bytes would keep them forever
        raise _Retry(f"downloaded file failed verification ({type(e).__name__}: {e})") from e


def _download_once(url: str, part: Path, timeout: float, progress: Callable[[int], None] | None) -> None:
    """One GET into `part`, continuing it when it already holds bytes. Raises _Retry or FetchError."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": USER_AGENT}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout) as resp:
            offset, expected = _plan_write(resp, have)  # offset 0 on a 200: start over
            _stream(resp, part, offset, progress)
    except urllib.error.HTTPError as e:
        _raise_for_status(url, e, part, have)
    except _NETWORK_ERRORS as e:
        raise _Retry(f"{type(e).__name__}: {e}") from e
    got = part.stat().st_size
    if expected is not None and got != expected:
        raise _Retry(f"body truncated: have {got:,} of {expected:,} bytes")


def _plan_write(resp, have: int) -> tuple[int, int | None]:
    """(offset to write at, expected final size or None) from the response's status and headers."""
    if resp.status == 206:
        start, total = _parse_content_range(resp.headers.get("Content-Range"))
        if start == have:
            return have, total
        raise _Retry(f"server resumed at byte {start}, expected {have}")
    length = resp.headers.get("Content-Length")
    return 0, int(length) if length is not None else None


def _parse_content_range(value: str | None) -> tuple[int, int | None]:
    """`bytes 100-199/200` -> (100, 200); an unknown total (`/*`) -> None."""
    try:
        unit, rest = value.split(" ", 1)
        span, total = rest.split("/", 1)
        assert unit == "bytes"
        return int(span.split("-", 1)[0]), None if total.strip() == "*" else int(total)
    except Exception as e:
        raise _Retry(f"unparseable Content-Range {value!r}") from e


def _stream(resp, part: Path, offset: int, progress: Callable[[int], None] | None) -> None:
    with open(part, "ab" if offset else "wb") as f:
        # read1, not read: read(n) blocks for all n bytes and loses what it had if the connection
        # then resets; read1 hands over whatever arrived, so a resume starts after it.
        while chunk := resp.read1(CHUNK):
            f.write(chunk)
            if progress is not None:
                progress(len(chunk))


def _raise_for_status(url: str, e: urllib.error.HTTPError, part: Path, have: int) -> None:
    if e.code == 416 and have:
        # Our offset is at or past the end: the .part is stale or oversized, so restart it.
        part.unlink(missing_ok=True)
        raise _Retry(f"HTTP 416 for a resume at byte {have}; restarting from zero") from e
    if e.code >= 500 or e.code in RETRYABLE_STATUS:
        raise _Retry(f"HTTP {e.code} {e.reason}", _retry_after(e.headers)) from e
    raise FetchError(
        url,
        f"GET {url} failed with HTTP {e.code} {e.reason}; not retrying a client error — "
        f"check the URL (base URL, dataset or file name) and any required access",
        status=e.code,
    ) from None


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None  # an HTTP date: fall back to our own backoff
