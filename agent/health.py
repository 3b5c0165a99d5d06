"""Local health endpoint (``/healthz``, ``/readyz``, Prometheus ``/metrics``, and
``POST /v1/infer`` into the batcher) and systemd notifications.

A deliberately small asyncio HTTP/1.1 server: it binds to localhost, reads
one bounded request per connection, and answers; nothing here can block the
agent's event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest

MAX_BODY = 4 << 20
Handler = Callable[[bytes], Awaitable[tuple[int, dict[str, Any]]]]


class HealthServer:
    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        live: Callable[[], bool],
        ready: Callable[[], tuple[bool, str]],
        infer: Handler | None = None,
    ) -> None:
        self.registry, self._live, self._ready, self._infer = registry, live, ready, infer
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.start_server(self._serve, host, port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            status, ctype, body = await asyncio.wait_for(self._handle(reader), 10)
        except (TimeoutError, ValueError, asyncio.IncompleteReadError, ConnectionError):
            status, ctype, body = 400, "text/plain", b"bad request\n"
        head = f"HTTP/1.1 {status} {_REASONS.get(status, 'OK')}\r\nContent-Type: {ctype}\r\n"
        head += f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        try:
            writer.write(head.encode() + body)
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader) -> tuple[int, str, bytes]:
        request = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        line, *header_lines = request.split("\r\n")
        method, path, _ = line.split(" ", 2)
        headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines if h)}
        length = int(headers.get("content-length", "0"))
        if length > MAX_BODY:
            return 413, "text/plain", b"request body too large\n"
        body = await reader.readexactly(length) if length else b""
        if method == "GET" and path == "/healthz":
            ok = self._live()
            return (200 if ok else 503), "text/plain", b"ok\n" if ok else b"unhealthy\n"
        if method == "GET" and path == "/readyz":
            ok, why = self._ready()
            return (200 if ok else 503), "text/plain", (why + "\n").encode()
        if method == "GET" and path == "/metrics":
            return 200, "text/plain; version=0.0.4", generate_latest(self.registry)
        if method == "POST" and path == "/v1/infer" and self._infer is not None:
            status, doc = await self._infer(body)
            return status, "application/json", json.dumps(doc).encode()
        return 404, "text/plain", b"not found\n"


_REASONS = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    413: "Payload Too Large",
    429: "Too Many Requests",
    503: "Service Unavailable",
}


class SystemdNotifier:
    """sd_notify(3) without libsystemd: READY, WATCHDOG and STOPPING to $NOTIFY_SOCKET."""

    def __init__(self, environ: dict[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self.address = env.get("NOTIFY_SOCKET") or None
        usec = env.get("WATCHDOG_USEC")
        self.watchdog_interval_s = int(usec) / 2e6 if usec and usec.isdigit() else None

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, message: str) -> None:
        if self.address is None:
            return
        addr = "\0" + self.address[1:] if self.address.startswith("@") else self.address
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            try:
                s.connect(addr)
                s.sendall(message.encode())
            except OSError:
                pass
