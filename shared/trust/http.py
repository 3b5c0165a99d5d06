"""A static HTTP server for an update repository: ``metadata/`` and ``targets/``
only (never ``keys/``), with single-range ``Range`` requests so that devices
can resume a download after a dropped link.

It serves demos, tests and bench rigs; the fleet server serves the same tree
through its own API.
"""

from __future__ import annotations

import re
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

CHUNK = 1 << 20
_RANGE = re.compile(r"^bytes=(\d*)-(\d*)$")
SERVED = ("metadata", "targets")


def resolve_repo_path(root: Path, url_path: str) -> Path | None:
    """Map a request path to a file under ``root/metadata`` or ``root/targets``, or None."""
    parts = [p for p in unquote(urlparse(url_path).path).split("/") if p]
    if not parts or parts[0] not in SERVED or any(p in ("..", ".") for p in parts):
        return None
    path = root.joinpath(*parts)
    try:
        real = path.resolve(strict=True)
    except (FileNotFoundError, RuntimeError):
        return None
    if not real.is_file() or not real.is_relative_to((root / parts[0]).resolve()):
        return None
    return real


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Parse one ``bytes=a-b`` range into an inclusive (start, end), or None if unsatisfiable."""
    if header is None:
        return (0, size - 1)
    m = _RANGE.match(header.strip())
    if not m or (m.group(1) == "" and m.group(2) == ""):
        return None
    if m.group(1) == "":
        length = int(m.group(2))
        return (max(0, size - length), size - 1) if length else None
    start = int(m.group(1))
    end = int(m.group(2)) if m.group(2) else size - 1
    if start >= size or end < start:
        return None
    return (start, min(end, size - 1))


class _Handler(BaseHTTPRequestHandler):
    server_version = "tidegate-repo"
    root: Path

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, *, body: bool) -> None:
        path = resolve_repo_path(self.root, self.path)
        if path is None:
            self.send_error(HTTPStatus.NOT_FOUND)
            return
        size = path.stat().st_size
        header = self.headers.get("Range")
        rng = parse_range(header, size) if size else (0, -1)
        if rng is None:
            self.send_response(HTTPStatus.REQUESTED_RANGE_NOT_SATISFIABLE)
            self.send_header("Content-Range", f"bytes */{size}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start, end = rng
        length = end - start + 1
        self.send_response(HTTPStatus.PARTIAL_CONTENT if header else HTTPStatus.OK)
        if header:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Length", str(length))
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        if not body or length <= 0:
            return
        with path.open("rb") as fh:
            fh.seek(start)
            left = length
            try:
                while left > 0:
                    chunk = fh.read(min(CHUNK, left))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    left -= len(chunk)
            except (BrokenPipeError, ConnectionResetError):
                return


class RepoHTTPServer:
    """A repository served on 127.0.0.1 in a background thread; use as a context manager."""

    def __init__(self, root: Path, host: str = "127.0.0.1", port: int = 0) -> None:
        handler = type("Handler", (_Handler,), {"root": root.resolve()})
        self._httpd = ThreadingHTTPServer((host, port), handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="repo-http", daemon=True)

    @property
    def url(self) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> RepoHTTPServer:
        self._thread.start()
        return self

    def serve_forever(self) -> None:
        self._httpd.serve_forever()

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> RepoHTTPServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
