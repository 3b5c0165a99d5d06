"""Shadow on its own capacity: the candidate of a shadow runs on a shadow worker, another
process or host (`tidegate serve shadow-worker`), instead of a child process of the gateway.

The gateway's side is `RemoteLink`: it stands where the mirror's two queues and its process
stand (`ShadowMirror`), so the mirror's hand-off is unchanged: the caller's path appends to a
buffer, a flush puts a packed batch into a bounded local queue without waiting (a full queue
drops the batch and counts it), and one thread sends what is queued over the connection. The
worker runs the same loop the local mirror process runs (`shadow._mirror_process`: run the
candidate, compare, keep the KPIs, send summaries back), one connection per shadow.

The connection is `multiprocessing.connection` over TCP, authenticated both ways by HMAC
challenge with a shared key (`TIDEGATE_SHADOW_AUTHKEY` on both sides; the worker refuses to
start without one). Its messages are pickles, so the key is what keeps anyone else from
sending the worker code to run: give the worker a network only the gateways reach, and a
key of 32 random bytes.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from dataclasses import dataclass
from multiprocessing import AuthenticationError
from multiprocessing.connection import Client, Connection, Listener
from typing import Any

from cloud_serving.errors import GatewayError

log = logging.getLogger("tidegate.serving.shadow_worker")
AUTHKEY_ENV = "TIDEGATE_SHADOW_AUTHKEY"
SEND_QUEUE = 256  # packed batches (of up to 32 samples) waiting for the connection


class ShadowWorkerError(GatewayError):
    """The shadow worker cannot be used as configured (no key, a bad address)."""

    http_status = 503


def authkey(env: str = AUTHKEY_ENV) -> bytes:
    key = os.environ.get(env, "")
    if len(key) < 16:
        raise ShadowWorkerError(
            f"the shadow worker and its gateways share a key: set ${env} (at least 16 characters) on both"
        )
    return key.encode()


def parse_address(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ShadowWorkerError(f"a shadow worker address is host:port, not {address!r}")
    return host, int(port)


@dataclass(frozen=True)
class WorkerAddress:
    host: str
    port: int
    key: bytes

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


class RemoteLink:
    """The mirror's in-queue, out-queue and process, when the candidate runs on a worker.
    `put_nowait` never waits (a full queue raises `queue.Full`: the mirror drops the batch);
    a worker that cannot be reached or refuses the key ends the link with `error` set."""

    def __init__(self, worker: WorkerAddress, init: tuple[bytes, Any, float | None]) -> None:
        self.worker, self._init = worker, init
        self._send: queue.Queue[Any] = queue.Queue(maxsize=SEND_QUEUE)
        self._recv: queue.Queue[Any] = queue.Queue()
        self.received = self._recv  # the out-queue the mirror reads (and wakes with None)
        self._conn: Connection | None = None
        self._thread = threading.Thread(target=self._run, name=f"shadow-link-{worker}", daemon=True)
        self._receiver: threading.Thread | None = None
        self.error: str | None = None
        self.pid = None  # no local process to lower the priority of

    # the in-queue
    def put_nowait(self, packed: Any) -> None:
        if self.error is not None:
            raise ConnectionError(self.error)
        self._send.put_nowait(packed)

    def put(self, item: Any) -> None:
        try:
            self._send.put(item, timeout=5)
        except queue.Full:
            self.terminate()

    # the process
    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float | None = None) -> None:
        """Until the worker's last summary is in (it closes the connection after it)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        self._thread.join(timeout)
        if self._receiver is not None:
            self._receiver.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    def is_alive(self) -> bool:
        return self._thread.is_alive() or (self._receiver is not None and self._receiver.is_alive())

    def terminate(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def _run(self) -> None:
        try:
            conn = self._conn = Client((self.worker.host, self.worker.port), authkey=self.worker.key)
            conn.send(self._init)
        except (OSError, EOFError, AuthenticationError) as exc:
            self._fail(f"shadow worker {self.worker}: {type(exc).__name__}: {str(exc) or 'refused'}")
            return
        self._receiver = threading.Thread(
            target=self._receive, args=(conn,), name="shadow-link-in", daemon=True
        )
        self._receiver.start()
        try:
            while (item := self._send.get()) is not None:
                conn.send(item)
            conn.send(None)  # the worker sends its last summary and closes
        except (OSError, EOFError) as exc:
            self._fail(f"shadow worker {self.worker}: {type(exc).__name__}: {exc}")

    def _receive(self, conn: Connection) -> None:
        try:
            while True:
                self._recv.put(conn.recv())
        except (OSError, EOFError):
            self._recv.put(None)  # the mirror's reader ends

    def _fail(self, why: str) -> None:
        if self.error is None:
            log.warning("%s", why)
            self.error = why
        self._recv.put(None)


class _ConnIn:
    """A connection read as the mirror loop reads its in-queue."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def get(self) -> Any:
        return self.conn.recv()

    def empty(self) -> bool:
        return not self.conn.poll(0)


class _ConnOut:
    def __init__(self, conn: Connection) -> None:
        self.conn = conn

    def put(self, item: Any) -> None:
        self.conn.send(item)


def _serve_one(conn: Connection, peer: Any) -> None:
    from cloud_serving.shadow import _mirror_process

    try:
        model, spec, capture_abs_diff = conn.recv()
        log.info("shadow from %s: %d-byte candidate", peer, len(model))
        _mirror_process(model, spec, capture_abs_diff, _ConnIn(conn), _ConnOut(conn))
    except (OSError, EOFError) as exc:
        log.info("shadow from %s ended: %s", peer, str(exc) or "closed")
    except Exception:
        log.exception("shadow from %s failed", peer)
    finally:
        conn.close()


def serve(host: str, port: int, key: bytes, *, ready: threading.Event | None = None) -> None:
    """Accept gateways until killed: one thread per shadow. A peer without the key is
    refused at the handshake and logged."""
    with Listener((host, port), authkey=key) as listener:
        log.info("shadow worker on %s:%d", host, port)
        if ready is not None:
            ready.set()
        while True:
            try:
                conn = listener.accept()
            except (AuthenticationError, OSError, EOFError) as exc:
                log.warning("shadow worker: refused a connection: %s", str(exc) or type(exc).__name__)
                continue
            peer = listener.last_accepted
            threading.Thread(target=_serve_one, args=(conn, peer), name=f"shadow-{peer}", daemon=True).start()
