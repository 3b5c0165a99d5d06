from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from builder.samples import make_sample_payload

pytest_plugins = ["tests.skipguard"]


@pytest.fixture(scope="session")
def sample_payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real payload: ONNX classifier, inference config and golden self-test data."""
    return make_sample_payload(tmp_path_factory.mktemp("payload"))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cloud gateway's test models and serving.toml."""
    from tests.helpers import write_serving_models

    return write_serving_models(tmp_path_factory.mktemp("serving"))


# The longest tests go first, so two xdist workers do not end on one of them alone.
FIRST = (
    "tests/test_demo.py",
    "tests/test_chaos.py",
    "tests/test_agent_faults.py",
    "tests/test_hil.py",
    "tests/test_replicas.py",
    "tests/test_gateway_replicas.py",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        path = item.nodeid.split("::")[0]
        return FIRST.index(path) if path in FIRST else len(FIRST)

    items.sort(key=rank)  # stable: the rest keep their order


def pytest_sessionfinish(session: pytest.Session) -> None:
    """An xdist worker hands its fault-injection figures to the controller."""
    import json

    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:
        from tests.test_agent_faults import KILL_STATS

        workeroutput["kill_stats"] = json.dumps(KILL_STATS)


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: object, error: object) -> None:
    import json

    from tests.test_agent_faults import KILL_STATS

    got = json.loads(getattr(node, "workeroutput", {}).get("kill_stats", "{}"))
    for k, v in got.items():
        KILL_STATS[k] = KILL_STATS.get(k, 0) + v


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from tests.test_agent_faults import KILL_STATS

    if KILL_STATS["kill_points"]:
        terminalreporter.write_line(
            "agent fault injection: {kill_points} SIGKILL points, {killed} reached, devices ended on "
            "old {old} / new {new}, left without a committed verified slot: {bricked}".format(**KILL_STATS)
        )


def _database_urls() -> list[str]:
    import os

    urls = ["sqlite"]
    if os.environ.get("TIDEGATE_TEST_PG_URL"):
        urls.append("postgresql")
    return urls


def _worker_pg_url() -> str:
    """TIDEGATE_TEST_PG_URL, or with pytest-xdist one database per worker on that server
    (created on first use), so parallel workers never drop each other's tables."""
    import os

    from sqlalchemy import create_engine, make_url, text

    url = os.environ["TIDEGATE_TEST_PG_URL"]
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return url
    base = make_url(url)
    name = f"{base.database}_{worker}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            if (
                conn.execute(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}).first()
                is None
            ):
                conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return base.set(database=name).render_as_string(hide_password=False)


@pytest.fixture(params=_database_urls())
def db(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A migrated, empty fleet database: SQLite always, PostgreSQL when TIDEGATE_TEST_PG_URL is set."""

    from fleet_server.db import Database
    from fleet_server.migrate import upgrade

    url = f"sqlite:///{tmp_path / 'fleet.db'}" if request.param == "sqlite" else _worker_pg_url()
    database = Database(url)
    if request.param == "postgresql":
        empty_pg(database)
    upgrade(database)
    yield database
    database.engine.dispose()


def empty_pg(database: Any) -> None:
    """A shared PostgreSQL server: start from nothing (every table there, not only the models
    this test imported)."""
    from sqlalchemy import MetaData, text

    existing = MetaData()
    existing.reflect(database.engine)
    existing.drop_all(database.engine)
    with database.engine.begin() as conn:
        conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
