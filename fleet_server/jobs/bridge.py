"""The MQTT side of the jobs service: device requests in, replies and notifications out.

One paho client subscribes to every thing's jobs topics (``no_local``, so it
never hears its own replies); each request is handled in one database
transaction and its replies are published only after the commit. A sweeper
thread times out stuck executions and re-notifies devices that may have
missed a notification. A request that breaks the handler gets an
``InternalError`` reply; nothing stops the bridge.
"""

from __future__ import annotations

import logging
import ssl
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from fleet_server.db import Database
from fleet_server.jobs import protocol
from fleet_server.telemetry.service import TelemetryRejectedError, ingest
from shared.iotjobs import Topics

log = logging.getLogger("tidegate.server.jobs")
REQUESTS = "$aws/things/+/jobs/#"
TELEMETRY = "tidegate/things/+/+"


def _utcnow() -> datetime:
    return datetime.now(UTC)


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
    ) -> None:
        """`tls` = (CA file, client certificate, key) for a mutual-TLS broker."""
        self.db, self.clock = db, clock
        self.renotify_after, self.sweep_interval_s = renotify_after, sweep_interval_s
        self.host, self.port = host, port
        self.connected = threading.Event()
        self._stop = threading.Event()
        self._sweeper = threading.Thread(target=self._sweep_loop, name="jobs-sweeper", daemon=True)
        self.handled = 0
        self.telemetry_stored = 0
        self.telemetry_rejected = 0
        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
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
        self._client.connect_async(self.host, self.port, keepalive=30, clean_start=False, properties=props)
        self._client.loop_start()
        if not self.connected.wait(wait_s):
            raise TimeoutError(f"could not reach the MQTT broker at {self.host}:{self.port}")
        self._sweeper.start()
        return self

    def stop(self) -> None:
        self._stop.set()
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
        client.subscribe(
            [
                (REQUESTS, SubscribeOptions(qos=1, noLocal=True)),
                (TELEMETRY, SubscribeOptions(qos=1, noLocal=True)),
            ]
        )
        self.connected.set()

    def _on_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        topic = msg.topic
        if topic.startswith("tidegate/things/"):
            self._telemetry(topic, bytes(msg.payload))
            return
        last = topic.rsplit("/", 1)[-1]
        if last in ("accepted", "rejected", "notify", "notify-next"):
            return
        try:
            with self.db.session() as s:
                out = protocol.handle(s, topic, bytes(msg.payload), self.clock())
        except Exception:
            log.exception("jobs request on %s failed", topic)
            out = [
                protocol.Outgoing(
                    Topics.rejected(topic),
                    {"code": "InternalError", "message": "the server could not process it"},
                )
            ]
        self.handled += 1
        self.publish(out)

    def _telemetry(self, topic: str, payload: bytes) -> None:
        try:
            with self.db.session() as s:
                ingest(s, topic, payload, self.clock())
            self.telemetry_stored += 1
        except TelemetryRejectedError as exc:
            self.telemetry_rejected += 1
            log.warning("telemetry refused: %s", exc)
        except Exception:
            self.telemetry_rejected += 1
            log.exception("telemetry on %s failed", topic)

    def _sweep_loop(self) -> None:
        while not self._stop.wait(self.sweep_interval_s):
            try:
                with self.db.session() as s:
                    out = protocol.sweep(s, self.clock(), renotify_after=self.renotify_after)
                self.publish(out)
            except Exception:
                log.exception("jobs sweep failed")
