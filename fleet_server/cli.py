"""`tidegate server`: the control plane. Today: migrations, the jobs service over MQTT, and
device/job commands for operators until the HTTP API lands."""

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from fleet_server.db import Database
from fleet_server.settings import Settings
from shared.errors import TidegateError

app = typer.Typer(
    help="The fleet server: migrate the database, serve the AWS IoT Jobs protocol, queue jobs.",
    no_args_is_help=True,
)

DbOpt = Annotated[str | None, typer.Option("--db", help="Database URL (default $TIDEGATE_DATABASE_URL).")]


def _db(url: str | None, *, create: bool = False) -> Database:
    """The database, upgraded to the newest migration. Only `migrate` (create=True) may start
    from nothing: any other command on a database without a schema is refused, so a misspelt
    URL is an error rather than a new, empty fleet."""
    from fleet_server.migrate import missing_schema, upgrade

    db = Database(url or Settings().database_url)
    shown = db.engine.url.render_as_string(hide_password=True)
    try:
        why = None if create else missing_schema(db)
        if why is None:
            upgrade(db)
    except Exception as exc:  # driver and connection errors come in many types
        raise TidegateError(f"database {shown}: {exc}") from exc
    if why is not None:
        raise TidegateError(
            f"database {shown}: {why}; create it with `tidegate server migrate --db {shown}` "
            "(or check --db / TIDEGATE_DATABASE_URL)"
        )
    return db


@app.command()
def migrate(db: DbOpt = None) -> None:
    """Create the database schema, or upgrade it to the newest migration: the one command that
    may start from an empty database (every other command refuses one)."""
    database = _db(db, create=True)
    typer.echo(f"database at head: {database.engine.url.render_as_string(hide_password=True)}")


@app.command()
def run(
    db: DbOpt = None,
    host: Annotated[str, typer.Option(help="HTTP address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="HTTP port.")] = 8700,
    mqtt_host: Annotated[str | None, typer.Option(help="MQTT broker host.")] = None,
    mqtt_port: Annotated[int | None, typer.Option(help="MQTT broker port.")] = None,
    tick_s: Annotated[float, typer.Option(help="Seconds between campaign scheduler ticks.")] = 1.0,
    api_only: Annotated[
        bool,
        typer.Option(
            "--api-only",
            help="Serve the API and dashboard only (PostgreSQL): devices, campaign ticks and "
            "sweeps are left to the other replicas.",
        ),
    ] = False,
) -> None:
    """Serve the API (/api/v1, /openapi.json, /metrics), the AWS IoT Jobs protocol over MQTT and
    the campaign scheduler until interrupted."""
    from fleet_server.server import FleetServer
    from shared.logs import configure_logging

    configure_logging()  # JSON lines, personal data redacted, the request's id in each
    settings = Settings()
    if mqtt_host:
        settings.mqtt_host = mqtt_host
    if mqtt_port:
        settings.mqtt_port = mqtt_port
    database = _db(db)
    server = FleetServer(database, settings, host=host, port=port, tick_s=tick_s, api_only=api_only)
    scheme = "mqtts" if settings.mqtt_ca_file else "mqtt"  # mutual TLS when a CA is configured
    typer.echo(f"fleet server: http://{host}:{port}  {scheme}://{settings.mqtt_host}:{settings.mqtt_port}")
    try:
        server.run()
    except TimeoutError as exc:
        raise TidegateError(str(exc)) from exc


token_app = typer.Typer(help="Operator API tokens.", no_args_is_help=True)
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    role: Annotated[str, typer.Option(help="viewer, operator or admin.")],
    name: Annotated[str, typer.Option(help="Who or what holds the token.")],
    expires_days: Annotated[
        float | None, typer.Option(min=0.001, help="Refused after this many days (default: never).")
    ] = None,
    db: DbOpt = None,
) -> None:
    """Create an operator API token; it is printed once and stored only as a hash."""
    from datetime import timedelta

    from fleet_server.auth.service import Role, create_token

    try:
        r = Role(role)
    except ValueError as exc:
        raise TidegateError(f"unknown role {role!r}; one of viewer, operator, admin") from exc
    database = _db(db)
    now = datetime.now(UTC)
    expires = now + timedelta(days=expires_days) if expires_days is not None else None
    with database.session() as s:
        token = create_token(s, name=name, role=r, now=now, expires_at=expires)
    typer.echo(token)


@token_app.command("revoke")
def token_revoke(
    name: Annotated[str | None, typer.Option(help="Revoke every live token of this holder.")] = None,
    token_id: Annotated[
        int | None, typer.Option("--id", help="Revoke this token (see GET /api/v1/tokens).")
    ] = None,
    db: DbOpt = None,
) -> None:
    """Revoke tokens: the next request with one is a 401."""
    from fleet_server.auth.service import TokenNotFoundError, audit, revoke_token

    if (name is None) == (token_id is None):
        raise TidegateError("give exactly one of --name or --id")
    database = _db(db)
    now = datetime.now(UTC)
    with database.session() as s:
        try:
            rows = revoke_token(s, token_id=token_id, name=name)
        except TokenNotFoundError as exc:
            raise TidegateError(str(exc)) from exc
        for row in rows:
            audit(s, actor="cli", role="admin", action="token.revoke", target=row.name, outcome="ok", now=now)
    typer.echo(f"revoked {len(rows)} token(s): {', '.join(f'#{r.id} {r.name}' for r in rows)}")


@app.command("device-add")
def device_add(
    thing: Annotated[str, typer.Argument(help="Thing name (the device id).")],
    sku: Annotated[str, typer.Option(help="Hardware SKU.")],
    region: Annotated[str | None, typer.Option(help="Region.")] = None,
    firmware: Annotated[str | None, typer.Option(help="Firmware version (campaigns' firmware_min).")] = None,
    customer: Annotated[str | None, typer.Option(help="Customer.")] = None,
    attr: Annotated[
        list[str], typer.Option(help="An attribute KEY=VALUE (repeatable), e.g. timezone=Europe/Berlin.")
    ] = [],  # noqa: B006
    db: DbOpt = None,
) -> None:
    """Register a device, or update its inventory: options not given keep their value, and what
    the device reported itself (its agent version) is never wiped. Devices must be registered
    before they can take jobs (`POST /api/v1/devices/batch` for many at once)."""
    from fleet_server.devices.service import register_device

    attributes = {}
    for item in attr:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise TidegateError(f"--attr {item!r}: KEY=VALUE")
        attributes[key] = value
    database = _db(db)
    with database.session() as s:  # a FleetError (a bad name) is the CLI's one-line error
        register_device(
            s,
            thing_name=thing,
            sku=sku,
            region=region,
            firmware=firmware,
            customer=customer,
            attributes=attributes or None,
            now=datetime.now(UTC),
        )
    typer.echo(f"registered {thing} ({sku})")


@app.command("job-create")
def job_create(
    thing: Annotated[str, typer.Argument(help="Thing name.")],
    job_id: Annotated[str, typer.Option(help="Job id ([a-zA-Z0-9_-], at most 64).")],
    document: Annotated[str, typer.Option(help="Job document as JSON.")],
    db: DbOpt = None,
) -> None:
    """Queue a job for one device (devices are notified by a running `tidegate server run`)."""
    from fleet_server.jobs import protocol

    try:
        doc = json.loads(document)
    except ValueError as exc:
        raise TidegateError(f"--document is not valid JSON: {exc}") from exc
    database = _db(db)
    with database.session() as s:  # an unknown device or a bad job id: a one-line error
        protocol.create_execution(s, thing, job_id, doc, datetime.now(UTC))
    typer.echo(f"queued {job_id} for {thing}")


ca_app = typer.Typer(
    help="The device PKI: a private CA, device certificates, broker mTLS + ACL.", no_args_is_help=True
)
app.add_typer(ca_app, name="ca")

PkiDir = Annotated[Path, typer.Option("--dir", help="PKI directory (keys are written mode 0600).")]


@ca_app.command("init")
def ca_init(
    directory: PkiDir,
    server_name: Annotated[list[str], typer.Option(help="Broker DNS name or IP (repeatable).")] = [],  # noqa: B006
) -> None:
    """Create the device CA and the broker's server certificate."""
    from fleet_server.pki.service import init_ca

    init_ca(directory, server_names=server_name or None)
    typer.echo(f"device CA created in {directory}")


@app.command("device-cert")
def device_cert(
    thing: Annotated[str, typer.Argument(help="Thing name; becomes the certificate's CN.")],
    directory: PkiDir,
    days: Annotated[int, typer.Option(min=1, max=3650, help="Validity.")] = 825,
) -> None:
    """Issue a device's MQTT client certificate from the device CA."""
    from fleet_server.pki.service import issue_device

    cert, key = issue_device(directory, thing, days=days)
    typer.echo(f"issued {cert} (key {key}, mode 0600)")


@ca_app.command("service-cert")
def ca_service_cert(
    name: Annotated[str, typer.Argument(help="tidegate-<name>: one per fleet-server replica.")],
    directory: PkiDir,
) -> None:
    """Issue a service identity (the fleet server's MQTT client certificate) and grant it the
    service lines of the ACL; device-cert refuses these names."""
    from fleet_server.pki.service import issue_service

    cert, key = issue_service(directory, name)
    typer.echo(f"issued {cert} (key {key}, mode 0600); ACL updated (reload the broker: SIGHUP)")


@ca_app.command("aws-policy")
def ca_aws_policy(
    region: Annotated[str, typer.Option(help="AWS region, e.g. eu-central-1.")] = "REGION",
    account: Annotated[str, typer.Option(help="AWS account id.")] = "ACCOUNT_ID",
) -> None:
    """Print the AWS IoT Core policy for device certificates: the same rules as the Mosquitto
    ACL (connect only as the thing's own client id, topics under its own name, no $share)."""
    from fleet_server.pki.acl import aws_iot_policy_json

    typer.echo(aws_iot_policy_json(region, account), nl=False)


@app.command("device-revoke")
def device_revoke(
    thing: Annotated[str | None, typer.Argument(help="Thing whose certificate is revoked.")] = None,
    directory: PkiDir = Path("."),
    refresh: Annotated[bool, typer.Option(help="Only re-sign the CRL (it expires after 30 days).")] = False,
) -> None:
    """Put a device certificate on the CRL the broker reads (then reload the broker: SIGHUP)."""
    from fleet_server.pki.service import revoke_device, write_crl

    if refresh:
        typer.echo(f"re-signed {write_crl(directory)}")
        return
    if thing is None:
        raise TidegateError("name the thing to revoke (or give --refresh)")
    serial = revoke_device(directory, thing)
    typer.echo(f"revoked {thing} (serial {serial:x}) in {directory / 'crl.pem'}; reload the broker")


@ca_app.command("broker-config")
def ca_broker_config(
    directory: PkiDir,
    port: Annotated[int, typer.Option(help="mTLS listener port.")] = 8883,
    bind: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0 for every one).")] = "127.0.0.1",
    user: Annotated[str, typer.Option(help="The user the broker drops privileges to.")] = "mosquitto",
    device_rate: Annotated[
        float, typer.Option(min=0.1, help="Publishes a second one device may make (the guard plugin).")
    ] = 10.0,
    device_burst: Annotated[int, typer.Option(min=1, help="How many of them in one burst.")] = 100,
    no_guard: Annotated[
        bool,
        typer.Option(
            "--no-guard",
            help="Do not build and load the guard plugin (needs gcc and Mosquitto's headers).",
        ),
    ] = False,
) -> None:
    """Write mosquitto.conf and an ACL that keeps every device to its own topics, and build
    the guard plugin the configuration loads; the configuration starts as written
    (mosquitto -c DIR/mosquitto.conf). The first service identity, tidegate-fleet-server, is
    issued if there is none yet."""
    from fleet_server.pki.guard import WITHOUT, build_guard
    from fleet_server.pki.service import broker_config, issue_service, services

    directory = directory.resolve()
    guard = None if no_guard else build_guard(directory)
    if not services(directory):
        issue_service(directory, "tidegate-fleet-server")
    conf = broker_config(
        directory,
        port=port,
        bind=bind,
        user=user,
        guard=guard,
        device_rate_per_s=device_rate,
        device_burst=device_burst,
    )
    typer.echo(f"wrote {conf} and {directory / 'acl'}; service identities in {directory / 'services'}")
    if guard is None:
        typer.echo(f"warning: no guard plugin: {WITHOUT}", err=True)
