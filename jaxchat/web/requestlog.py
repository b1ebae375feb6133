"""The request log: one JSON line per API request, written when its response has been sent (a stream: its last byte).

Each line: time, id, method, route, status, key (the API key's id, never the key), client, user, stream, n,
prompt_tokens, completion_tokens, ttft_s, duration_s, finish_reasons, error. The prompt and the completions'
text are written only with `log_prompts` (serve.py's --log-prompts): by default nothing a user typed is kept.
"""
from __future__ import annotations

import json
import sys
import threading
import time
from pathlib import Path
from typing import TextIO

TEXT_FIELDS = ("prompt", "completions")


class RequestLog:
    def __init__(self, out: TextIO | str | Path = "-", *, log_prompts: bool = False):
        self.log_prompts = log_prompts
        self._own = not hasattr(out, "write") and str(out) != "-"
        if self._own:
            Path(out).parent.mkdir(parents=True, exist_ok=True)
        self._out = (sys.stdout if str(out) == "-" else open(out, "a", encoding="utf-8")) if not hasattr(
            out, "write") else out
        self._lock = threading.Lock()

    def write(self, record: dict) -> None:
        line = {"time": round(time.time(), 3), **{k: v for k, v in record.items()
                                                   if self.log_prompts or k not in TEXT_FIELDS}}
        text = json.dumps(line, ensure_ascii=False, default=str)
        with self._lock:
            self._out.write(text + "\n")
            self._out.flush()

    def close(self) -> None:
        if self._own:
            self._out.close()
