"""A misbehaving device for tests and benchmarks: one MQTT connection sending `jobs/get` (or,
with KIND `beacon`, valid health beacons, which the server would store) at a fixed rate (a
retry loop gone wrong, or a stolen certificate), counting the answers.

    python -m fleet_server.sim.flood PORT RATE [THING] [KIND] [CA CERT_DIR]

With CA and CERT_DIR it connects over mutual TLS on `CERT_DIR/THING.pem` and `.key` as the
device itself would (client id = its thing name), against a broker that checks and limits
each connection.

Prints ``ready`` once connected, floods until SIGTERM, then prints one JSON line: requests
sent, requests answered ``accepted`` (they got past the server's limit) and the codes of
the ``rejected`` answers.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


def main(argv: list[str]) -> int:
    port, rate = int(argv[0]), float(argv[1])
    thing = argv[2] if len(argv) > 2 else "flood-1"
    kind = argv[3] if len(argv) > 3 else "get"
    tls = (argv[4], Path(argv[5])) if len(argv) > 5 else None
    stats: dict[str, Any] = {"sent": 0, "answered": 0, "codes": []}

    def on_message(c: mqtt.Client, u: Any, m: mqtt.MQTTMessage) -> None:
        if m.topic.endswith("/accepted"):
            stats["answered"] += 1
        else:
            stats["codes"].append(json.loads(m.payload)["code"])

    running = [True]
    signal.signal(signal.SIGTERM, lambda *a: running.__setitem__(0, False))
    c = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=thing)
    c.on_message = on_message
    if tls is not None:
        c.tls_set(
            ca_certs=tls[0], certfile=str(tls[1] / f"{thing}.pem"), keyfile=str(tls[1] / f"{thing}.key")
        )
    c.connect("127.0.0.1", port)
    c.loop_start()
    deadline = time.monotonic() + 10
    while not c.is_connected():
        if time.monotonic() > deadline:
            print("not connected", file=sys.stderr)
            return 1
        time.sleep(0.02)
    c.subscribe([(f"$aws/things/{thing}/jobs/get/{r}", 0) for r in ("rejected", "accepted")])
    time.sleep(0.3)
    print("ready", flush=True)
    topic, body = f"$aws/things/{thing}/jobs/get", b'{"clientToken":"flood"}'
    if kind == "beacon":
        from datetime import UTC, datetime

        from shared.telemetry import BEACON_TOPIC, HealthBeacon

        topic = BEACON_TOPIC.format(thing=thing)
        beacon = HealthBeacon(seq=0, device_id=thing, sku="flood", at=datetime.now(UTC), agent_version="0")
        body = beacon.model_dump_json().encode()
    t0 = time.monotonic()
    while running[0]:
        while stats["sent"] < rate * (time.monotonic() - t0):  # paced in slices of 10 ms
            c.publish(topic, body, qos=0)
            stats["sent"] += 1
        time.sleep(0.01)
    time.sleep(1.0)  # the last answers
    c.loop_stop()
    print(json.dumps(stats), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
