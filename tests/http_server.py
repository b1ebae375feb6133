"""A loopback HTTP file server for tests: Range requests, a request log, and injectable faults.

    with FileServer({"a.bin": b"..."}) as srv:      # or FileServer(some_dir)
        srv.fail("a.bin", times=2)                  # first two GETs answer 500
        srv.truncate("a.bin", after=100)            # then one body cut short under a full Content-Length
        fetch(srv.url("a.bin"), dest)
        assert srv.ranges("a.bin")                  # the client resumed with a Range header

Faults are queued per path and consumed one per request, in the order they were added; once a
path's queue is empty it is served normally. Paths not registered (and not in the directory)
answer 404. The server listens on 127.0.0.1 with an ephemeral port, in a daemon thread.
Tests import it as `from http_server import FileServer` (pytest puts tests/ on sys.path).
"""
import collections
import dataclasses
import socket
import struct
import threading
import time
from collections.abc import Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest


@dataclasses.dataclass(frozen=True)
class Logged:
    method: str
    path: str
    range: str | None
    status: int
    fault: str | None


@dataclasses.dataclass(frozen=True)
class _Fault:
    kind: str  # status | drop | truncate | corrupt | stall
    status: int = 500
    after: int = 0
    seconds: float = 0.0


class FileServer:
    def __init__(self, files: Mapping[str, bytes] | Path | None = None, *, ranges: bool = True):
        self._lock = threading.Lock()
        self.root = Path(files) if isinstance(files, (str, Path)) else None
        self.files: dict[str, tuple[bytes, str]] = {}
        for path, data in (files.items() if isinstance(files, Mapping) else ()):
            self.add(path, data)
        self.ranges_supported = ranges
        self.log: list[Logged] = []
        self._faults: dict[str, collections.deque[_Fault]] = collections.defaultdict(collections.deque)
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- content -------------------------------------------------------------------------------
    def add(self, path: str, data: bytes, content_type: str | None = None) -> None:
        """Serve `data` at `path` (may be called while running)."""
        ctype = content_type or ("application/json" if path.endswith(".json") else "application/octet-stream")
        with self._lock:
            self.files[_norm(path)] = (bytes(data), ctype)

    def remove(self, path: str) -> None:
        with self._lock:
            self.files.pop(_norm(path), None)

    # -- faults (each affects the next `times` requests for the path) -----------------------------
    def fail(self, path: str, times: int = 1, status: int = 500) -> None:
        """Answer `status` (500, 404, 429, ...) with an empty body."""
        self._queue(path, times, _Fault("status", status=status))

    def drop(self, path: str, after: int, times: int = 1) -> None:
        """Send the headers and `after` body bytes, then reset the connection (TCP RST)."""
        self._queue(path, times, _Fault("drop", after=after))

    def truncate(self, path: str, after: int, times: int = 1) -> None:
        """Advertise the full Content-Length but send only `after` bytes, then close cleanly."""
        self._queue(path, times, _Fault("truncate", after=after))

    def corrupt(self, path: str, times: int = 1) -> None:
        """Send the right number of bytes, every one of them flipped."""
        self._queue(path, times, _Fault("corrupt"))

    def stall(self, path: str, seconds: float, times: int = 1) -> None:
        """Wait `seconds` before answering (to provoke client timeouts)."""
        self._queue(path, times, _Fault("stall", seconds=seconds))

    def _queue(self, path: str, times: int, fault: _Fault) -> None:
        with self._lock:
            self._faults[_norm(path)].extend([fault] * times)

    def _next_fault(self, path: str) -> _Fault | None:
        with self._lock:
            queue = self._faults.get(path)
            return queue.popleft() if queue else None

    # -- inspection ----------------------------------------------------------------------------
    def requests(self, path: str | None = None) -> list[Logged]:
        with self._lock:
            return [r for r in self.log if path is None or r.path == _norm(path)]

    def ranges(self, path: str) -> list[str]:
        """The Range headers the client sent for `path`."""
        return [r.range for r in self.requests(path) if r.range]

    # -- lifecycle -----------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        if self._httpd is None:
            raise RuntimeError("FileServer is not running; use it as a context manager or call start()")
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def url(self, path: str) -> str:
        return self.base_url + _norm(path)

    def start(self) -> "FileServer":
        self._httpd = _QuietServer(("127.0.0.1", 0), _make_handler(self))
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._thread.join()
            self._httpd = None

    def __enter__(self) -> "FileServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- serving -------------------------------------------------------------------------------
    def _lookup(self, path: str) -> tuple[bytes, str] | None:
        with self._lock:
            if path in self.files:
                return self.files[path]
        if self.root is not None:
            candidate = (self.root / path.lstrip("/")).resolve()
            if candidate.is_file() and candidate.is_relative_to(self.root.resolve()):
                return candidate.read_bytes(), "application/octet-stream"
        return None

    def _record(self, entry: Logged) -> None:
        with self._lock:
            self.log.append(entry)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients that time out or hang up mid-body are the point of these tests


_FLIP = bytes(range(255, -1, -1))  # maps every byte b to 255 - b == b ^ 0xFF


def _norm(path: str) -> str:
    return "/" + path.split("?", 1)[0].lstrip("/")


def _parse_range(header: str, size: int) -> tuple[int, int] | None:
    """`bytes=S-`, `bytes=S-E` or `bytes=-N` -> inclusive (start, end); None if unsatisfiable."""
    spec = header.removeprefix("bytes=").split(",", 1)[0].strip()
    first, last = spec.split("-", 1)
    if not first:
        start, end = max(0, size - int(last)), size - 1
    else:
        start, end = int(first), min(int(last), size - 1) if last else size - 1
    return (start, end) if start < size and start <= end else None


def _make_handler(server: FileServer):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep test output quiet
            pass

        def do_HEAD(self):
            self._serve(body=False)

        def do_GET(self):
            self._serve(body=True)

        def _serve(self, body: bool):
            self.close_connection = True
            path, rng = _norm(self.path), self.headers.get("Range")
            fault = server._next_fault(path)
            if fault and fault.kind == "stall":
                time.sleep(fault.seconds)
            found = server._lookup(path)
            if fault and fault.kind == "status":
                return self._empty(path, rng, fault.status, "status")
            if found is None:
                return self._empty(path, rng, 404, None)
            data, ctype = found
            if fault and fault.kind == "corrupt":
                data = data.translate(_FLIP)
            status, headers, data = self._ranged(data, rng)
            server._record(Logged(self.command, path, rng, status, fault.kind if fault else None))
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("Accept-Ranges", "bytes" if server.ranges_supported else "none")
            for key, value in headers.items():
                self.send_header(key, value)
            self.end_headers()
            if not body:
                return
            if fault and fault.kind in ("drop", "truncate"):
                self.wfile.write(data[: fault.after])
                self.wfile.flush()
                if fault.kind == "drop":
                    # SO_LINGER 0: close() sends RST, so the client sees a reset, not a clean EOF.
                    self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                    self.connection.close()
                return
            self.wfile.write(data)

        def _ranged(self, data: bytes, rng: str | None) -> tuple[int, dict, bytes]:
            if not rng or not server.ranges_supported:
                return 200, {}, data
            span = _parse_range(rng, len(data))
            if span is None:
                return 416, {"Content-Range": f"bytes */{len(data)}"}, b""
            start, end = span
            return 206, {"Content-Range": f"bytes {start}-{end}/{len(data)}"}, data[start : end + 1]

        def _empty(self, path: str, rng: str | None, status: int, fault: str | None):
            server._record(Logged(self.command, path, rng, status, fault))
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

    return Handler


@pytest.fixture
def file_server():
    """A running, empty FileServer; add content with `file_server.add(path, data)`."""
    with FileServer() as srv:
        yield srv
