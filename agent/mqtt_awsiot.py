"""The AWS IoT Device SDK v2 transport (extra ``aws``: ``pip install tidegate[aws]``).

The same `Transport` interface as `PahoTransport`, on awscrt's MQTT 5 client:
mutual TLS with the device certificate for AWS IoT Core (or plain TCP for a
local broker), a rejoined persistent session, QoS 1, and the SDK's own
reconnect backoff with full jitter.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from agent.errors import AgentError
from agent.mqtt import MqttSettings, TransportBase

log = logging.getLogger(__name__)


class AwsIotTransport(TransportBase):
    def __init__(self, settings: MqttSettings) -> None:
        try:
            from awscrt import io, mqtt5
        except ImportError as exc:
            raise AgentError(
                "mqtt.transport = 'awsiot' needs the 'aws' extra: pip install 'tidegate[aws]'"
            ) from exc
        super().__init__(settings)
        self._mqtt5 = mqtt5
        tls = None
        if settings.cert_file and settings.key_file:
            opts = io.TlsContextOptions.create_client_with_mtls_from_path(
                str(settings.cert_file), str(settings.key_file)
            )
            if settings.ca_file:
                opts.override_default_trust_store_from_path(None, str(settings.ca_file))
            tls = io.ClientTlsContext(opts)
        self._client = mqtt5.Client(
            mqtt5.ClientOptions(
                host_name=settings.host,
                port=settings.port,
                tls_ctx=tls,
                connect_options=mqtt5.ConnectPacket(
                    client_id=settings.client_id,
                    keep_alive_interval_sec=settings.keepalive_s,
                    session_expiry_interval_sec=settings.session_expiry_s,
                    username=settings.username,
                    password=settings.password.encode() if settings.password else None,
                ),
                session_behavior=mqtt5.ClientSessionBehaviorType.REJOIN_ALWAYS,
                retry_jitter_mode=mqtt5.ExponentialBackoffJitterMode.FULL,
                min_reconnect_delay_ms=int(settings.reconnect_min_s * 1000),
                max_reconnect_delay_ms=int(settings.reconnect_max_s * 1000),
                ack_timeout_sec=int(settings.publish_timeout_s),
                on_publish_callback_fn=self._crt_publish,
                on_lifecycle_event_connection_success_fn=self._crt_connected,
                on_lifecycle_event_disconnection_fn=self._crt_disconnected,
            )
        )

    def subscribe(self, topics: list[str]) -> None:
        self._remember(topics)  # subscribed on every connect

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._client.start()

    async def stop(self) -> None:
        self._client.stop()
        self._connected = False

    async def publish(self, topic: str, payload: bytes) -> bool:
        mqtt5 = self._mqtt5
        try:
            fut = self._client.publish(
                mqtt5.PublishPacket(topic=topic, payload=payload, qos=mqtt5.QoS.AT_LEAST_ONCE)
            )
            # shield: a timeout here must not cancel the SDK's future, which it completes later
            result = await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(fut)), self.settings.publish_timeout_s
            )
        except (TimeoutError, Exception) as exc:  # awscrt raises its own exception types
            log.debug("publish to %s not acknowledged: %s", topic, exc)
            return False
        puback = getattr(result, "puback", None)
        return puback is not None and int(puback.reason_code) < 0x80

    # ---- awscrt's threads ------------------------------------------------------------------------

    def _crt_connected(self, data: Any) -> None:
        self._connected = True
        mqtt5 = self._mqtt5
        if not self._topics:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._on_connect)
            return
        fut = self._client.subscribe(
            mqtt5.SubscribePacket(
                subscriptions=[
                    mqtt5.Subscription(topic_filter=t, qos=mqtt5.QoS.AT_LEAST_ONCE) for t in self._topics
                ]
            )
        )

        def subscribed(_: Any) -> None:
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._on_connect)

        fut.add_done_callback(subscribed)

    def _crt_disconnected(self, data: Any) -> None:
        self._connected = False

    def _crt_publish(self, data: Any) -> None:
        packet = data.publish_packet
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._on_message, packet.topic, bytes(packet.payload or b""))
