"""One narrow fetching interface for python-tuf's ngclient: HTTP(S) with
explicit timeouts, or a local directory through ``file://`` URLs (USB sticks,
bench rigs, tests).

ngclient asks a fetcher only for an iterator of byte chunks; everything else
(length limits, verification) stays in ngclient.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO
from urllib.parse import unquote, urlparse

import urllib3
from tuf.api import exceptions as tuf_exc
from tuf.ngclient import FetcherInterface

CHUNK = 1 << 20


@dataclass(frozen=True)
class Timeouts:
    """Every network wait is bounded; `read` is the longest silence tolerated mid-transfer."""

    connect: float = 5.0
    read: float = 30.0


def source_to_url(source: str | Path) -> str:
    """Turn a repository location (URL or directory) into a base URL ending in '/'."""
    text = str(source)
    if text.startswith(("http://", "https://", "file://")):
        return text if text.endswith("/") else text + "/"
    return Path(text).resolve().as_uri() + "/"


class TidegateFetcher(FetcherInterface):
    def __init__(self, timeouts: Timeouts = Timeouts(), user_agent: str = "tidegate") -> None:
        self._timeouts = timeouts
        self._pool = urllib3.PoolManager(
            timeout=urllib3.Timeout(connect=timeouts.connect, read=timeouts.read),
            retries=False,
            headers={"User-Agent": user_agent},
        )

    @contextmanager
    def download_file(self, url: str, max_length: int) -> Iterator[IO[bytes]]:
        """As python-tuf's, but a length overrun names the file that overran."""
        try:
            with super().download_file(url, max_length) as fh:
                yield fh
        except tuf_exc.DownloadLengthMismatchError as exc:
            name = unquote(urlparse(url).path).rpartition("/")[2]
            raise tuf_exc.DownloadLengthMismatchError(f"{name}: {exc}") from None

    def _fetch(self, url: str) -> Iterator[bytes]:
        parsed = urlparse(url)
        if parsed.scheme == "file":
            return self._fetch_file(Path(unquote(parsed.path)))
        if parsed.scheme in ("http", "https"):
            return self._fetch_http(url)
        raise tuf_exc.DownloadError(f"unsupported URL scheme in {url!r}")

    @staticmethod
    def _fetch_file(path: Path) -> Iterator[bytes]:
        try:
            fh = path.open("rb")
        except (FileNotFoundError, NotADirectoryError):
            # ngclient treats 404 (and 403) as "no newer root", which ends root rotation.
            raise tuf_exc.DownloadHTTPError(f"{path}: not found", 404) from None
        return _chunks(fh)

    def _fetch_http(self, url: str) -> Iterator[bytes]:
        try:
            resp = self._pool.request("GET", url, preload_content=False)
        except urllib3.exceptions.TimeoutError as exc:
            raise tuf_exc.SlowRetrievalError(f"{url}: timed out") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise tuf_exc.DownloadError(f"{url}: {exc}") from exc
        if resp.status >= 400:
            resp.release_conn()
            raise tuf_exc.DownloadHTTPError(f"{url}: HTTP {resp.status}", resp.status)
        return _http_chunks(resp, url)


def _chunks(fh: BinaryIO) -> Iterator[bytes]:
    with fh:
        while chunk := fh.read(CHUNK):
            yield chunk


def _http_chunks(resp: urllib3.BaseHTTPResponse, url: str) -> Iterator[bytes]:
    try:
        yield from resp.stream(CHUNK)
    except urllib3.exceptions.TimeoutError as exc:
        raise tuf_exc.SlowRetrievalError(f"{url}: read timed out") from exc
    except urllib3.exceptions.HTTPError as exc:
        raise tuf_exc.DownloadError(f"{url}: {exc}") from exc
    finally:
        resp.release_conn()
