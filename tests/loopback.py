"""Loopback HTTP servers standing in for the Hugging Face Hub, download.pytorch.org or a broken mirror, and the
`online` fixture (empty caches, downloads allowed). Every server listens on 127.0.0.1 only and stops with close()."""

from __future__ import annotations

import hashlib
import http.server
import socketserver
import threading

import pytest


class Loopback:
    """Serves `files` (URL path -> bytes) on 127.0.0.1; counts requests. `announce` overrides the ETag a HEAD
    answers with (a Hub that promises one file and sends another); `cut` paths send half and hang up; `status`
    answers every request with that error code (403, 404)."""

    def __init__(
        self,
        files: dict[str, bytes],
        announce: dict[str, str] | None = None,
        cut: set[str] = frozenset(),
        status: int | None = None,
    ):
        self.files, self.announce, self.cut, self.requests = files, announce or {}, set(cut), []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _head(self) -> bytes | None:
                server.requests.append((self.command, self.path))
                data = server.files.get(self.path.split("?")[0])
                if data is None or status is not None:
                    self.send_error(status or 404)
                    return None
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{server.announce.get(self.path, hashlib.sha256(data).hexdigest())}"')
                self.send_header("X-Repo-Commit", "a" * 40)
                self.end_headers()
                return data

            def do_HEAD(self):
                self._head()

            def do_GET(self):
                data = self._head()
                if data is not None:
                    self.wfile.write(data[: len(data) // 2] if self.path in server.cut else data)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def online(tmp_path, monkeypatch):
    """Empty caches, and downloads allowed (tests/conftest.py sets HF_HUB_OFFLINE=1 for every other test)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # read by the library at import
    return tmp_path


class Misbehaving:
    """A TCP server on 127.0.0.1 that drops every connection ("drop") or reads the request and never answers
    ("stall"); its handlers stop when it closes, and after `hold` seconds at most."""

    def __init__(self, mode: str, hold: float = 10.0):
        stop = self.stop = threading.Event()

        class Handler(socketserver.BaseRequestHandler):
            def handle(self):
                if mode == "stall":
                    self.request.recv(65536)
                    stop.wait(hold)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.stop.set()
        self.server.shutdown()
        self.server.server_close()
