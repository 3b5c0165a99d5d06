"""The fleet's private CA on disk, device certificates, and a Mosquitto configuration that
binds every device to its own topics.

Layout of the PKI directory (keys 0600, never served)::

    DIR/ca.pem  DIR/ca.key            the device CA
    DIR/server.pem  DIR/server.key    the broker's TLS certificate, issued by the same CA
    DIR/devices/<thing>.pem|.key      device certificates (CN = thing name)

The broker takes the certificate's CN as the MQTT username
(``use_identity_as_username``) and the ACL's ``%u`` patterns let a device use
only ``$aws/things/<its own name>/jobs/...`` and its own telemetry topics, so a
device certificate cannot touch another device's executions. The guard plugin
(`fleet_server.pki.guard`, ``DIR/tidegate_guard.so``) checks every CONNECT (client id =
certificate name, in the thing-naming rule) and is consulted before the ACL: no
``$share/…`` subscriptions, a publish rate per device.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from cryptography import x509

from fleet_server.errors import FleetError
from fleet_server.pki.acl import mosquitto_acl
from shared.fsutil import atomic_write_bytes
from shared.iotjobs import valid_thing_name
from shared.pki import KeyPair, issue, make_ca, make_crl


class PkiError(FleetError):
    pass


def _write(dir_: Path, name: str, pair: KeyPair) -> None:
    atomic_write_bytes(dir_ / f"{name}.pem", pair.cert_pem)
    atomic_write_bytes(dir_ / f"{name}.key", pair.key_pem, mode=0o600)


def _load(dir_: Path, name: str) -> KeyPair:
    try:
        return KeyPair((dir_ / f"{name}.key").read_bytes(), (dir_ / f"{name}.pem").read_bytes())
    except FileNotFoundError as exc:
        raise PkiError(f"{dir_}: no {name}.pem/{name}.key; run 'tidegate server ca init' first") from exc


def init_ca(
    directory: Path, *, name: str = "Tidegate device CA", server_names: list[str] | None = None
) -> None:
    if (directory / "ca.key").exists():
        raise PkiError(f"{directory}: a CA already exists")
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    ca = make_ca(name)
    _write(directory, "ca", ca)
    _write(
        directory,
        "server",
        issue(ca, "tidegate-broker", server_names=server_names or ["127.0.0.1", "localhost"], client=False),
    )
    write_crl(directory)


REVOKED = "revoked.json"  # [{"serial": int, "name": str, "at": iso}] : what the CRL lists


def write_crl(directory: Path, *, days: int = 30) -> Path:
    """(Re)write `crl.pem` from `revoked.json`, signed by the CA. A CRL expires (`days`): the
    broker refuses every certificate once its CRL is stale, so re-run this (`device-revoke
    --refresh`) from cron well within that, as for the repository's timestamp."""
    import json
    from datetime import datetime

    ca = _load(directory, "ca")
    path = directory / REVOKED
    entries = json.loads(path.read_text()) if path.exists() else []
    crl = make_crl(ca, [(e["serial"], datetime.fromisoformat(e["at"])) for e in entries], days=days)
    atomic_write_bytes(directory / "crl.pem", crl, mode=0o644)
    return directory / "crl.pem"


def revoke_device(directory: Path, thing: str) -> int:
    """Revoke `thing`'s certificate: its serial goes on the CRL (reload the broker: SIGHUP or
    restart). Returns the serial. Issuing the name again later gives a new certificate."""
    import json
    from datetime import UTC, datetime

    try:
        cert = x509.load_pem_x509_certificate((directory / "devices" / f"{thing}.pem").read_bytes())
    except FileNotFoundError as exc:
        raise PkiError(f"no certificate issued for {thing!r} in {directory / 'devices'}") from exc
    path = directory / REVOKED
    entries = json.loads(path.read_text()) if path.exists() else []
    if all(e["serial"] != cert.serial_number for e in entries):
        entries.append({"serial": cert.serial_number, "name": thing, "at": datetime.now(UTC).isoformat()})
        atomic_write_bytes(path, (json.dumps(entries, indent=1) + "\n").encode(), mode=0o644)
    write_crl(directory)
    return cert.serial_number


# Certificates with these names serve the whole fleet (the ACL's `user` lines): a device
# certificate may never carry one.
RESERVED_PREFIX = "tidegate-"


def issue_device(directory: Path, thing: str, *, days: int = 825) -> tuple[Path, Path]:
    if not valid_thing_name(thing):
        raise PkiError(f"invalid thing name {thing!r}")
    if thing.lower().startswith(RESERVED_PREFIX):
        raise PkiError(
            f"{thing!r} is reserved for services ({RESERVED_PREFIX}…); a device certificate cannot carry it"
        )
    ca = _load(directory, "ca")
    out = directory / "devices"
    out.mkdir(mode=0o700, exist_ok=True)
    _write(out, thing, issue(ca, thing, days=days))
    return out / f"{thing}.pem", out / f"{thing}.key"


def issue_service(directory: Path, name: str) -> tuple[Path, Path]:
    """A client certificate for a service identity: one per fleet-server replica (each holds
    its own MQTT session, so two replicas never share a client id). Only this command issues
    the reserved names, and the ACL is rewritten to grant the new identity its lines."""
    if not valid_thing_name(name) or not name.lower().startswith(RESERVED_PREFIX):
        raise PkiError(f"service name {name!r}: {RESERVED_PREFIX}<name> of [a-zA-Z0-9:_-]")
    ca = _load(directory, "ca")
    out = directory / "services"
    out.mkdir(mode=0o700, exist_ok=True)
    if (out / f"{name}.pem").exists():
        raise PkiError(f"service identity {name!r} already exists in {out}")
    _write(out, name, issue(ca, name))
    if (directory / "acl").exists():
        write_acl(directory)
    return out / f"{name}.pem", out / f"{name}.key"


def services(directory: Path) -> list[str]:
    """The service identities issued in `directory` (each gets the service lines of the ACL)."""
    return sorted(p.stem for p in (directory / "services").glob("*.pem"))


def write_acl(directory: Path) -> Path:
    """(Re)write the broker's ACL from `fleet_server.pki.acl` for the devices and every
    service identity issued; Mosquitto re-reads it on SIGHUP."""
    acl = directory / "acl"
    atomic_write_bytes(acl, mosquitto_acl(services(directory)).encode(), mode=0o644)
    return acl


def broker_config(
    directory: Path,
    *,
    port: int = 8883,
    bind: str = "127.0.0.1",
    user: str = "mosquitto",
    max_packet_bytes: int = 256 * 1024,
    max_queued: int = 1000,
    max_inflight: int = 20,
    guard: Path | None = None,
    device_rate_per_s: float = 10.0,
    device_burst: int = 100,
    extra: str = "",
) -> Path:
    """Write ``mosquitto.conf`` and ``acl`` for a mutual-TLS listener; returns the conf path.

    The file starts as written: absolute paths; the broker's own `user` (run as root, the
    server key and the persistence directory are handed to it, the PKI directory made
    traversable but not listable); loopback unless told `bind`; the client id is the
    certificate's CN, so no connection can take over another device's, or the service's,
    session; bounds on packet size and queued and in-flight messages per client; persistent
    sessions. `guard` is the built guard plugin (`fleet_server.pki.guard`): at CONNECT it
    refuses a certificate name outside the thing-naming rule and a client id that is not the
    name; before the acl_file, no `$share/…` subscriptions and devices limited to
    `device_rate_per_s` publishes a second in bursts of `device_burst`. Without it the
    broker makes the CN the client id (`use_username_as_clientid`)."""
    directory = directory.resolve()
    for name in ("ca", "server"):
        _load(directory, name)
    crl = directory / "crl.pem" if (directory / "crl.pem").exists() else write_crl(directory)
    acl = directory / "acl"
    write_acl(directory)
    data = directory / "broker-data"
    data.mkdir(mode=0o700, exist_ok=True)
    _hand_to(user, directory, [directory / "server.key", data])
    conf = directory / "mosquitto.conf"
    atomic_write_bytes(
        conf,
        (
            "# Generated by tidegate server ca broker-config: start it as written (mosquitto -c THIS).\n"
            f"user {user}\nper_listener_settings false\nallow_anonymous false\n"
            + (
                f"plugin {guard}\nplugin_opt_rate_per_s {device_rate_per_s:g}\n"
                f"plugin_opt_burst {device_burst}\nplugin_opt_service_prefix {RESERVED_PREFIX}\n"
                if guard is not None
                else "# no guard plugin (--no-guard): $share subscriptions and publish rates unchecked\n"
            )
            + f"acl_file {acl}\n"
            f"persistence true\npersistence_location {data}/\n"
            f"max_packet_size {max_packet_bytes}\nmax_queued_messages {max_queued}\n"
            f"max_inflight_messages {max_inflight}\n"
            f"listener {port} {bind}\ncafile {directory / 'ca.pem'}\ncertfile {directory / 'server.pem'}\n"
            f"keyfile {directory / 'server.key'}\ncrlfile {crl}\n"
            "require_certificate true\n"
            # With the guard, the identity is set by its CONNECT check (the client id must be
            # the certificate's name); without it, Mosquitto takes the name and makes it the
            # client id (a connection asking for another id is given its own).
            + ("" if guard is not None else "use_identity_as_username true\nuse_username_as_clientid true\n")
            + extra
        ).encode(),
    )
    return conf


def _hand_to(user: str, directory: Path, owned: list[Path]) -> None:
    """Let the broker's user read what it needs and nothing else (only when run as root, and
    only when that user exists: otherwise the broker runs as whoever starts it)."""
    if os.geteuid() != 0:
        return
    import pwd

    try:
        who = pwd.getpwnam(user)
    except KeyError as exc:
        raise PkiError(f"no user {user!r} for the broker on this machine; give --user") from exc
    for parent in directory.parents:  # every directory above must let the broker's user pass
        st = parent.stat()
        bit = 0o100 if st.st_uid == who.pw_uid else 0o010 if st.st_gid == who.pw_gid else 0o001
        if not st.st_mode & bit:
            raise PkiError(
                f"the broker's user {user} cannot reach {directory}: {parent} is mode "
                f"{stat.S_IMODE(st.st_mode):o}; keep the PKI where it can (e.g. /etc/tidegate/pki)"
            )
    os.chmod(directory, 0o711)  # traversable to reach the files below, never listable
    for path in owned:
        os.chown(path, who.pw_uid, who.pw_gid)
