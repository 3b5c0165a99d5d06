"""Real MQTT for tests: a Mosquitto broker on a free port, and a scripted AWS IoT Jobs
endpoint that plays the service side of the protocol over it."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shared.net import free_port

MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"


class Broker:
    """A private Mosquitto with persistence, so sessions and queued QoS 1 messages survive a restart."""

    def __init__(self, workdir: Path, *, tls: tuple[Path, Path, Path] | None = None) -> None:
        """`tls` = (CA file, server cert, server key) adds a second, mutual-TLS listener on `tls_port`."""
        self.port = free_port()
        self.tls_port = free_port() if tls else None
        self.dir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self.conf = workdir / "mosquitto.conf"
        text = (
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {workdir}/\nmax_queued_messages 100000\nlog_dest file {workdir}/log\n"
        )
        if os.geteuid() == 0:
            text += "user root\n"  # else mosquitto drops to 'mosquitto', who cannot read the test's files
        if tls:
            ca, cert, key = tls
            text += (
                f"listener {self.tls_port} 127.0.0.1\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
                "require_certificate true\nuse_identity_as_username true\n"
            )
        self.conf.write_text(text)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Broker:
        self.proc = subprocess.Popen(
            [MOSQUITTO, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", self.port)) == 0:
                    return self
            time.sleep(0.05)
        raise RuntimeError("mosquitto did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()  # SIGTERM: mosquitto writes its persistence file
            self.proc.wait(10)
            self.proc = None


def client(port: int, client_id: str, *, persistent: bool = False) -> mqtt.Client:
    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
    )
    props = Properties(PacketTypes.CONNECT)
    if persistent:
        props.SessionExpiryInterval = 3600
    c.connect("127.0.0.1", port, clean_start=not persistent, properties=props)
    c.loop_start()
    return c


@dataclass
class Execution:
    job_id: str
    thing: str
    document: dict[str, Any]
    status: str = "QUEUED"
    version: int = 1
    details: dict[str, str] = field(default_factory=dict)
    history: list[tuple[str, dict[str, str]]] = field(default_factory=list)


class JobsEndpoint:
    """The service side of AWS IoT Jobs, scripted for tests (one execution queue per thing)."""

    def __init__(self, port: int) -> None:
        self.lock = threading.Lock()
        self.executions: dict[str, list[Execution]] = {}
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.throttle_terminal = 0  # answer this many terminal updates RequestThrottled
        self.port = port
        self.c = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id="jobs-endpoint", protocol=mqtt.MQTTv5
        )
        self.c.on_message = self._on_message
        self.c.on_connect = lambda c, u, f, r, p: c.subscribe("$aws/things/+/jobs/#", qos=1)
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        time.sleep(0.2)

    def close(self) -> None:
        self.c.loop_stop()
        self.c.disconnect()

    def add_job(self, thing: str, job_id: str, document: dict[str, Any]) -> Execution:
        ex = Execution(job_id, thing, document)
        with self.lock:
            self.executions.setdefault(thing, []).append(ex)
        self._notify_next(thing)
        return ex

    def terminal(self, thing: str, job_id: str) -> list[str]:
        with self.lock:
            ex = next(e for e in self.executions[thing] if e.job_id == job_id)
            return [s for s, _ in ex.history if s not in ("QUEUED", "IN_PROGRESS")]

    def wait_status(self, thing: str, job_id: str, statuses: set[str], timeout: float = 60) -> Execution:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                ex = next(e for e in self.executions[thing] if e.job_id == job_id)
                if ex.status in statuses:
                    return ex
            time.sleep(0.05)
        raise AssertionError(f"job {job_id} stayed {ex.status} (history {ex.history})")

    def _doc(self, ex: Execution) -> dict[str, Any]:
        return {
            "jobId": ex.job_id,
            "thingName": ex.thing,
            "jobDocument": ex.document,
            "status": ex.status,
            "statusDetails": ex.details,
            "versionNumber": ex.version,
            "executionNumber": 1,
            "queuedAt": 0,
            "lastUpdatedAt": int(time.time()),
        }

    def _notify_next(self, thing: str) -> None:
        with self.lock:
            pending = [e for e in self.executions.get(thing, []) if e.status in ("QUEUED", "IN_PROGRESS")]
            body: dict[str, Any] = {"timestamp": int(time.time())}
            if pending:
                body["execution"] = self._doc(pending[0])
        self.c.publish(f"$aws/things/{thing}/jobs/notify-next", json.dumps(body), qos=1)

    def _reply(self, topic: str, accepted: bool, body: dict[str, Any], token: Any) -> None:
        body = {**body, "timestamp": int(time.time())}
        if token is not None:
            body["clientToken"] = token
        self.c.publish(f"{topic}/{'accepted' if accepted else 'rejected'}", json.dumps(body), qos=1)

    def _on_message(self, c: mqtt.Client, u: Any, msg: mqtt.MQTTMessage) -> None:
        parts = msg.topic.split("/")
        if parts[-1] in ("accepted", "rejected") or parts[-1].startswith("notify"):
            return
        thing = parts[2]
        try:
            body = json.loads(msg.payload)
        except ValueError:
            self._reply(msg.topic, False, {"code": "InvalidJson", "message": "bad json"}, None)
            return
        token = body.get("clientToken")
        self.requests.append((msg.topic, body))
        notify = False
        with self.lock:
            queue = self.executions.get(thing, [])
            if parts[-1] == "start-next":
                pending = [e for e in queue if e.status in ("QUEUED", "IN_PROGRESS")]
                if not pending:
                    out: dict[str, Any] = {}
                else:
                    ex = pending[0]
                    if ex.status == "QUEUED":
                        ex.status, ex.version = "IN_PROGRESS", ex.version + 1
                        ex.details.update(body.get("statusDetails") or {})
                        ex.history.append(("IN_PROGRESS", dict(ex.details)))
                    out = {"execution": self._doc(ex)}
                accepted = True
            elif parts[-1] in ("update", "get") and len(parts) == 6:
                job_id = parts[4]
                ex2 = next((e for e in queue if e.job_id == job_id), None)
                if ex2 is None:
                    accepted, out = False, {"code": "ResourceNotFound", "message": job_id}
                elif parts[-1] == "get":
                    accepted, out = True, {"execution": self._doc(ex2)}
                elif body.get("expectedVersion") not in (None, ex2.version):
                    accepted, out = (
                        False,
                        {
                            "code": "VersionMismatch",
                            "message": "version",
                            "executionState": {"status": ex2.status, "versionNumber": ex2.version},
                        },
                    )
                elif ex2.status not in ("QUEUED", "IN_PROGRESS"):
                    accepted, out = False, {"code": "InvalidStateTransition", "message": ex2.status}
                elif self.throttle_terminal and body.get("status") not in ("QUEUED", "IN_PROGRESS"):
                    self.throttle_terminal -= 1
                    accepted, out = False, {"code": "RequestThrottled", "message": "too many requests"}
                else:
                    ex2.status, ex2.version = body["status"], ex2.version + 1
                    ex2.details = dict(body.get("statusDetails") or {})
                    ex2.history.append((ex2.status, dict(ex2.details)))
                    accepted = True
                    out = {
                        "executionState": {
                            "status": ex2.status,
                            "statusDetails": ex2.details,
                            "versionNumber": ex2.version,
                        }
                    }
                    notify = ex2.status not in ("QUEUED", "IN_PROGRESS")
            else:
                accepted, out = False, {"code": "InvalidTopic", "message": msg.topic}
        self._reply(msg.topic, accepted, out, token)
        if notify:
            self._notify_next(thing)


def generated_broker(things: list[str], log: Path) -> tuple[Path, subprocess.Popen[bytes], int]:
    """A PKI with a device certificate for each of `things`, the broker configuration
    `tidegate server ca broker-config` writes, and Mosquitto started from it exactly as
    written (its stderr in `log`). The PKI lives in a directory the broker's own user can
    reach (pytest's temp root is 0700), as a deployment keeps it in /etc/tidegate/pki; the
    caller removes `pki.parent`. Returns (pki, broker, port)."""
    import sys
    import tempfile

    from fleet_server.pki.service import issue_device

    reachable = Path(tempfile.mkdtemp(prefix="tidegate-pki-"))
    reachable.chmod(0o711)
    pki = reachable / "pki"
    exe = [sys.executable, "-m", "tidegate", "server"]
    subprocess.run([*exe, "ca", "init", "--dir", str(pki)], check=True, capture_output=True, timeout=60)
    for thing in things:
        issue_device(pki, thing)
    port = free_port()
    subprocess.run(
        [*exe, "ca", "broker-config", "--dir", str(pki), "--port", str(port)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    broker = subprocess.Popen(
        [MOSQUITTO, "-c", str(pki / "mosquitto.conf")], stdout=subprocess.DEVNULL, stderr=log.open("wb")
    )
    time.sleep(0.5)
    if broker.poll() is not None:
        raise RuntimeError(f"the generated broker did not start: {log.read_text()}")
    return pki, broker, port
