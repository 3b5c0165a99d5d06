"""Simulated devices that speak the AWS IoT Jobs device protocol exactly as the agent does
(notify-next → start-next → IN_PROGRESS progress → SUCCEEDED / FAILED / waiting on unmet
preconditions), thousands of them in one process.

To reach fleet scale on one machine they share one MQTT connection (each device's messages
still go to and come from its own ``$aws/things/<thing>/jobs/...`` topics). Given `tls`, each
device instead holds its own mutual-TLS connection on its own certificate, with its thing
name as client id and subscriptions to its own topics only, as the agent does: what a broker
that limits and checks each connection (the generated configuration's guard) sees of a
fleet. That costs a network thread per device, so it is for fleets of hundreds.

A request left unanswered for `retry_s` is sent again with the same clientToken, as the agent
does: a fleet-server replica killed between a commit and its reply, or before it handled what
it had heard, loses that reply. A retried status update refused with VersionMismatch was
applied the first time, and counts as applied.
"""

from __future__ import annotations

import heapq
import json
import random
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.subscribeoptions import SubscribeOptions


@dataclass
class SimSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    install_s: tuple[float, float] = (0.05, 0.2)
    fail_rate: float = 0.0
    unmet_rate: float = 0.0
    seed: int = 0
    retry_s: float = 3.0
    tls: SimTls | None = None


@dataclass(frozen=True)
class SimTls:
    """Per-device mutual TLS: `ca` verifies the broker; device `<thing>` connects with
    `certs/<thing>.pem` and `certs/<thing>.key` (the layout `tidegate server device-cert` writes)."""

    ca: Path
    certs: Path


@dataclass
class SimStats:
    started: int = 0
    succeeded: int = 0
    failed: int = 0
    waiting: int = 0
    updates_sent: int = 0
    retries: int = 0
    applied_on_retry: int = 0
    duplicate_replies: int = 0
    rejected: Counter[str] = field(default_factory=Counter)


class SimulatedFleet:
    def __init__(self, things: list[str], settings: SimSettings) -> None:
        self.things = set(things)
        self.s = settings
        self.stats = SimStats()
        self._rng = random.Random(settings.seed)
        self._fail = {t for t in sorted(things) if self._rng.random() < settings.fail_rate}
        self._unmet = {
            t for t in sorted(things) if t not in self._fail and self._rng.random() < settings.unmet_rate
        }
        self._lock = threading.Lock()
        self._timers: list[tuple[float, int, str, str, int]] = []  # (due, seq, thing, job, version)
        self._seq = 0
        self._busy: set[str] = set()
        self._waiting: dict[str, tuple[str, int]] = {}  # thing → (job, expected version)
        self._pending: dict[str, tuple[float, str, dict[str, Any]]] = {}  # token → (sent, topic, body)
        self._retried: set[str] = set()
        self._updating: dict[str, str] = {}  # thing → clientToken of its unanswered update
        # Updates waiting for the answer to the one in flight, in order (an install's progress
        # and its result can both be due while a slow server has not answered yet).
        self._held_updates: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        self.update_accepted_at: list[float] = []  # wall time of every accepted status update
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.connected = threading.Event()
        self._subscribed: set[str] = set()  # per-device connections whose SUBACK came
        self.refused: dict[str, list[str]] = {}  # connection → SUBACK codes, when any was refused
        # One shared connection (userdata None: it subscribes to every device's topics), or
        # one per device (userdata its thing name).
        self._clients: dict[str | None, mqtt.Client]
        if settings.tls is None:
            self._clients = {None: self._client(f"tidegate-sim-{uuid.uuid4().hex[:8]}", None)}
        else:
            self._clients = {t: self._client(t, t) for t in sorted(self.things)}
        self._timer_thread = threading.Thread(target=self._timer_loop, daemon=True, name="sim-timers")

    def _client(self, client_id: str, thing: str | None) -> mqtt.Client:
        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            protocol=mqtt.MQTTv5,
            userdata=thing,
        )
        c.max_inflight_messages_set(1000 if thing is None else 20)
        c.max_queued_messages_set(0)
        if self.s.tls is not None and thing is not None:
            c.tls_set(
                ca_certs=str(self.s.tls.ca),
                certfile=str(self.s.tls.certs / f"{thing}.pem"),
                keyfile=str(self.s.tls.certs / f"{thing}.key"),
            )
        c.on_connect = self._on_connect
        c.on_subscribe = self._on_subscribe
        c.on_message = self._on_message
        return c

    def start(self, timeout_s: float = 30.0) -> SimulatedFleet:
        for c in self._clients.values():
            c.connect(self.s.host, self.s.port, keepalive=30)
            c.loop_start()
        if not self.connected.wait(timeout_s):
            raise TimeoutError(
                f"simulator: {len(self._clients) - len(self._subscribed)} of {len(self._clients)} "
                f"connections not subscribed after {timeout_s:g} s; refused: {self.refused or 'none'}"
            )
        self._timer_thread.start()
        return self

    def stop(self) -> None:
        """Disconnect every connection and release its sockets now: a paho client holds three
        descriptors until it is collected, and a process past 1,024 of them breaks paho's
        select() (the next fleet's connections fail with protocol errors)."""
        self._stop.set()
        self._wake.set()
        for c in self._clients.values():
            c.disconnect()
        deadline = time.monotonic() + 5
        for c in self._clients.values():
            while c.is_connected() and time.monotonic() < deadline:
                time.sleep(0.01)  # the DISCONNECT written before the network thread ends
            c.loop_stop()
            c.on_connect = c.on_subscribe = c.on_message = None  # no cycle back to the fleet
        self._clients.clear()

    def _send(self, topic: str, body: dict[str, Any]) -> None:
        """On the device's own connection, or the shared one (none once stopped)."""
        c = self._clients.get(topic.split("/")[2] if self.s.tls is not None else None)
        if c is not None:
            c.publish(topic, json.dumps(body), qos=1)

    def poll_all(self) -> None:
        """start-next for every device, as agents do on connect."""
        for t in sorted(self.things):
            self._start_next(t)

    # ---- protocol ---------------------------------------------------------------------------------

    def _pub(self, topic: str, body: dict[str, Any]) -> None:
        with self._lock:
            self._pending[body["clientToken"]] = (time.monotonic(), topic, body)
        self._send(topic, body)

    def _retry_unanswered(self) -> None:
        cutoff = time.monotonic() - self.s.retry_s
        with self._lock:
            due = [(t, topic, body) for t, (sent, topic, body) in self._pending.items() if sent < cutoff]
            for token, topic, body in due:
                self._pending[token] = (time.monotonic(), topic, body)
                self._retried.add(token)
            self.stats.retries += len(due)
        for _, topic, body in due:
            self._send(topic, body)

    def _start_next(self, thing: str) -> None:
        self._pub(f"$aws/things/{thing}/jobs/start-next", {"clientToken": uuid.uuid4().hex[:16]})

    def _update(self, thing: str, job: str, status: str, version: int, details: dict[str, str]) -> None:
        """One update at a time per device, as the agent sends them: the next waits for the
        answer to the last (sent ahead, it would meet the version the lost one never moved)."""
        body: dict[str, Any] = {
            "status": status,
            "statusDetails": details,
            "expectedVersion": version,
            "includeJobExecutionState": True,
            "clientToken": uuid.uuid4().hex[:16],
        }
        topic = f"$aws/things/{thing}/jobs/{job}/update"
        with self._lock:
            if self._updating.get(thing) in self._pending:
                self._held_updates.setdefault(thing, []).append((topic, body))
                return
            self._updating[thing] = body["clientToken"]
            self.stats.updates_sent += 1
        self._pub(topic, body)

    def _answered(self, thing: str) -> None:
        """The device's last update was answered: send the one held behind it."""
        with self._lock:
            queue = self._held_updates.get(thing)
            if not queue:
                self._held_updates.pop(thing, None)
                self._updating.pop(thing, None)
                return
            held = queue.pop(0)
            self._updating[thing] = held[1]["clientToken"]
            self.stats.updates_sent += 1
        self._pub(*held)

    def _on_connect(self, c: mqtt.Client, thing: str | None, f: Any, reason: Any, p: Any) -> None:
        if reason.is_failure:
            return  # paho retries; `start` reports what never subscribed
        opts = SubscribeOptions(qos=1)
        who = thing or "+"
        c.subscribe(
            [
                (f"$aws/things/{who}/jobs/notify-next", opts),
                (f"$aws/things/{who}/jobs/start-next/accepted", opts),
                (f"$aws/things/{who}/jobs/start-next/rejected", opts),
                (f"$aws/things/{who}/jobs/+/update/accepted", opts),
                (f"$aws/things/{who}/jobs/+/update/rejected", opts),
            ]
        )

    def _on_subscribe(self, c: mqtt.Client, thing: str | None, mid: int, codes: Any, p: Any) -> None:
        """Requests go out only once the answers can come back (the SUBACK is in)."""
        with self._lock:
            if any(code.is_failure for code in codes):
                self.refused[thing or "fleet"] = [str(code) for code in codes]
                return
            self._subscribed.add(thing or "")
            done = len(self._subscribed) == len(self._clients)
        if done:
            self.connected.set()

    def _on_message(self, c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        thing = parts[2]
        if thing not in self.things:
            return
        try:
            body = json.loads(msg.payload)
        except ValueError:
            return
        token = body.get("clientToken")
        with self._lock:
            asked = self._pending.pop(token, None) if isinstance(token, str) else None
            retried = token in self._retried
            self._retried.discard(token)
        if parts[-1] == "notify-next":
            if body.get("execution") and thing not in self._busy:
                self._start_next(thing)
        elif parts[-2:] == ["start-next", "accepted"]:
            ex = body.get("execution")
            if not ex or thing in self._busy:
                return
            self._begin(thing, ex)
        elif parts[-1] == "rejected":
            if asked is None and isinstance(token, str):
                with self._lock:  # a second answer to one request (it was handled twice)
                    self.stats.duplicate_replies += 1
                return
            if retried and body.get("code") == "VersionMismatch" and asked is not None:
                with self._lock:  # the first copy was applied; its reply was lost
                    self.stats.applied_on_retry += 1
                    if asked[2].get("status") in ("SUCCEEDED", "FAILED", "REJECTED"):
                        self._busy.discard(thing)
            else:
                with self._lock:
                    self.stats.rejected[str(body.get("code"))] += 1
            if parts[-2] == "update":
                self._answered(thing)
        elif parts[-2:] == ["update", "accepted"]:
            if asked is None and isinstance(token, str):
                with self._lock:
                    self.stats.duplicate_replies += 1
                return
            self.update_accepted_at.append(time.time())
            state = body.get("executionState") or {}
            if state.get("status") in ("SUCCEEDED", "FAILED", "REJECTED"):
                with self._lock:
                    self._busy.discard(thing)
            self._answered(thing)

    def _begin(self, thing: str, ex: dict[str, Any]) -> None:
        job, version = ex["jobId"], int(ex["versionNumber"])
        with self._lock:
            self._busy.add(thing)
            self.stats.started += 1
        if thing in self._unmet:
            # Said before it counts as waiting: a charge (`satisfy`) in between would otherwise
            # send the install's update ahead of this one, which the server then refuses
            # (VersionMismatch) and the device would wait for ever.
            self._update(
                thing, job, "IN_PROGRESS", version, {"step": "waiting", "unmet": "battery: 12% < 30%"}
            )
            with self._lock:
                self.stats.waiting += 1
                self._waiting[thing] = (job, version + 1)
            return
        self._install(thing, job, version)

    def _install(self, thing: str, job: str, version: int) -> None:
        self._update(thing, job, "IN_PROGRESS", version, {"step": "downloading"})
        due = time.monotonic() + self._rng.uniform(*self.s.install_s)
        with self._lock:
            self._seq += 1
            heapq.heappush(self._timers, (due, self._seq, thing, job, version + 1))
        self._wake.set()

    def satisfy(self) -> int:
        """The devices waiting on their preconditions meet them (chargers plugged in): each
        goes on with its install, as the agent does at its next re-check; how many did."""
        with self._lock:
            waiting, self._waiting = self._waiting, {}
            self._unmet -= set(waiting)
            self.stats.waiting -= len(waiting)
        for thing, (job, version) in waiting.items():
            self._install(thing, job, version)
        return len(waiting)

    def _timer_loop(self) -> None:
        next_retry = time.monotonic() + self.s.retry_s / 2
        while not self._stop.is_set():
            if time.monotonic() >= next_retry:
                self._retry_unanswered()
                next_retry = time.monotonic() + min(0.5, self.s.retry_s / 2)
            with self._lock:
                nxt = self._timers[0][0] if self._timers else None
            if nxt is None:
                self._wake.wait(0.5)
                self._wake.clear()
                continue
            delay = nxt - time.monotonic()
            if delay > 0:
                self._wake.wait(min(delay, 0.5, max(0.0, next_retry - time.monotonic())))
                self._wake.clear()
                continue
            with self._lock:
                _, _, thing, job, version = heapq.heappop(self._timers)
            failed = thing in self._fail
            with self._lock:
                if failed:
                    self.stats.failed += 1
                else:
                    self.stats.succeeded += 1
            self._update(
                thing,
                job,
                "FAILED" if failed else "SUCCEEDED",
                version,
                {"reason": "self-test failed (simulated)" if failed else "committed"},
            )
