"""Alembic environment: the URL comes from the caller (`fleet_server.migrate`), never a file."""

from alembic import context
from sqlalchemy import Connection, engine_from_config, pool

from fleet_server.auth import models as _auth  # noqa: F401
from fleet_server.campaigns import models as _campaigns  # noqa: F401  (register tables)
from fleet_server.db import Base
from fleet_server.devices import models as _devices  # noqa: F401
from fleet_server.jobs import models as _jobs  # noqa: F401
from fleet_server.releases import models as _releases  # noqa: F401
from fleet_server.telemetry import models as _telemetry  # noqa: F401
from fleet_server.webhooks import models as _webhooks  # noqa: F401

config = context.config
target_metadata = Base.metadata


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is None:
        connectable = engine_from_config(
            config.get_section(config.config_ini_section) or {}, prefix="sqlalchemy.", poolclass=pool.NullPool
        )
        with connectable.connect() as connection:
            _run(connection)
    else:
        _run(connectable)


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


run_migrations_online()
