"""A localhost HTTP file server that adds a fixed latency to every request: how shards and per-file caches
behave on object storage or a remote file server, for the loader benchmark and the tests.

It listens on 127.0.0.1 only, serves one folder read-only (GET and HEAD, no listings), and is bounded: it stops
by itself after `max_requests` requests or `max_seconds` seconds, whichever comes first (later requests are
refused), and when its `with` block ends.
"""
from __future__ import annotations

import threading
import time
from http import HTTPStatus
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any


class _Handler(SimpleHTTPRequestHandler):
    server: "_Server"
    protocol_version = "HTTP/1.1"  # keep-alive: clients reuse connections, as they do with object stores

    def do_GET(self) -> None:  # noqa: N802 - the http.server API
        if self.server.admit():
            start = time.thread_time()
            super().do_GET()
            self.server.count_cpu(time.thread_time() - start)
        else:
            self.send_error(HTTPStatus.SERVICE_UNAVAILABLE, "request budget spent")

    def do_HEAD(self) -> None:  # noqa: N802
        if self.server.admit():
            super().do_HEAD()
        else:
            self.send_error(HTTPStatus.SERVICE_UNAVAILABLE, "request budget spent")

    def list_directory(self, path: Any) -> None:
        self.send_error(HTTPStatus.NOT_FOUND, "no listings")
        return None

    def copyfile(self, source: Any, outputfile: Any) -> None:
        self.connection.sendfile(source)  # zero-copy, so the server costs the measured reader little CPU

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        pass


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # the default backlog of 5 drops concurrent connects (clients retry after 1, 3, 7 s)

    def __init__(self, root: Path, latency: float, max_requests: int, deadline: float):
        super().__init__(("127.0.0.1", 0), lambda *a: _Handler(*a, directory=str(root)))
        self.latency, self.max_requests, self.deadline = latency, max_requests, deadline
        self.requests, self.lock = 0, threading.Lock()
        self.cpu = 0.0  # CPU seconds spent serving GETs (not the latency's sleep)

    def count_cpu(self, seconds: float) -> None:
        with self.lock:
            self.cpu += seconds

    def admit(self) -> bool:
        """Count the request and wait out the latency; False once the budget of requests or time is spent."""
        with self.lock:
            self.requests += 1
            over = self.requests > self.max_requests or time.monotonic() > self.deadline
        if over:
            threading.Thread(target=self.shutdown, daemon=True).start()
            return False
        time.sleep(self.latency)
        return True


class LatencyServer:
    """`with LatencyServer(folder, latency_ms=20) as url:` serves `folder` at `url` (http://127.0.0.1:PORT)."""

    def __init__(self, root: Path | str, latency_ms: float = 20.0, max_requests: int = 1_000_000,
                 max_seconds: float = 3600.0):
        if not Path(root).is_dir():
            raise NotADirectoryError(root)
        if not (0 <= latency_ms <= 10_000 and max_requests > 0 and max_seconds > 0):
            raise ValueError("latency_ms must be in 0..10000, max_requests and max_seconds positive")
        self.root, self.latency = Path(root), latency_ms / 1000
        self.max_requests, self.max_seconds = max_requests, max_seconds
        self.server: _Server | None = None

    @property
    def requests(self) -> int:
        return self.server.requests if self.server is not None else 0

    @property
    def cpu(self) -> float:
        """CPU seconds its threads spent serving GETs so far (a reader in the same process subtracts them)."""
        return self.server.cpu if self.server is not None else 0.0

    def __enter__(self) -> str:
        deadline = time.monotonic() + self.max_seconds
        self.server = _Server(self.root, self.latency, self.max_requests, deadline)
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        self.timer = threading.Timer(self.max_seconds, self.server.shutdown)
        self.timer.daemon = True
        self.timer.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc: Any) -> None:
        self.timer.cancel()
        self.server.shutdown()
        self.server.server_close()
