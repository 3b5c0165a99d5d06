from __future__ import annotations

from pathlib import Path

import pytest

from builder.samples import make_sample_payload


@pytest.fixture(scope="session")
def sample_payload(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real payload: ONNX classifier, inference config and golden self-test data."""
    return make_sample_payload(tmp_path_factory.mktemp("payload"))


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The cloud gateway's test models and serving.toml."""
    from tests.helpers import write_serving_models

    return write_serving_models(tmp_path_factory.mktemp("serving"))


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


@pytest.fixture(params=_database_urls())
def db(request: pytest.FixtureRequest, tmp_path: Path):  # type: ignore[no-untyped-def]
    """A migrated, empty fleet database: SQLite always, PostgreSQL when TIDEGATE_TEST_PG_URL is set."""
    import os

    from sqlalchemy import MetaData, text

    from fleet_server.db import Database
    from fleet_server.migrate import upgrade

    url = (
        f"sqlite:///{tmp_path / 'fleet.db'}"
        if request.param == "sqlite"
        else os.environ["TIDEGATE_TEST_PG_URL"]
    )
    database = Database(url)
    if request.param == "postgresql":  # a shared server: start from nothing
        existing = MetaData()  # every table there, not only the models this test imported
        existing.reflect(database.engine)
        existing.drop_all(database.engine)
        with database.engine.begin() as conn:
            conn.execute(text("DROP TABLE IF EXISTS alembic_version"))
    upgrade(database)
    yield database
    database.engine.dispose()
