"""The MQTT side of the jobs service: device requests in, replies and notifications out.

One paho client subscribes to every thing's jobs topics (``no_local``, so it
never hears its own replies). Paho's thread only queues what arrives; one
worker thread takes whatever has queued up (up to `batch_max` messages),
handles it in one database transaction, publishes the replies after the
commit and only then acknowledges the messages to the broker (manual QoS 1
acks): a server killed mid-batch has acknowledged nothing it did not commit,
and the broker redelivers the rest to its persistent session. Batching is
what lets one process keep up with a fleet (one commit per batch instead of
one per message); under light load a batch is a single message.

A request that breaks the handler gets an ``InternalError`` reply, and the
rest of its batch is redone one message per transaction, so one bad message
never costs the others; nothing stops the bridge. A sweeper thread times out
stuck executions and re-notifies devices that may have missed a
notification.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions
from sqlalchemy import select
from sqlalchemy.orm import Session

from fleet_server.db import Database, try_exclusive
from fleet_server.devices.models import Device
from fleet_server.jobs import protocol
from fleet_server.jobs.partitions import PartitionLeases, partition_of
from fleet_server.jobs.throttle import DeviceLimiter, Verdict
from fleet_server.telemetry.service import TelemetryRejectedError, ingest
from shared.iotjobs import RejectedCode, Topics, valid_thing_name

log = logging.getLogger("tidegate.server.jobs")
REQUESTS = "$aws/things/+/jobs/#"
TELEMETRY = "tidegate/things/+/+"
# A bridge busy this share of the last LOAD_WINDOW_S is saturated: campaigns notify no more
# devices until it has room (devices waiting past their 10 s request timeout ask again).
LOAD_WINDOW_S = 5.0
BUSY_LOAD = 0.9


def _throttled(payload: bytes) -> bytes:
    """AWS IoT Jobs' error response for a throttled request, echoing its clientToken."""
    body: dict[str, Any] = {"code": RejectedCode.REQUEST_THROTTLED.value, "message": "too many requests"}
    try:
        token = json.loads(payload).get("clientToken") if len(payload) <= 8192 else None
    except (ValueError, AttributeError):
        token = None
    if isinstance(token, str):
        body["clientToken"] = token[:64]
    body["timestamp"] = int(time.time())
    return json.dumps(body, separators=(",", ":")).encode()


def _utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class _Inbound:
    topic: str
    payload: bytes
    mid: int
    qos: int
    received: float  # time.monotonic() when paho handed it over

    @property
    def partition(self) -> int:
        parts = self.topic.split("/", 3)
        return partition_of(parts[2] if len(parts) > 2 else "")


class JobsBridge:
    def __init__(
        self,
        db: Database,
        *,
        host: str = "127.0.0.1",
        port: int = 1883,
        client_id: str = "tidegate-fleet-server",
        clock: Callable[[], datetime] = _utcnow,
        renotify_after: timedelta = timedelta(seconds=60),
        sweep_interval_s: float = 5.0,
        tls: tuple[Path, Path, Path] | None = None,
        batch_max: int = 500,
        limiter: DeviceLimiter | None = None,
        leases: PartitionLeases | None = None,
        serve_devices: bool = True,
    ) -> None:
        """`tls` = (CA file, client certificate, key) for a mutual-TLS broker; `limiter` bounds
        each device's requests (default: 5 a second with bursts of 50); `leases` decide which
        things' traffic this replica handles (default: its share of the partitions, under its
        client id; on SQLite, all of them). `serve_devices=False` (an API-only replica): the
        connection only publishes what the API's actions return; it subscribes to nothing,
        holds no partitions and does not sweep, so the replicas serving devices are unchanged."""
        self.serve_devices = serve_devices
        self.db, self.clock, self.batch_max = db, clock, batch_max
        self.leases = leases or PartitionLeases(db, client_id)
        self.limiter = limiter or DeviceLimiter()
        self._inbox: queue.Queue[_Inbound] = queue.Queue()
        self._worker = threading.Thread(target=self._work_loop, name="jobs-worker", daemon=True)
        self.renotify_after, self.sweep_interval_s = renotify_after, sweep_interval_s
        self.host, self.port = host, port
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="jobs-sweeper", daemon=True)
        self.handled = 0
        self.telemetry_stored = 0
        self.telemetry_rejected = 0
        self.batches = 0
        self.not_mine = 0  # heard, acknowledged, left to the replica holding the thing's partition
        self.not_mine_early = 0  # the same, decided on receipt (paho's thread)
        # The jobs requests in the inbox and not handled yet, exactly as received: a device
        # whose reply is late sends the same request again (same clientToken), and one
        # answer serves both. A busy bridge's queue otherwise fills with copies, each as much
        # work as the original, so the later the answers the more work there is.
        self._queued: set[tuple[str, bytes]] = set()
        self.duplicates = 0
        self.busy_s = 0.0  # time spent handling batches: requests / busy_s is the capacity
        self._recent: collections.deque[tuple[float, float]] = collections.deque()  # (start, end)
        self._load_lock = threading.Lock()
        self.leases.load = self.load  # written in this replica's heartbeat
        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            manual_ack=True,
        )
        c.on_connect = self._on_connect
        c.on_disconnect = lambda *a: self.connected.clear()
        c.on_message = self._on_message
        c.max_inflight_messages_set(100)
        c.max_queued_messages_set(0)
        if tls is not None:
            ca, cert, key = tls
            c.tls_set(ca_certs=str(ca), certfile=str(cert), keyfile=str(key), cert_reqs=ssl.CERT_REQUIRED)
        self._client = c

    def start(self, *, wait_s: float = 10.0) -> JobsBridge:
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        if self.serve_devices:
            self.leases.start()  # before the broker: what arrives from here on is judged by the claims
        self._client.connect_async(self.host, self.port, keepalive=30, clean_start=False, properties=props)
        if self.serve_devices:
            self._worker.start()
        self._client.loop_start()
        if not self.connected.wait(wait_s):
            raise TimeoutError(f"could not reach the MQTT broker at {self.host}:{self.port}")
        if self.serve_devices:
            self._sweeper.start()
        return self

    def stop(self) -> None:
        """Stop taking messages; what was queued but not committed is not acknowledged, so
        the broker redelivers it to the next session."""
        self._stop.set()
        if self._worker.is_alive():
            self._worker.join(10)
        if self.serve_devices:
            self.leases.stop()
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, out: list[protocol.Outgoing]) -> None:
        for o in out:
            self._client.publish(o.topic, o.encode(), qos=1)

    def queue_job(self, thing: str, job_id: str, document: dict[str, Any], **kwargs: Any) -> None:
        with self.db.session() as s:
            out = protocol.create_execution(s, thing, job_id, document, self.clock(), **kwargs)
        self.publish(out)

    # ---- paho's thread ---------------------------------------------------------------------------

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.error("broker refused the jobs bridge: %s", reason)
            return
        if not self.serve_devices:
            self.connected.set()
            return
        client.subscribe(
            [
                (REQUESTS, SubscribeOptions(qos=1, noLocal=True)),
                (TELEMETRY, SubscribeOptions(qos=1, noLocal=True)),
            ]
        )
        self.connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        last = msg.topic.rsplit("/", 1)[-1]
        if msg.topic.startswith("$aws/") and last in ("accepted", "rejected", "notify", "notify-next"):
            client.ack(msg.mid, msg.qos)  # our own kind of message, echoed: nothing to do
            return
        parts = msg.topic.split("/", 3)
        thing = parts[2] if len(parts) > 2 else ""
        verdict = self.limiter.check(thing, time.monotonic())
        if verdict is not Verdict.ALLOW:  # decided here, before the queue and the database
            if (
                verdict is Verdict.THROTTLE
                and msg.topic.startswith("$aws/")
                and self.leases.holds_locally(partition_of(thing))  # one replica answers
            ):
                client.publish(Topics.rejected(msg.topic), _throttled(bytes(msg.payload)), qos=0)
                log.warning("device %s throttled: over %.0f requests a second", thing, self.limiter.rate)
            client.ack(msg.mid, msg.qos)
            return
        received = time.monotonic()
        if not self.leases.holds_locally(partition_of(thing)):
            # Another replica's thing: dropped before the queue and the database. The batch
            # would drop it too (a claim made after this moment does not take it), so this
            # only saves the work; the batch still checks what is held in the database.
            self.not_mine_early += 1
            client.ack(msg.mid, msg.qos)
            return
        payload = bytes(msg.payload)
        if msg.topic.startswith("$aws/"):
            key = (msg.topic, payload)
            if key in self._queued:  # its original is queued or being handled: one answer serves both
                self.duplicates += 1
                client.ack(msg.mid, msg.qos)
                return
            self._queued.add(key)
        self._inbox.put(_Inbound(msg.topic, payload, msg.mid, msg.qos, received))

    # ---- the worker thread -----------------------------------------------------------------------

    def _work_loop(self) -> None:
        while not self._stop.is_set():
            try:
                batch = [self._inbox.get(timeout=0.2)]
            except queue.Empty:
                continue
            while len(batch) < self.batch_max:
                try:
                    batch.append(self._inbox.get_nowait())
                except queue.Empty:
                    break
            try:
                self._process(batch)
            finally:
                for m in batch:  # answered (or failed): a copy from now on is a request again
                    self._queued.discard((m.topic, m.payload))

    def counters(self) -> dict[str, float]:
        """Monotonic totals for /metrics."""
        return {
            "jobs_requests": self.handled,
            "jobs_batches": self.batches,
            "jobs_busy_seconds": self.busy_s,
            "telemetry_stored": self.telemetry_stored,
            "telemetry_rejected": self.telemetry_rejected,
            "jobs_throttled": self.limiter.throttled + self.limiter.dropped,
            "jobs_not_mine": self.not_mine + self.not_mine_early,
            "jobs_duplicates": self.duplicates,
        }

    def _process(self, batch: list[_Inbound]) -> None:
        started = time.perf_counter()
        out: list[protocol.Outgoing] = []
        tally: Counter[str] = Counter()
        try:
            with self.db.session() as s, s.no_autoflush:
                batch_mine = self._mine(s, batch, tally)
                # One flush at commit instead of one per query; the batch's devices and their
                # pending executions loaded in one SELECT each (held here: the identity map is weak).
                parts = [m.topic.split("/") for m in batch_mine]
                things = sorted({p[2] for p in parts if len(p) > 2})
                # the executions the batch's updates and gets name by job id ($aws/things/T/jobs/J/…)
                named = [(p[2], p[4]) for p in parts if len(p) == 6 and p[4] != "$next" and p[3] == "jobs"]
                # the telemetry's devices as rows (it writes them); the jobs' registered or not
                beacons = sorted({p[2] for p in parts if len(p) > 2 and p[0] == "tidegate"})
                held = [*s.scalars(select(Device).where(Device.thing_name.in_(beacons)))] if beacons else []
                protocol.prefetch_devices(s, things)
                held += protocol.prefetch_pending(s, [t for t in things if valid_thing_name(t)], named)
                now = self.clock()
                for m in batch_mine:
                    out += self._handle(s, m, now, tally)
                protocol.write_batch(s)  # the batch's execution updates and events: two statements
                del held
        except Exception:
            if len(batch) > 1:
                log.warning("a batch of %d failed; redoing it one message per transaction", len(batch))
            out, tally = [], Counter()
            for m in batch:
                one: Counter[str] = Counter()
                try:
                    with self.db.session() as s:
                        if self._mine(s, [m], one):
                            out += self._handle(s, m, self.clock(), one)
                    tally += one
                except Exception:
                    if not self.leases.holds_locally(m.partition):
                        continue  # another replica's to answer (the database may be down for all)
                    log.exception("message on %s failed", m.topic)
                    out += self._failed(m)
                    tally["telemetry_rejected" if m.topic.startswith("tidegate/") else "handled"] += 1
        self.handled += tally["handled"]
        self.telemetry_stored += tally["telemetry_stored"]
        self.telemetry_rejected += tally["telemetry_rejected"]
        self.not_mine += tally["not_mine"]
        self.publish(out)
        for m in batch:
            if m.qos:
                self._client.ack(m.mid, m.qos)
        self.batches += 1
        ended = time.perf_counter()
        self.busy_s += ended - started
        with self._load_lock:
            self._recent.append((started, ended))
            while self._recent and self._recent[0][1] < ended - LOAD_WINDOW_S:
                self._recent.popleft()

    def load(self) -> float:
        """The share of the last LOAD_WINDOW_S this bridge spent handling batches (0..1): near
        1 the broker is queueing what it cannot take, and the queue only grows from there."""
        now = time.perf_counter()
        since = now - LOAD_WINDOW_S
        with self._load_lock:
            busy = sum(end - max(start, since) for start, end in self._recent if end > since)
        return min(1.0, busy / LOAD_WINDOW_S)

    def busy(self) -> str | None:
        """Why no more devices should be notified now (`planner.plan_tick`'s `busy`): this
        replica's jobs service, or the busiest live replica's as their heartbeats say, is
        saturated. None while there is room."""
        load = max(self.load(), self.leases.fleet_load or 0.0)
        if load < BUSY_LOAD:
            return None
        return f"{load:.0%} of the last {LOAD_WINDOW_S:g} s spent answering devices"

    def _mine(self, s: Session, batch: list[_Inbound], tally: Counter[str]) -> list[_Inbound]:
        """The messages of `batch` this replica handles: those of things in partitions it holds
        (locked for the rest of `s`'s transaction), heard after it claimed them."""
        held = self.leases.holding(s, {m.partition for m in batch})
        mine = [m for m in batch if m.partition in held and m.received >= held[m.partition]]
        tally["not_mine"] += len(batch) - len(mine)
        return mine

    def _handle(self, s: Session, m: _Inbound, now: datetime, tally: Counter[str]) -> list[protocol.Outgoing]:
        if m.topic.startswith("tidegate/things/"):
            try:
                ingest(s, m.topic, m.payload, now)
                tally["telemetry_stored"] += 1
            except TelemetryRejectedError as exc:  # refused before anything was written
                tally["telemetry_rejected"] += 1
                log.warning("telemetry refused: %s", exc)
            return []
        tally["handled"] += 1
        return protocol.handle(s, m.topic, m.payload, now)

    @staticmethod
    def _failed(m: _Inbound) -> list[protocol.Outgoing]:
        if m.topic.startswith("tidegate/things/"):
            return []
        return [
            protocol.Outgoing(
                Topics.rejected(m.topic),
                {"code": "InternalError", "message": "the server could not process it"},
            )
        ]

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.sweep_interval_s):
            try:
                with self.db.session() as s:
                    # One replica sweeps at a time: the others find the lock taken and wait.
                    out = (
                        protocol.sweep(s, self.clock(), renotify_after=self.renotify_after)
                        if try_exclusive(s, "jobs-sweeper")
                        else []
                    )
                self.publish(out)
            except Exception:
                log.exception("jobs sweep failed")
