"""Run the Alembic migrations programmatically (no alembic.ini to ship or to get wrong)."""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import Connection, text

from fleet_server.db import Database

SCRIPTS = Path(__file__).parent / "migrations"


def alembic_config(url: str) -> Config:
    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPTS))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


MIGRATION_LOCK = 0x7467_6D67  # the PostgreSQL advisory lock migrations run under ("tgmg")


def _one_at_a_time(connection: Connection) -> None:
    """Replicas starting at once (each pod's `migrate` init container, every `server run`)
    would each find the schema behind and each run the same migration, and all but one
    fail on PostgreSQL's catalogue: the migration runs under a transaction-scoped advisory
    lock, so the others wait and then find it done. SQLite has one writer anyway."""
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK})


def upgrade(db: Database, revision: str = "head") -> None:
    with db.engine.begin() as connection:
        _one_at_a_time(connection)
        cfg = alembic_config(db.url)
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


def downgrade(db: Database, revision: str) -> None:
    with db.engine.begin() as connection:
        _one_at_a_time(connection)
        cfg = alembic_config(db.url)
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, revision)


def missing_schema(db: Database) -> str | None:
    """Why `db` holds no Tidegate schema yet (None when it does). Checked before anything
    connects, because connecting to a SQLite path creates an empty file: a misspelt
    TIDEGATE_DATABASE_URL must not quietly become a fresh, empty fleet."""
    from sqlalchemy import inspect
    from sqlalchemy.engine import make_url

    url = make_url(db.url)
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            return "it is an in-memory database"
        if not Path(url.database).exists():
            return f"there is no file {url.database}"
    with db.engine.connect() as conn:
        if not inspect(conn).has_table("alembic_version"):
            return "it holds no Tidegate schema"
    return None
