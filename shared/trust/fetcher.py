"""One narrow fetching interface for python-tuf's ngclient: HTTP(S) with
explicit timeouts, or a local directory through ``file://`` URLs (USB sticks,
bench rigs, tests).

ngclient asks a fetcher only for an iterator of byte chunks (metadata). For
targets, `TidegateFetcher.fetch_to_file` adds what ngclient lacks and device
users ask for: a partial file that survives restarts and resumes with an HTTP
``Range`` request, retries with exponential backoff and jitter, progress
callbacks, and SHA-256 computed while the bytes arrive (no second pass).
"""

from __future__ import annotations

import hashlib
import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO
from urllib.parse import unquote, urlparse

import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.ngclient import FetcherInterface

CHUNK = 1 << 20

ProgressCallback = Callable[[int, int], None]
"""Called with (bytes on disk so far, total expected)."""


@dataclass(frozen=True)
class Timeouts:
    """Every network wait is bounded; `read` is the longest silence tolerated mid-transfer."""

    connect: float = 5.0
    read: float = 30.0


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of a target download after transient failures (timeouts, dropped links, 5xx).

    The attempt counter resets whenever an attempt made progress, so a slow
    link that keeps moving is never given up on.
    """

    max_attempts: int = 6
    base_delay: float = 0.5
    max_delay: float = 30.0

    def delay(self, attempt: int, rng: random.Random) -> float:
        """Full-jitter exponential backoff (AWS architecture blog's recommendation)."""
        return rng.uniform(0, min(self.max_delay, self.base_delay * (2 ** (attempt - 1))))


def source_to_url(source: str | Path) -> str:
    """Turn a repository location (URL or directory) into a base URL ending in '/'."""
    text = str(source)
    if text.startswith(("http://", "https://", "file://")):
        return text if text.endswith("/") else text + "/"
    return Path(text).resolve().as_uri() + "/"


def _name(url: str) -> str:
    return unquote(urlparse(url).path).rpartition("/")[2]


class TidegateFetcher(FetcherInterface):
    def __init__(
        self,
        timeouts: Timeouts = Timeouts(),
        retry: RetryPolicy = RetryPolicy(),
        user_agent: str = "tidegate",
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.timeouts = timeouts
        self.retry = retry
        self._sleep = sleep
        self._rng = random.Random()
        self._pool = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeouts.connect, read=timeouts.read),
            retries=False,
            headers={"User-Agent": user_agent},
        )

    # ---- ngclient's interface (metadata) ---------------------------------------------------

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """As python-tuf's, but a length overrun names the file that overran."""
        try:
            with super().download_file(url, max_length) as fh:
                yield fh
        except tuf_exc.DownloadLengthMismatchError as exc:
            raise tuf_exc.DownloadLengthMismatchError(f"{_name(url)}: {exc}") from exc

    def _fetch(self, url: str) -> Iterator[bytes]:
        return self._open(url, 0)[0]

    # ---- resumable target download -----------------------------------------------------------

    def fetch_to_file(
        self, url: str, part: Path, length: int, on_progress: ProgressCallback | None = None
    ) -> str:
        """Bring `part` up to `length` bytes from `url`, resuming what is already there.

        Returns the SHA-256 of the whole file. Raises
        `DownloadLengthMismatchError` if the source sends more than `length`
        (endless data), `DownloadHTTPError` for a non-retriable status, and the
        last transient error once retries are exhausted.
        """
        h = hashlib.sha256()
        offset = _hash_existing(part, length, h)
        attempt = 0
        with part.open("ab") as out:
            while offset < length:
                start = offset
                try:
                    chunks, from_offset = self._open(url, offset)
                    if from_offset != offset:  # the server ignored Range: start over
                        out.truncate(0)
                        out.seek(0)
                        h = hashlib.sha256()
                        offset = 0
                    for chunk in chunks:
                        if offset + len(chunk) > length:
                            raise tuf_exc.DownloadLengthMismatchError(
                                f"{_name(url)}: more than the signed length of {length} bytes"
                            )
                        out.write(chunk)
                        h.update(chunk)
                        offset += len(chunk)
                        if on_progress is not None:
                            on_progress(offset, length)
                    if offset < length:
                        raise tuf_exc.DownloadError(
                            f"{_name(url)}: connection ended at byte {offset} of {length}"
                        )
                except tuf_exc.DownloadLengthMismatchError:
                    raise
                except tuf_exc.DownloadHTTPError as exc:
                    if exc.status_code == 416 and offset > 0:  # nothing from where we had got to
                        raise tuf_exc.DownloadError(
                            f"{_name(url)}: the mirror has only {offset} of the signed {length} bytes: "
                            "it serves a truncated target"
                        ) from exc
                    if exc.status_code < 500 and exc.status_code != 429:
                        raise
                    attempt = self._backoff(attempt, start, offset, exc)
                except (tuf_exc.DownloadError, OSError) as exc:
                    if isinstance(exc, OSError) and not isinstance(exc, ConnectionError | TimeoutError):
                        raise  # a local I/O error (disk full, permissions) is not transient
                    attempt = self._backoff(attempt, start, offset, exc)
            out.flush()
            os.fsync(out.fileno())
        return h.hexdigest()

    def _backoff(self, attempt: int, start: int, offset: int, exc: Exception) -> int:
        attempt = 1 if offset > start else attempt + 1
        if attempt >= self.retry.max_attempts:
            raise exc
        self._sleep(self.retry.delay(attempt, self._rng))
        return attempt

    # ---- transports --------------------------------------------------------------------------

    def _open(self, url: str, offset: int) -> tuple[Iterator[bytes], int]:
        """Open `url` from byte `offset`; returns the chunks and the offset they really start at."""
        parsed = urlparse(url)
        if parsed.scheme == "file":
            return _file_chunks(Path(unquote(parsed.path)), offset), offset
        if parsed.scheme in ("http", "https"):
            return self._http_chunks(url, offset)
        raise tuf_exc.DownloadError(f"unsupported URL scheme in {url!r}")

    def _http_chunks(self, url: str, offset: int) -> tuple[Iterator[bytes], int]:
        headers = {"Range": f"bytes={offset}-"} if offset else {}
        try:
            resp = self._pool.request(
                "GET", url, headers=headers, preload_content=False, enforce_content_length=False
            )
        except urllib3.exceptions.TimeoutError as exc:
            raise tuf_exc.SlowRetrievalError(f"{url}: timed out") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise tuf_exc.DownloadError(f"{url}: {exc}") from exc
        if resp.status >= 400:
            # Close rather than release: an unread error body left on a pooled keep-alive
            # connection would be read as the next response's status line.
            resp.close()
            resp.release_conn()
            raise tuf_exc.DownloadHTTPError(f"{url}: HTTP {resp.status}", resp.status)
        start = offset if resp.status == 206 else 0
        return _stream(resp, url), start


def _hash_existing(part: Path, length: int, h: hashlib._Hash) -> int:
    """Feed an existing partial file into `h`; discard it if it cannot be a prefix."""
    try:
        size = part.stat().st_size
    except FileNotFoundError:
        return 0
    if size > length:
        part.unlink()
        return 0
    with part.open("rb") as fh:
        while chunk := fh.read(CHUNK):
            h.update(chunk)
    return size


def _file_chunks(path: Path, offset: int) -> Iterator[bytes]:
    try:
        fh: BinaryIO = path.open("rb")
    except (FileNotFoundError, NotADirectoryError) as exc:
        # ngclient treats 404 (and 403) as "no newer root", which ends root rotation.
        raise tuf_exc.DownloadHTTPError(f"{path}: not found", 404) from exc
    return _read_from(fh, offset)


def _read_from(fh: BinaryIO, offset: int) -> Iterator[bytes]:
    with fh:
        fh.seek(offset)
        while chunk := fh.read(CHUNK):
            yield chunk


def _stream(resp: urllib3.BaseHTTPResponse, url: str) -> Iterator[bytes]:
    complete = False
    try:
        yield from resp.stream(CHUNK)
        complete = True
    except urllib3.exceptions.TimeoutError as exc:
        raise tuf_exc.SlowRetrievalError(f"{url}: read timed out") from exc
    except urllib3.exceptions.HTTPError as exc:
        raise tuf_exc.DownloadError(f"{url}: {exc}") from exc
    finally:
        if not complete:  # the caller stopped early (too long, an error): never reuse this connection
            resp.close()
        resp.release_conn()
