"""Per-key rate limits: requests per minute and tokens per minute, as token buckets.

Each key (an API key's id, or the client's address on a server without keys) has two buckets holding up to a minute's
allowance and refilling continuously. A request is admitted when its request bucket holds one request and its token
bucket is not in debt; it pays one request at once, its prompt tokens at admission and its completion tokens as they
are counted at the end, so a long reply can put the key in debt and its next request waits for the refill. A refusal
says how many seconds until the request would be admitted (`Retry-After`).
"""
from __future__ import annotations

import dataclasses
import math
import threading
import time
from collections.abc import Callable

MAX_KEYS = 10_000  # buckets kept before idle (full) ones are forgotten: per-address keys must not grow without bound


@dataclasses.dataclass
class _Buckets:
    requests: float
    tokens: float
    updated: float


class RateLimiter:
    """`admit(key)` -> None (go ahead) or the seconds to wait; `charge(key, tokens)` after the fact."""

    def __init__(self, requests_per_minute: float | None = None, tokens_per_minute: float | None = None,
                 clock: Callable[[], float] = time.monotonic):
        for name, value in (("requests_per_minute", requests_per_minute), ("tokens_per_minute", tokens_per_minute)):
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be positive (or None for no limit), got {value}")
        self.rpm, self.tpm, self.clock = requests_per_minute, tokens_per_minute, clock
        self._keys: dict[str, _Buckets] = {}
        self._lock = threading.Lock()

    @property
    def enabled(self) -> bool:
        return self.rpm is not None or self.tpm is not None

    def _refilled(self, key: str) -> _Buckets:
        now = self.clock()
        b = self._keys.get(key)
        if b is None:
            if len(self._keys) >= MAX_KEYS:
                self._forget_idle(now)
            b = self._keys[key] = _Buckets(self.rpm or 0.0, self.tpm or 0.0, now)
        dt = max(0.0, now - b.updated)
        if self.rpm is not None:
            b.requests = min(self.rpm, b.requests + dt * self.rpm / 60)
        if self.tpm is not None:
            b.tokens = min(self.tpm, b.tokens + dt * self.tpm / 60)
        b.updated = now
        return b

    def _forget_idle(self, now: float) -> None:
        def idle(b: _Buckets) -> bool:
            dt = now - b.updated
            return ((self.rpm is None or b.requests + dt * self.rpm / 60 >= self.rpm)
                    and (self.tpm is None or b.tokens + dt * self.tpm / 60 >= self.tpm))

        for key in [k for k, b in self._keys.items() if idle(b)]:
            del self._keys[key]

    def admit(self, key: str) -> float | None:
        """Take one request from `key`'s allowance, or return the seconds until it could (nothing taken)."""
        if not self.enabled:
            return None
        with self._lock:
            b = self._refilled(key)
            wait = 0.0
            if self.rpm is not None and b.requests < 1:
                wait = (1 - b.requests) * 60 / self.rpm
            if self.tpm is not None and b.tokens <= 0:
                wait = max(wait, (1 - b.tokens) * 60 / self.tpm)
            if wait > 0:
                return wait
            if self.rpm is not None:
                b.requests -= 1
            return None

    def charge(self, key: str, tokens: int) -> None:
        if self.tpm is None or tokens <= 0:
            return
        with self._lock:
            self._refilled(key).tokens -= tokens

    def describe(self) -> str:
        parts = [f"{self.rpm:g} requests" if self.rpm else "", f"{self.tpm:g} tokens" if self.tpm else ""]
        return " and ".join(p for p in parts if p) + " per minute per key"


def retry_after(seconds: float) -> str:
    """The Retry-After header's whole seconds, never 0 (a client would retry at once and be refused again)."""
    return str(max(1, math.ceil(seconds)))
