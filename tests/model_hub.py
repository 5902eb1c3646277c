"""A local HTTP server standing in for the model hub (and any https:// model URL) in tests.

It serves files from memory with ETags and `Range`/`If-Range` as the hub's CDN does, and can
be told to cut a transfer off part-way (`cut_after`), to send slowly (`delay_s` per chunk) or
to answer 404. Point `HF_ENDPOINT` at `hub.url` and `hf:org/repo/file` refs resolve here.
"""

from __future__ import annotations

import hashlib
import re
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CHUNK = 64 * 1024


@dataclass
class Hub:
    files: dict[str, bytes] = field(default_factory=dict)
    cut_after: dict[str, int] = field(default_factory=dict)  # path → bytes sent, once
    delay_s: float = 0.0  # sleep between chunks, so progress can be watched
    requests: list[tuple[str, str | None]] = field(default_factory=list)  # (path, Range)
    url: str = ""

    def hf(self, org_repo: str, name: str, data: bytes, revision: str = "main") -> str:
        """Put a file where `hf:<org_repo>/<name>` finds it; returns that ref."""
        self.files[f"/{org_repo}/resolve/{revision}/{name}"] = data
        return f"hf:{org_repo}/{name}"


def etag(data: bytes) -> str:
    return '"' + hashlib.sha256(data).hexdigest()[:16] + '"'


def _handler(hub: Hub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet
            pass

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            hub.requests.append((path, self.headers.get("Range")))
            data = hub.files.get(path)
            if data is None:
                body = b'{"error": "Entry not found"}'
                self.send_response(404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            start = 0
            match = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range") or "")
            if_range = self.headers.get("If-Range")
            if match and (if_range is None or if_range == etag(data)):
                start = int(match.group(1))
                if start >= len(data):
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{len(data)}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(len(data) - start))
            self.send_header("ETag", etag(data))
            self.send_header("Accept-Ranges", "bytes")
            self.end_headers()
            limit = hub.cut_after.pop(path, None)
            sent, body = 0, data[start:]
            while sent < len(body):
                if limit is not None and sent >= limit:
                    self.close_connection = True
                    self.wfile.flush()
                    self.connection.shutdown(socket.SHUT_RDWR)  # the cut: no more bytes
                    return
                step = CHUNK if limit is None else min(CHUNK, limit - sent)
                self.wfile.write(body[sent : sent + step])
                sent += step
                if hub.delay_s:
                    self.wfile.flush()
                    time.sleep(hub.delay_s)

    return Handler


@contextmanager
def serving(hub: Hub | None = None) -> Iterator[Hub]:
    hub = hub or Hub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    server.daemon_threads = True
    hub.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="model-hub", daemon=True
    )
    thread.start()
    try:
        yield hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)
