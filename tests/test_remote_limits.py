"""Issue 24: every read of remote input has a size limit: a server streaming an endless manifest.json (or one
announcing a huge one) is refused in one line after at most the limit, not read into memory."""
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from shared.core.errors import InputError
from shared.formats import location


class Endless(BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 - the http.server API
        self.send_response(200)
        if self.path.endswith("/huge/manifest.json"):
            self.send_header("Content-Length", str(2 ** 40))   # announced, never sent
            self.end_headers()
            return
        self.end_headers()                                      # no length: until the connection closes
        try:
            while True:
                self.wfile.write(b'{"stage": "encode", ' * 4096)
        except (BrokenPipeError, ConnectionResetError):
            pass

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Endless)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_an_endless_or_huge_remote_manifest_is_refused_at_the_limit(server, monkeypatch):
    monkeypatch.setattr(location, "MANIFEST_LIMIT", 4 * 2 ** 20)
    for folder in (f"{server}/endless", f"{server}/huge"):
        started = time.monotonic()
        with pytest.raises(InputError, match="manifest.json: unreadable .*larger than"):
            location.require_remote(folder, "encode")
        assert time.monotonic() - started < 10
    with pytest.raises(OSError, match="larger than the 10 bytes"):
        location.read_bytes(f"{server}/endless/x", limit=10)
