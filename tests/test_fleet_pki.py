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
from tests.mqtt_helpers import MOSQUITTO, free_port, generated_broker
from tests.test_agent_runtime import DaemonThread, job_doc, make_config

pytestmark = pytest.mark.skipif(not Path(MOSQUITTO).exists(), reason="mosquitto binary not installed")


def tidegate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tidegate", "server", *args], capture_output=True, text=True, timeout=60
    )


def tls_client(pki: Path, name: str, kind: str, port: int, client_id: str | None = None) -> mqtt.Client:
    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2,
        client_id=client_id or name,  # the broker's guard: the client id is the certificate's name
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


def service_bridge(db: Database, pki: Path, port: int) -> JobsBridge:
    """The jobs bridge on the fleet server's service identity, over the broker's mutual TLS."""
    service = pki / "services"
    return JobsBridge(
        db,
        port=port,
        sweep_interval_s=1.0,
        tls=(pki / "ca.pem", service / "tidegate-fleet-server.pem", service / "tidegate-fleet-server.key"),
    ).start()


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
    bridge = service_bridge(db, pki, port)
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
        # is refused at CONNECT; the victims keep their connections
        victim = tls_client(pki, "car-2", "devices", port)
        drops: list[str] = []
        victim.on_disconnect = lambda *a: drops.append("car-2")
        for stolen in ("car-2", "tidegate-fleet-server"):
            assert try_connect(pki, pki / "devices", "car-1", port, client_id=stolen) == "Not authorized"
            time.sleep(0.3)
            assert victim.is_connected() and bridge.connected.is_set(), stolen
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


def try_connect(pki: Path, folder: Path, name: str, port: int, client_id: str | None = None) -> str:
    """Connect with `folder/name.pem` (as client id `client_id`, else `name`): "connected",
    the CONNACK's reason, or "tls refused"."""
    c = mqtt.Client(
        callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id or name, protocol=mqtt.MQTTv5
    )
    c.tls_set(
        ca_certs=str(pki / "ca.pem"),
        certfile=str(folder / f"{name}.pem"),
        keyfile=str(folder / f"{name}.key"),
        cert_reqs=ssl.CERT_REQUIRED,
    )
    got: list[str] = []
    c.on_connect = lambda cl, u, f, rc, p: got.append("connected" if not rc.is_failure else str(rc))
    try:
        c.connect("127.0.0.1", port)
        c.loop_start()
        deadline = time.monotonic() + 3
        while not got and time.monotonic() < deadline:
            time.sleep(0.05)
    except (ssl.SSLError, OSError):
        return "tls refused"
    finally:
        c.loop_stop()
        c.disconnect()
    return got[0] if got else "tls refused"


def test_identities_a_broker_must_not_honour(tmp_path: Path) -> None:
    """Revoked, expired and CN-less certificates are refused at connect (the broker logs why),
    and so, by the guard plugin, are CNs the CA would never issue (`+`, `car-2/beacon`) and a
    client id that is not the certificate's name; a device's `$share` subscriptions are
    refused in the SUBACK and take
    nothing from the service; a device publishing faster than its rate is refused beyond its
    burst while the service is not limited; a second service identity is issued by its own
    command and served after a reload."""
    import signal
    import tempfile
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    from shared.pki import KeyPair, issue

    reachable = Path(tempfile.mkdtemp(prefix="tidegate-pki-"))
    reachable.chmod(0o711)
    pki = reachable / "pki"
    assert tidegate("ca", "init", "--dir", str(pki)).returncode == 0
    for thing in ("car-1", "car-2", "car-3"):
        assert tidegate("device-cert", thing, "--dir", str(pki)).returncode == 0
    assert tidegate("device-revoke", "car-3", "--dir", str(pki)).returncode == 0
    ca = KeyPair((pki / "ca.key").read_bytes(), (pki / "ca.pem").read_bytes())
    forged = pki / "forged"  # signed by the CA's key, as a CA bug or an insider could
    forged.mkdir()
    for label, pair in (
        ("wild", issue(ca, "+")),
        ("slash", issue(ca, "car-2/beacon")),
        ("expired", issue(ca, "car-4", now=datetime.now(UTC) - timedelta(days=10), days=1)),
    ):
        (forged / f"{label}.pem").write_bytes(pair.cert_pem)
        (forged / f"{label}.key").write_bytes(pair.key_pem)
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    ca_key = serialization.load_pem_private_key(ca.key_pem, None)
    assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
    no_cn = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "no common name")]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    (forged / "nocn.pem").write_bytes(no_cn.public_bytes(serialization.Encoding.PEM))
    (forged / "nocn.key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    port = free_port()
    assert tidegate("ca", "broker-config", "--dir", str(pki), "--port", str(port)).returncode == 0
    log_path = tmp_path / "broker.log"
    broker = subprocess.Popen(
        [MOSQUITTO, "-c", str(pki / "mosquitto.conf")], stdout=subprocess.DEVNULL, stderr=log_path.open("wb")
    )
    time.sleep(0.5)
    try:
        assert try_connect(pki, pki / "devices", "car-1", port) == "connected"  # the control
        assert try_connect(pki, pki / "devices", "car-3", port) == "tls refused"  # revoked
        assert try_connect(pki, forged, "expired", port) == "tls refused"
        assert try_connect(pki, forged, "nocn", port) != "connected"
        # Names the CA never issues, refused at CONNECT whatever client id they ask for.
        for label, cn in (("wild", "+"), ("slash", "car-2/beacon")):
            for client_id in (cn, "car-2"):
                assert try_connect(pki, forged, label, port, client_id=client_id) == "Not authorized"
        log = log_path.read_text()
        assert "certificate verify failed" in log and "not authorised" in log  # the broker says why
        assert 'certificate name "car-2/beacon"): the certificate name breaks the thing-naming rule' in log
        assert "the certificate has no single common name" in log

        service = tls_client(pki, "tidegate-fleet-server", "services", port, "tidegate-fleet-server")
        heard: list[str] = []
        service.on_message = lambda c, u, m: heard.append(m.topic)
        service.subscribe("tidegate/things/+/+", qos=1)  # as the bridge does: no shared group
        thieves = {"car-1": tls_client(pki, "car-1", "devices", port)}
        stolen: dict[str, list[str]] = {name: [] for name in thieves}
        granted: dict[str, list[bool]] = {}
        for name, c in thieves.items():
            c.on_message = lambda cl, u, m, n=name: stolen[n].append(m.topic)
            c.on_subscribe = lambda cl, u, mid, codes, p, n=name: granted.__setitem__(
                n, [not code.is_failure for code in codes]
            )
            c.subscribe(
                [
                    ("$share/tidegate/tidegate/things/+/+", 1),
                    ("$share/x/$aws/things/+/jobs/#", 1),
                    ("$aws/things/+/jobs/#", 1),
                    ("tidegate/things/#", 1),
                ]
            )
        time.sleep(0.5)
        car2 = tls_client(pki, "car-2", "devices", port)
        for _ in range(20):
            car2.publish("tidegate/things/car-2/beacon", b"{}", qos=1).wait_for_publish(5)
        service.publish("$aws/things/car-2/jobs/notify-next", b"{}", qos=1)
        time.sleep(1.0)
        assert heard.count("tidegate/things/car-2/beacon") == 20  # every one, none to a share
        assert stolen == {name: [] for name in thieves}, stolen
        # The SUBACK says so: no shared subscription (the acl_file would grant all four and
        # filter on delivery; the other two deliver nothing of another device's).
        assert granted == {"car-1": [False, False, True, True]}, granted
        log = log_path.read_text()
        assert "tidegate_guard: refused subscribe $share/tidegate/tidegate/things/+/+ for client car-1" in log

        # A device that floods: its burst (100) goes through, the rest is refused at the broker
        # (PUBACK "not authorized") and never reaches the service; the service is not limited.
        flood = tls_client(pki, "car-1", "devices", port)
        acks: list[bool] = []
        flood.on_publish = lambda cl, u, mid, code, p: acks.append(not code.is_failure)
        before = heard.count("tidegate/things/car-1/beacon")
        started = time.monotonic()
        for _ in range(300):
            flood.publish("tidegate/things/car-1/beacon", b"{}", qos=1)
        deadline = time.monotonic() + 10
        while len(acks) < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        allowance = 100 + 10 * (time.monotonic() - started) + 1
        assert len(acks) == 300 and 100 <= sum(acks) <= allowance, (sum(acks), allowance)
        time.sleep(0.5)
        assert heard.count("tidegate/things/car-1/beacon") - before == sum(acks)
        service_acks: list[bool] = []
        service.on_publish = lambda cl, u, mid, code, p: service_acks.append(not code.is_failure)
        for i in range(300):
            service.publish(f"$aws/things/car-{i % 3}/jobs/notify", b"{}", qos=1)
        deadline = time.monotonic() + 10
        while len(service_acks) < 300 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert service_acks == [True] * 300
        assert "publishing faster than the device rate limit" in log_path.read_text()
        flood.loop_stop()
        flood.disconnect()
        for c in (service, car2, *thieves.values()):
            c.loop_stop()
            c.disconnect()

        # A device offline with a persistent session keeps what was queued for it, even when
        # another certificate asks for its client id (refused at CONNECT).
        def session(name: str, clean: bool) -> mqtt.Client:
            from paho.mqtt.packettypes import PacketTypes
            from paho.mqtt.properties import Properties

            c = mqtt.Client(
                callback_api_version=CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv5
            )
            c.tls_set(
                ca_certs=str(pki / "ca.pem"),
                certfile=str(pki / "devices" / f"{name}.pem"),
                keyfile=str(pki / "devices" / f"{name}.key"),
                cert_reqs=ssl.CERT_REQUIRED,
            )
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = 3600
            c.connect("127.0.0.1", port, clean_start=clean, properties=props)
            return c

        victim = session("car-2", clean=True)
        victim.loop_start()
        time.sleep(0.3)
        victim.subscribe("$aws/things/car-2/jobs/notify-next", qos=1)
        time.sleep(0.3)
        victim.loop_stop()
        victim.disconnect()  # offline; its session and subscription stay on the broker
        service = tls_client(pki, "tidegate-fleet-server", "services", port, "tidegate-fleet-server")
        service.publish("$aws/things/car-2/jobs/notify-next", b'{"queued": true}', qos=1).wait_for_publish(5)
        assert try_connect(pki, pki / "devices", "car-1", port, client_id="car-2") == "Not authorized"
        queued: list[bytes] = []
        back = session("car-2", clean=False)
        back.on_message = lambda c, u, m: queued.append(bytes(m.payload))
        back.loop_start()
        wait_until = time.monotonic() + 5
        while not queued and time.monotonic() < wait_until:
            time.sleep(0.05)
        assert queued == [b'{"queued": true}']
        for c in (back, service):
            c.loop_stop()
            c.disconnect()

        # A second replica's identity: its own command, its own ACL lines once the broker reloads.
        assert "reserved" in tidegate("device-cert", "tidegate-fleet-server-2", "--dir", str(pki)).stderr
        assert tidegate("ca", "service-cert", "tidegate-fleet-server-2", "--dir", str(pki)).returncode == 0
        assert "user tidegate-fleet-server-2" in (pki / "acl").read_text()
        broker.send_signal(signal.SIGHUP)
        time.sleep(0.5)
        second = tls_client(pki, "tidegate-fleet-server-2", "services", port, "tidegate-fleet-server-2")
        got: list[str] = []
        second.on_message = lambda c, u, m: got.append(m.topic)
        second.subscribe("tidegate/things/+/+", qos=1)
        time.sleep(0.3)
        car2 = tls_client(pki, "car-2", "devices", port)
        car2.publish("tidegate/things/car-2/beacon", b"{}", qos=1).wait_for_publish(5)
        time.sleep(0.5)
        assert got == ["tidegate/things/car-2/beacon"]
        for c in (second, car2):
            c.loop_stop()
            c.disconnect()
    finally:
        broker.terminate()
        broker.wait(10)
        import shutil

        shutil.rmtree(reachable, ignore_errors=True)


def test_the_guard_plugin_is_built_or_refused_with_what_is_missing(tmp_path: Path) -> None:
    """The guard is compiled on the broker's host; without a compiler or Mosquitto's headers
    `broker-config` stops and says which package is missing (or `--no-guard`, which says what
    is lost), rather than writing a configuration that loads nothing."""
    from fleet_server.pki.guard import GuardBuildError, build_guard

    built = build_guard(tmp_path)
    assert built.name == "tidegate_guard.so" and built.stat().st_size > 0
    with pytest.raises(GuardBuildError, match="building the broker's guard plugin failed"):
        build_guard(tmp_path, cc=str(tmp_path / "no-such-cc"))
    no_headers = tmp_path / "cc-without-headers"
    no_headers.write_text(
        "#!/bin/sh\necho 'fatal error: mosquitto_broker.h: No such file or directory' >&2\nexit 1\n"
    )
    no_headers.chmod(0o755)
    with pytest.raises(GuardBuildError, match="install mosquitto-dev libmosquitto-dev libssl-dev"):
        build_guard(tmp_path, cc=str(no_headers))
    assert built.stat().st_size > 0  # a failed rebuild leaves the working plugin in place

    import tempfile

    pki = Path(tempfile.mkdtemp(prefix="tidegate-pki-")) / "pki"
    pki.parent.chmod(0o711)
    assert tidegate("ca", "init", "--dir", str(pki)).returncode == 0
    env_cc = subprocess.run(
        [sys.executable, "-m", "tidegate", "server", "ca", "broker-config", "--dir", str(pki)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "CC": str(no_headers)},
    )
    assert env_cc.returncode != 0 and "mosquitto-dev" in env_cc.stderr
    assert not (pki / "mosquitto.conf").exists()
    unguarded = tidegate("ca", "broker-config", "--dir", str(pki), "--no-guard")
    assert unguarded.returncode == 0 and "no guard plugin" in unguarded.stderr
    assert "\nplugin " not in (pki / "mosquitto.conf").read_text()
    guarded = tidegate("ca", "broker-config", "--dir", str(pki), "--device-rate", "2", "--device-burst", "7")
    assert guarded.returncode == 0, guarded.stderr
    conf = (pki / "mosquitto.conf").read_text()
    assert (
        f"plugin {pki.resolve() / 'tidegate_guard.so'}\nplugin_opt_rate_per_s 2\nplugin_opt_burst 7\n" in conf
    )


def test_a_flooding_device_on_the_generated_broker_leaves_the_others_their_campaign(tmp_path: Path) -> None:
    """The flood of issue 21 against the broker configuration as generated (mutual TLS, the
    guard, the ACL): 100 devices, each on its own certificate and connection, complete a
    campaign while one more device sends 500 `jobs/get` a second for all of it. The broker
    passes the flooder a bucket's worth (burst 100, then 10 a second) and refuses the rest; of
    what it passed, the bridge answers its own bucket's worth and RequestThrottled beyond; none
    of the others loses a message (not one retry) or is refused anything. Their completion
    time with and without the flood is measured in bench/jobs_flood.py."""
    import shutil

    from fleet_server.campaigns import service as campaigns
    from fleet_server.campaigns.spec import CampaignSpec
    from fleet_server.scheduler import CampaignScheduler
    from fleet_server.sim.fleet import SimSettings, SimTls, SimulatedFleet

    things = [f"sim-{i:03d}" for i in range(100)]
    log_path = tmp_path / "broker.log"
    pki, broker, port = generated_broker([*things, "flood-1"], log_path)
    reachable = pki.parent
    db = Database(f"sqlite:///{tmp_path / 'fleet.db'}")
    upgrade(db)
    now = lambda: datetime.now(UTC)  # noqa: E731
    with db.session() as s:
        for thing in things:
            register_device(s, thing_name=thing, sku="edge-cpu", now=now())
        register_device(s, thing_name="flood-1", sku="other-sku", now=now())
    bridge = service_bridge(db, pki, port)
    scheduler = CampaignScheduler(db, bridge.publish, now, interval_s=0.2)
    flooder = subprocess.Popen(
        [
            *(sys.executable, "-m", "fleet_server.sim.flood", str(port), "500", "flood-1", "get"),
            *(str(pki / "ca.pem"), str(pki / "devices")),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    fleet: SimulatedFleet | None = None
    try:
        assert flooder.stdout is not None and flooder.stdout.readline().strip() == "ready"
        t0 = time.monotonic()  # the flood's start: both buckets are counted from here
        fleet = SimulatedFleet(
            things,
            SimSettings(
                port=port, install_s=(0.05, 0.3), retry_s=10.0, tls=SimTls(pki / "ca.pem", pki / "devices")
            ),
        ).start()
        time.sleep(1.5)  # the flood is on before the campaign starts, however fast it is
        spec = {
            "name": "v2",
            "target": "classifier",
            "repository": "http://repo",
            "cohort": {"sku": "edge-cpu"},
            "waves": [{"percent": 100}],
            "max_concurrent": 100,
        }
        with db.session() as s:
            c = campaigns.create(s, spec=CampaignSpec.model_validate(spec), actor="op", now=now())
            campaigns.submit(s, campaign_id=c.id, actor="op", now=now())
            campaigns.approve(s, campaign_id=c.id, actor="admin", now=now(), override_reason="no bench")
            cid = c.id
        scheduler.start()
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with db.session() as s:
                if campaigns.get(s, cid).state not in ("scheduled", "running"):
                    break
            time.sleep(0.2)
        flooder.terminate()
        out, _ = flooder.communicate(timeout=30)
        elapsed = time.monotonic() - t0
        with db.session() as s:
            assert campaigns.get(s, cid).state == "completed"
            rows = s.scalars(select(JobExecution).where(JobExecution.job_id == cid)).all()
        assert len(rows) == 100 and {r.status for r in rows} == {"SUCCEEDED"}
        assert fleet.refused == {} and fleet.stats.rejected == {}  # nothing of theirs refused…
        assert fleet.stats.retries == 0  # …or lost on the way
        flood = json.loads(out.strip().splitlines()[-1])
        cut_by_bridge = bridge.limiter.throttled + bridge.limiter.dropped
        # the flood repeats one request: copies of one still queued are dropped on receipt
        reached_bridge = flood["answered"] + cut_by_bridge + bridge.duplicates
        assert flood["sent"] > 500 * 1.5  # it flooded from before the campaign to its end
        # The broker passed a bucket's worth and refused the rest before the bridge saw it…
        assert 100 <= reached_bridge <= 100 + 10 * elapsed + 1, (reached_bridge, elapsed)
        assert flood["sent"] - reached_bridge > flood["sent"] / 2
        # …and the bridge answered its own bucket's worth, RequestThrottled beyond it.
        assert 0 < flood["answered"] <= bridge.limiter.burst + bridge.limiter.rate * elapsed
        assert flood["codes"] and set(flood["codes"]) == {"RequestThrottled"}
        log = log_path.read_text()
        assert "for client flood-1" in log and "publishing faster than the device rate limit" in log
        assert "for client sim-" not in log  # none of the others was refused anything
    finally:
        if flooder.poll() is None:
            flooder.kill()
        if fleet is not None:
            fleet.stop()
        scheduler.stop()
        bridge.stop()
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(reachable, ignore_errors=True)
