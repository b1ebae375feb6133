"""Running the app: uvicorn with a graceful drain on SIGTERM (serve.py), or in a thread (tests and benchmarks).

On SIGTERM (or Ctrl-C) the server keeps listening but admits nothing new: generation requests get 503 with
`Retry-After` and `/health` says "draining" (so a load balancer moves on), while the requests in flight run on for up
to `drain_timeout` seconds; any still running then end with a clean final chunk (`finish_reason: "length"`, then
`[DONE]`), uvicorn closes the connections once their responses are complete, and the process exits 0. A second signal
stops at once, as uvicorn does.
"""
from __future__ import annotations

import logging
import signal
import socket
import threading
import time

import uvicorn

log = logging.getLogger("jaxchat.serve")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, backend, drain_timeout: float):
        super().__init__(config)
        self.backend, self.drain_timeout = backend, drain_timeout
        self.drain_thread: threading.Thread | None = None
        self.drained: dict | None = None

    def handle_exit(self, sig: int, frame) -> None:
        if self.drain_thread is None and not self.should_exit:
            # Not recorded as a captured signal: uvicorn would re-raise it after the shutdown and the process would
            # die by it instead of exiting 0.
            log.warning("%s: draining (no new requests; up to %.0f s for the ones in flight)",
                        signal.Signals(sig).name, self.drain_timeout)
            self.drain_thread = threading.Thread(target=self.drain, name="jaxchat-drain", daemon=True)
            self.drain_thread.start()
            return
        super().handle_exit(sig, frame)

    def drain(self) -> None:
        try:
            self.drained = self.backend.drain(self.drain_timeout)
        finally:
            self.should_exit = True  # uvicorn's shutdown then waits for the open responses to send their last chunk


class ServerThread:
    """uvicorn serving `app` on host:port (0 = a free port) in a daemon thread; for tests and benchmarks."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = host, self.socket.getsockname()[1]
        self.url = f"http://{host}:{self.port}"
        config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2, backlog=2048)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True,
                                       name="jaxchat-uvicorn")

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(10)
        self.socket.close()
