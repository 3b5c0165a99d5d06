"""Resumable, retrying target downloads over a real HTTP server that misbehaves on purpose."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from shared.trust import FetchError, HashMismatchError, TrustClient, UpdateRepository
from shared.trust.fetcher import RetryPolicy, TidegateFetcher
from shared.trust.http import parse_range, resolve_repo_path
from tests.helpers import build_bundle


class FlakyRepo:
    """Serves a repository; the n-th target response is cut after ``cuts[n]`` bytes while
    cuts remain, and Range is ignored when `honour_range` is False."""

    def __init__(self, root: Path, *, cuts: list[int], honour_range: bool = True) -> None:
        self.root, self.cuts, self.honour_range = root, list(cuts), honour_range
        self.ranges: list[str | None] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a: object) -> None:
                pass

            def do_GET(self) -> None:
                path = resolve_repo_path(outer.root, self.path)
                if path is None:
                    self.send_error(404)
                    return
                data = path.read_bytes()
                header = self.headers.get("Range") if outer.honour_range else None
                is_target = "/targets/" in self.path
                if is_target:
                    outer.ranges.append(self.headers.get("Range"))
                start, end = parse_range(header, len(data)) or (0, len(data) - 1)
                body = data[start : end + 1]
                self.send_response(206 if header else 200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if is_target and outer.cuts:
                    self.wfile.write(body[: outer.cuts.pop(0)])
                    self.wfile.flush()
                    self.close_connection = True
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def repo(tmp_path: Path, sample_payload: Path) -> UpdateRepository:
    payload = tmp_path / "payload"
    import shutil

    shutil.copytree(sample_payload, payload)
    (payload / "weights.bin").write_bytes(bytes(range(256)) * 4096)  # 1 MiB, so cuts land mid-file
    r = UpdateRepository.init(tmp_path / "repo")
    r.add_bundle(build_bundle(payload, tmp_path / "v1.bundle"))
    return r


def make_client(repo: UpdateRepository, url: str, cache: Path, sleeps: list[float]) -> TrustClient:
    fetcher = TidegateFetcher(retry=RetryPolicy(max_attempts=3, base_delay=0.01), sleep=sleeps.append)
    root = (repo.metadata_dir / "1.root.json").read_bytes()
    return TrustClient(repository=url, trusted_root=root, cache_dir=cache, fetcher=fetcher)


def test_dropped_links_resume_with_range(repo: UpdateRepository, tmp_path: Path) -> None:
    server = FlakyRepo(repo.dir, cuts=[300_000, 300_000])
    try:
        sleeps: list[float] = []
        c = make_client(repo, server.url, tmp_path / "cache", sleeps)
        target = c.targets()[0]
        progress: list[int] = []
        got = c.download(target, tmp_path / "dl" / "b.bundle", on_progress=lambda d, t: progress.append(d))
        assert got.read_bytes() == (tmp_path / "v1.bundle").read_bytes()
        assert server.ranges == [None, "bytes=300000-", "bytes=600000-"]
        assert progress[-1] == target.length and progress == sorted(progress)
        assert not (tmp_path / "dl" / "b.bundle.part").exists()
    finally:
        server.close()


def test_partial_download_survives_a_restart(repo: UpdateRepository, tmp_path: Path) -> None:
    # The link delivers 250 kB, then dies: three attempts without progress exhaust the retries.
    server = FlakyRepo(repo.dir, cuts=[250_000, 0, 0, 0])
    try:
        sleeps: list[float] = []
        c = make_client(repo, server.url, tmp_path / "cache", sleeps)
        target = c.targets()[0]
        with pytest.raises(FetchError, match="connection ended at byte 250000"):
            c.download(target, tmp_path / "b.bundle")
        assert len(sleeps) == 2
        part = tmp_path / "b.bundle.part"
        assert part.stat().st_size == 250_000
        server.cuts = []
        c2 = make_client(repo, server.url, tmp_path / "cache", [])  # a new process, same disk
        c2.download(c2.targets()[0], tmp_path / "b.bundle")
        assert server.ranges[-1] == "bytes=250000-"
        assert (tmp_path / "b.bundle").read_bytes() == (tmp_path / "v1.bundle").read_bytes()
    finally:
        server.close()


def test_server_ignoring_range_restarts_cleanly(repo: UpdateRepository, tmp_path: Path) -> None:
    server = FlakyRepo(repo.dir, cuts=[200_000], honour_range=False)
    try:
        c = make_client(repo, server.url, tmp_path / "cache", [])
        got = c.download(c.targets()[0], tmp_path / "b.bundle")
        assert got.read_bytes() == (tmp_path / "v1.bundle").read_bytes()
    finally:
        server.close()


def test_damaged_partial_is_refetched_once(repo: UpdateRepository, tmp_path: Path) -> None:
    c = make_client(repo, str(repo.dir), tmp_path / "cache", [])
    target = c.targets()[0]
    (tmp_path / "b.bundle.part").write_bytes(b"\0" * 1000)  # a power cut left zeros
    got = c.download(target, tmp_path / "b.bundle")
    assert got.read_bytes() == (tmp_path / "v1.bundle").read_bytes()


def test_tampered_target_is_not_retried_forever(repo: UpdateRepository, tmp_path: Path) -> None:
    stored = next(repo.targets_dir.rglob("*.bundle"))
    data = bytearray(stored.read_bytes())
    data[-5000] ^= 1
    stored.write_bytes(bytes(data))
    c = make_client(repo, str(repo.dir), tmp_path / "cache", [])
    with pytest.raises(HashMismatchError):
        c.download(c.targets()[0], tmp_path / "b.bundle")
    assert not (tmp_path / "b.bundle").exists() and not (tmp_path / "b.bundle.part").exists()


def test_missing_target_is_not_retried(repo: UpdateRepository, tmp_path: Path) -> None:
    sleeps: list[float] = []
    c = make_client(repo, str(repo.dir), tmp_path / "cache", sleeps)
    target = c.targets()[0]
    next(repo.targets_dir.rglob("*.bundle")).unlink()
    with pytest.raises(FetchError, match="404"):
        c.download(target, tmp_path / "b.bundle")
    assert sleeps == []


def test_backoff_is_bounded_full_jitter() -> None:
    import random

    policy = RetryPolicy(base_delay=1.0, max_delay=8.0)
    rng = random.Random(1)
    for attempt in range(1, 10):
        for _ in range(50):
            d = policy.delay(attempt, rng)
            assert 0 <= d <= min(8.0, 2 ** (attempt - 1))


def test_read_timeout_on_a_stalled_link_then_resume(repo: UpdateRepository, tmp_path: Path) -> None:
    """A server that goes silent mid-transfer trips the read timeout; the retry resumes."""
    import time as _time

    from shared.trust.fetcher import Timeouts

    stalls = [True]

    server = FlakyRepo(repo.dir, cuts=[])
    handler = server.httpd.RequestHandlerClass
    original = handler.do_GET  # type: ignore[attr-defined]

    def do_get(self: object) -> None:
        if "/targets/" in self.path and stalls:  # type: ignore[attr-defined]
            stalls.pop()
            self.send_response(200)  # type: ignore[attr-defined]
            self.send_header("Content-Length", "99999999")  # type: ignore[attr-defined]
            self.end_headers()  # type: ignore[attr-defined]
            self.wfile.flush()  # type: ignore[attr-defined]
            _time.sleep(1.5)
            return
        original(self)

    handler.do_GET = do_get  # type: ignore[attr-defined]
    try:
        sleeps: list[float] = []
        fetcher = TidegateFetcher(Timeouts(connect=2, read=0.3), RetryPolicy(3, 0.01), sleep=sleeps.append)
        root = (repo.metadata_dir / "1.root.json").read_bytes()
        c = TrustClient(repository=server.url, trusted_root=root, cache_dir=tmp_path / "c", fetcher=fetcher)
        t0 = _time.monotonic()
        got = c.download(c.targets()[0], tmp_path / "b.bundle")
        assert _time.monotonic() - t0 < 1.4  # gave up on the silent connection before it ended
        assert got.read_bytes() == (tmp_path / "v1.bundle").read_bytes()
        assert len(sleeps) == 1
    finally:
        server.close()


def test_an_error_body_never_poisons_the_next_request_on_a_pooled_connection() -> None:
    """A keep-alive server answers 404 with a body, then 200: the fetcher must not hand the
    connection back to its pool with the 404 body unread, or the next response is garbage
    (`{"detail":"not found"}HTTP/1.1 200 OK` read as a status line)."""
    from tuf.api import exceptions as tuf_exc

    connections: list[int] = []

    class KeepAlive(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def setup(self) -> None:
            super().setup()
            connections.append(1)

        def do_GET(self) -> None:
            body = b'{"detail":"not found"}' if self.path.endswith("missing") else b"metadata bytes"
            self.send_response(404 if self.path.endswith("missing") else 200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), KeepAlive)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        fetcher = TidegateFetcher(retry=RetryPolicy(max_attempts=1))
        for _ in range(3):
            with pytest.raises(tuf_exc.DownloadHTTPError, match="404"):
                fetcher.fetch(base + "/metadata/9.root.json.missing")
            assert b"".join(fetcher.fetch(base + "/metadata/timestamp.json")) == b"metadata bytes"
        assert len(connections) >= 2  # the poisoned connection was closed, not pooled
    finally:
        server.shutdown()
        server.server_close()


def test_a_mirror_serving_a_truncated_target_is_named_as_such(repo: UpdateRepository, tmp_path: Path) -> None:
    """Over HTTP the resume after the short read gets 416 from the mirror; the error says the
    mirror's copy is shorter than what was signed, not just "HTTP 416"."""
    from shared.trust import FetchError
    from shared.trust.http import RepoHTTPServer

    stored = next(repo.targets_dir.rglob("*.bundle"))
    stored.write_bytes(stored.read_bytes()[:300_000])
    with RepoHTTPServer(repo.dir) as server:
        c = make_client(repo, server.url, tmp_path / "cache", [])
        with pytest.raises(
            FetchError, match="has only 300000 of the signed .* bytes: it serves a truncated target"
        ):
            c.download(c.targets()[0], tmp_path / "b.bundle")
