"""`tidegate server`: the control plane. Today: migrations, the jobs service over MQTT, and
device/job commands for operators until the HTTP API lands."""

import json
import signal
import threading
from datetime import UTC, datetime, timedelta
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


def _db(url: str | None) -> Database:
    from fleet_server.migrate import upgrade

    db = Database(url or Settings().database_url)
    try:
        upgrade(db)
    except Exception as exc:  # driver and connection errors come in many types
        raise TidegateError(f"database {db.engine.url.render_as_string(hide_password=True)}: {exc}") from None
    return db


@app.command()
def migrate(db: DbOpt = None) -> None:
    """Upgrade the database schema to the newest migration."""
    database = _db(db)
    typer.echo(f"database at head: {database.engine.url.render_as_string(hide_password=True)}")


@app.command()
def run(
    db: DbOpt = None,
    mqtt_host: Annotated[str | None, typer.Option(help="MQTT broker host.")] = None,
    mqtt_port: Annotated[int | None, typer.Option(help="MQTT broker port.")] = None,
) -> None:
    """Serve the AWS IoT Jobs protocol to devices over the broker until interrupted."""
    from fleet_server.jobs.bridge import JobsBridge

    settings = Settings()
    database = _db(db)
    try:
        bridge = JobsBridge(
            database,
            host=mqtt_host or settings.mqtt_host,
            port=mqtt_port or settings.mqtt_port,
            client_id=settings.mqtt_client_id,
            renotify_after=timedelta(seconds=settings.renotify_queued_s),
            sweep_interval_s=settings.sweep_interval_s,
        ).start()
    except TimeoutError as exc:
        raise TidegateError(str(exc)) from None
    typer.echo(f"jobs service on mqtt://{bridge.host}:{bridge.port} (Ctrl-C to stop)")
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: done.set())
    try:
        done.wait()
    except KeyboardInterrupt:
        pass
    finally:
        bridge.stop()


@app.command("device-add")
def device_add(
    thing: Annotated[str, typer.Argument(help="Thing name (the device id).")],
    sku: Annotated[str, typer.Option(help="Hardware SKU.")],
    region: Annotated[str | None, typer.Option(help="Region.")] = None,
    db: DbOpt = None,
) -> None:
    """Register a device (or update its inventory)."""
    from fleet_server.devices.service import register_device

    database = _db(db)
    try:
        with database.session() as s:
            register_device(s, thing_name=thing, sku=sku, region=region, now=datetime.now(UTC))
    except ValueError as exc:
        raise TidegateError(str(exc)) from None
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
        raise TidegateError(f"--document is not valid JSON: {exc}") from None
    database = _db(db)
    try:
        with database.session() as s:
            protocol.create_execution(s, thing, job_id, doc, datetime.now(UTC))
    except (ValueError, LookupError) as exc:
        raise TidegateError(str(exc)) from None
    except Exception as exc:
        raise TidegateError(f"could not queue {job_id} for {thing}: {str(exc).splitlines()[0]}") from None
    typer.echo(f"queued {job_id} for {thing}")
