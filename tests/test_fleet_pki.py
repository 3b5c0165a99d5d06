"""Device PKI end to end: CA and certificates from the CLI, a Mosquitto configured for mTLS with
the generated ACL, the fleet server's bridge on its service identity, a real agent on its own
certificate, and a device certificate that cannot touch another device's execution."""

from __future__ import annotations

import json
import os
import ssl
import stat
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import select

from fleet_server.db import Database
from fleet_server.devices.service import register_device
from fleet_server.jobs.bridge import JobsBridge
from fleet_server.jobs.models import JobExecution
from fleet_server.migrate import upgrade
from tests.agent_world import build_world, device_view
from tests.mqtt_helpers import MOSQUITTO, free_port
from tests.test_agent_runtime import DaemonThread, job_doc, make_config

pytestmark = pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto binary not installed")


def tidegate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidegate", "server", *args], capture_output=True, text=True, timeout=60
    )


def tls_client(pki: Path, name: str, kind: str, port: int, client_id: str | None = None) -> mqtt.Client:
    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id or f"{name}-probe",
        protocol=mqtt.MQTTv5,
    )
    c.tls_set(
        ca_certs=str(pki / "ca.pem"),
        certfile=str(pki / kind / f"{name}.pem"),
        keyfile=str(pki / kind / f"{name}.key"),
        cert_reqs=ssl.CERT_REQUIRED,
    )
    c.connect("127.0.0.1", port)
    c.loop_start()
    deadline = time.monotonic() + 5
    while not c.is_connected() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert c.is_connected()
    return c


def test_device_certificates_and_the_broker_acl(tmp_path: Path, sample_payload: Path) -> None:
    # The broker drops to its own user: the PKI lives where that user can reach it (pytest's
    # own temp root is 0700), as a real deployment keeps it in /etc/tidegate/pki.
    import tempfile

    reachable = Path(tempfile.mkdtemp(prefix="tidegate-pki-"))
    reachable.chmod(0o711)
    pki = reachable / "pki"
    hidden = tmp_path / "hidden-pki"
    assert tidegate("ca", "init", "--dir", str(hidden)).returncode == 0
    if os.geteuid() == 0:
        p = tidegate("ca", "broker-config", "--dir", str(hidden))
        assert p.returncode != 0 and "cannot reach" in p.stderr  # says so instead of a broker that fails
    assert tidegate("ca", "init", "--dir", str(pki)).returncode == 0
    p = tidegate("ca", "init", "--dir", str(pki))
    assert p.returncode != 0 and "already exists" in p.stderr
    for thing in ("car-1", "car-2"):
        assert tidegate("device-cert", thing, "--dir", str(pki)).returncode == 0
    assert "invalid thing name" in tidegate("device-cert", "bad name", "--dir", str(pki)).stderr
    for bad in ("tidegate-fleet-server", "Tidegate-anything", "car/1", "car+", "car#"):
        refused = tidegate("device-cert", bad, "--dir", str(pki))
        assert refused.returncode != 0 and (
            "reserved for services" in refused.stderr or "invalid" in refused.stderr
        )
    assert stat.S_IMODE(os.stat(pki / "ca.key").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(pki / "devices" / "car-1.key").st_mode) == 0o600
    port = free_port()
    assert tidegate("ca", "broker-config", "--dir", str(pki), "--port", str(port)).returncode == 0
    conf = pki / "mosquitto.conf"  # started exactly as written: no line added or changed
    assert f"listener {port} 127.0.0.1" in conf.read_text()  # loopback unless told otherwise
    broker = subprocess.Popen(
        [MOSQUITTO, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=(tmp_path / "broker.log").open("wb")
    )
    time.sleep(0.5)
    assert broker.poll() is None, (tmp_path / "broker.log").read_text()
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    upgrade(db)
    service = pki / "services"
    bridge = JobsBridge(
        db,
        port=port,
        sweep_interval_s=1.0,
        tls=(pki / "ca.pem", service / "tidegate-fleet-server.pem", service / "tidegate-fleet-server.key"),
    ).start()
    world = build_world(tmp_path / "world", sample_payload)
    try:
        with db.session() as s:
            for thing in ("car-1", "car-2"):
                register_device(s, thing_name=thing, sku="edge-cpu", now=datetime.now(UTC))
        device, _ = world.copy(tmp_path / "car-1")
        cfg = json.loads((device / "device.json").read_text())
        cfg["device_id"] = "car-1"
        (device / "device.json").write_text(json.dumps(cfg))
        mqtt_cfg = {
            "port": port,
            "ca_file": str(pki / "ca.pem"),
            "cert_file": str(pki / "devices/car-1.pem"),
            "key_file": str(pki / "devices/car-1.key"),
        }
        bridge.queue_job("car-2", "j-car-2", job_doc(world, "v2"))
        with DaemonThread(make_config(tmp_path / "car-1", device, 1, mqtt=mqtt_cfg)):
            bridge.queue_job("car-1", "j-car-1", job_doc(world, "v2"))
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                with db.session() as s:
                    if s.scalars(
                        select(JobExecution.status).where(JobExecution.job_id == "j-car-1")
                    ).one() in ("SUCCEEDED", "FAILED"):
                        break
                time.sleep(0.1)
        with db.session() as s:
            assert (
                s.scalars(select(JobExecution.status).where(JobExecution.job_id == "j-car-1")).one()
                == "SUCCEEDED"
            )
        assert device_view(device)["version"] == "2.0.0"

        # car-1's certificate tries to finish car-2's execution and to read car-2's topics
        rogue = tls_client(pki, "car-1", "devices", port)
        got: list[str] = []
        rogue.on_message = lambda c, u, m: got.append(m.topic)
        rogue.subscribe("$aws/things/car-2/jobs/#", qos=1)
        rogue.subscribe("$aws/things/car-1/jobs/notify-next", qos=1)  # its own: allowed (the control)
        info = rogue.publish(
            "$aws/things/car-2/jobs/j-car-2/update", json.dumps({"status": "SUCCEEDED"}), qos=1
        )
        info.wait_for_publish(5)
        rogue.publish("$aws/things/car-2/jobs/start-next", "{}", qos=1).wait_for_publish(5)
        bridge.queue_job("car-2", "j2-car-2", job_doc(world, "v2"))  # car-2 gets a notification…
        bridge.queue_job("car-1", "j2-car-1", job_doc(world, "v2"))
        time.sleep(1.0)
        rogue.loop_stop()
        rogue.disconnect()
        assert got and set(got) == {"$aws/things/car-1/jobs/notify-next"}  # …that car-1 never sees

        # client-id takeover: car-1's certificate asking for car-2's or the service's client id
        # gets its own (the CN); the victims keep their connections
        victim = tls_client(pki, "car-2", "devices", port)
        drops: list[str] = []
        victim.on_disconnect = lambda *a: drops.append("car-2")
        for stolen in ("car-2", "tidegate-fleet-server"):
            thief = tls_client(pki, "car-1", "devices", port, client_id=stolen)
            time.sleep(0.5)
            assert victim.is_connected() and bridge.connected.is_set(), stolen
            thief.loop_stop()
            thief.disconnect()
        assert not drops
        # a packet above the broker's bound is refused: the sender is disconnected
        big = tls_client(pki, "car-1", "devices", port)
        big.publish("tidegate/things/car-1/beacon", b"x" * (300 * 1024), qos=1)
        deadline = time.monotonic() + 5
        while big.is_connected() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not big.is_connected()
        big.loop_stop()
        victim.loop_stop()
        victim.disconnect()
        with db.session() as s:
            assert (
                s.scalars(select(JobExecution.status).where(JobExecution.job_id == "j-car-2")).one()
                == "QUEUED"
            )
    finally:
        bridge.stop()
        broker.terminate()
        broker.wait(10)
        import shutil

        shutil.rmtree(reachable, ignore_errors=True)
