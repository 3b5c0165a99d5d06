"""MQTT transports behind one small interface.

`PahoTransport` (the default) speaks MQTT 5 through paho-mqtt: TLS with a
client certificate, a persistent session (clean start off, a session expiry
interval) and QoS 1, so subscriptions and queued messages survive a broker
restart; reconnects back off exponentially from a base that is re-drawn at
random after every disconnect, so a fleet does not reconnect in lockstep.
Callbacks from paho's network thread are handed to the asyncio loop.
"""

from __future__ import annotations

import asyncio
import logging
import random
import ssl
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]
ConnectHandler = Callable[[], None]


@dataclass(frozen=True)
class MqttSettings:
    host: str = "127.0.0.1"
    port: int = 1883
    client_id: str = ""
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 60.0
    publish_timeout_s: float = 10.0
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    username: str | None = None
    password: str | None = None


class Transport(Protocol):
    @property
    def connected(self) -> bool: ...

    #: Why the last connection attempt failed (TLS, refused, unreachable); None once connected.
    last_error: str | None

    def set_handlers(self, on_message: MessageHandler, on_connect: ConnectHandler) -> None: ...

    def subscribe(self, topics: list[str]) -> None:
        """Topics to hold; (re)subscribed with QoS 1 on every connect."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def publish(self, topic: str, payload: bytes) -> bool:
        """QoS 1; True once the broker acknowledged it, False on timeout."""


class TransportBase:
    """What every transport keeps the same way: handlers, the topics to hold, connection state."""

    def __init__(self, settings: MqttSettings) -> None:
        self.settings = settings
        self._topics: list[str] = []
        self._on_message: MessageHandler = lambda t, p: None
        self._on_connect: ConnectHandler = lambda: None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._connected = False
        self.last_error: str | None = None

    @property
    def connected(self) -> bool:
        return self._connected

    def set_handlers(self, on_message: MessageHandler, on_connect: ConnectHandler) -> None:
        self._on_message, self._on_connect = on_message, on_connect

    def _remember(self, topics: list[str]) -> None:
        self._topics = list(dict.fromkeys([*self._topics, *topics]))


class PahoTransport(TransportBase):
    def __init__(self, settings: MqttSettings) -> None:
        super().__init__(settings)
        self._closing = False
        self._rng = random.Random()
        c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=settings.client_id,
            protocol=mqtt.MQTTv5,
        )
        if settings.ca_file or settings.cert_file:
            c.tls_set(
                ca_certs=str(settings.ca_file) if settings.ca_file else None,
                certfile=str(settings.cert_file) if settings.cert_file else None,
                keyfile=str(settings.key_file) if settings.key_file else None,
                cert_reqs=ssl.CERT_REQUIRED,
            )
        if settings.username:
            c.username_pw_set(settings.username, settings.password)
        c.max_inflight_messages_set(20)
        c.on_connect = self._paho_connect
        c.on_connect_fail = self._paho_connect_fail
        c.on_disconnect = self._paho_disconnect
        c.on_message = self._paho_message
        c.on_subscribe = self._paho_subscribe
        self._sub_mid: int | None = None
        self._sub_topics: list[str] = []
        self.refused: dict[str, str] = {}  # topic → the broker's reason, from the last SUBACK
        self.taken_over = 0  # closes in a row soon after connecting (a takeover, or a flap)
        self._connected_at = 0.0
        self.connects = 0
        self._jitter_reconnect(c)
        self._client = c

    def subscribe(self, topics: list[str]) -> None:
        self._remember(topics)
        if self._connected:
            self._client.subscribe([(t, SubscribeOptions(qos=1)) for t in topics])

    def _jitter_reconnect(self, c: mqtt.Client) -> None:
        base = self.settings.reconnect_min_s * self._rng.uniform(0.5, 1.5)
        c.reconnect_delay_set(
            min_delay=max(1, round(base)), max_delay=max(1, int(self.settings.reconnect_max_s))
        )

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = self.settings.session_expiry_s
        self._client.connect_async(
            self.settings.host,
            self.settings.port,
            keepalive=self.settings.keepalive_s,
            clean_start=False,
            properties=props,
        )
        self._client.loop_start()

    async def stop(self) -> None:
        self._closing = True
        self._client.disconnect()
        await asyncio.get_running_loop().run_in_executor(None, self._client.loop_stop)
        self._connected = False

    async def publish(self, topic: str, payload: bytes) -> bool:
        info = self._client.publish(topic, payload, qos=1)
        loop = asyncio.get_running_loop()

        def wait() -> bool:
            deadline = time.monotonic() + self.settings.publish_timeout_s
            try:
                while not info.is_published() and not self._closing and time.monotonic() < deadline:
                    info.wait_for_publish(0.1)
            except (RuntimeError, ValueError):
                return False
            return info.is_published()

        return await loop.run_in_executor(None, wait)

    # ---- paho's network thread ----------------------------------------------------------------

    def _paho_connect_fail(self, client: mqtt.Client, userdata: Any) -> None:
        # paho calls this from inside its `except OSError`: the error is the one in flight.
        exc = sys.exc_info()[1]
        why = f"{type(exc).__name__}: {exc}" if exc is not None else "the connection failed"
        error = f"cannot connect to {self.settings.host}:{self.settings.port}: {why}"
        if error != self.last_error:  # once per distinct cause, not once per retry
            log.error("MQTT %s", error)
        self.last_error = error

    def _paho_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.last_error = f"the broker refused the connection: {reason}"
            log.warning("MQTT connect refused: %s", reason)
            return
        self._connected = True
        self.last_error = None
        self._connected_at = time.monotonic()
        self.connects += 1
        if self._topics:
            # Requests go out only once the replies' subscriptions are acknowledged.
            self._sub_topics = list(self._topics)
            _, self._sub_mid = client.subscribe([(t, SubscribeOptions(qos=1)) for t in self._sub_topics])
        elif self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_connect)

    def _paho_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        if mid == self._sub_mid:
            self.refused = refused_subscriptions(self._sub_topics, reasons)
            for topic, why in self.refused.items():  # the broker said no: nothing will arrive there
                log.error("MQTT subscription to %s refused by the broker: %s", topic, why)
        if mid == self._sub_mid and self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_connect)

    def _paho_disconnect(
        self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any
    ) -> None:
        self._connected = False
        lived = time.monotonic() - self._connected_at
        if getattr(reason, "value", None) == SESSION_TAKEN_OVER or lived < FLAP_S:
            # Closed soon after it opened (brokers close a connection whose client id another
            # one takes, some without saying so): reconnecting at once would take it back and
            # start a flap. Each such close in a row doubles the wait, up to the longest.
            self.taken_over += 1
            wait = min(self.settings.reconnect_max_s, self.settings.reconnect_min_s * 2**self.taken_over)
            client.reconnect_delay_set(min_delay=max(1, int(wait)), max_delay=max(1, int(wait)))
            log.warning(
                "MQTT connection closed %.1f s after it opened (%s): another connection may hold "
                "this client id; retrying in %d s",
                lived,
                reason,
                int(wait),
            )
            return
        self.taken_over = 0
        self._jitter_reconnect(client)
        log.info("MQTT disconnected (%s); reconnecting with backoff", reason)

    def _paho_message(self, client: mqtt.Client, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_message, msg.topic, bytes(msg.payload))


SESSION_TAKEN_OVER = 0x8E  # MQTT 5 reason code
FLAP_S = 10.0  # a connection closed sooner than this counts as a takeover or a flap


def refused_subscriptions(topics: list[str], reasons: Any) -> dict[str, str]:
    """The topics a SUBACK refused (MQTT 5 reason codes of 0x80 and above), with the reason."""
    out = {}
    for topic, rc in zip(topics, reasons or [], strict=False):
        value = getattr(rc, "value", rc)
        if isinstance(value, int) and value >= 0x80:
            out[topic] = str(rc)
    return out
