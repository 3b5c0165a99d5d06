"""Error roots and the logging of errors a hot path answers around."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from shared.logs import RateLimitedLog


def test_a_handled_exception_is_logged_once_per_window_with_the_count_of_the_rest(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    handled = RateLimitedLog(logging.getLogger("tidegate.test.ratelog"), every_s=60, clock=lambda: now[0])
    caplog.set_level(logging.WARNING, logger="tidegate.test.ratelog")
    assert handled.exception("m/2.0.0", "m 2.0.0 failed a request", TimeoutError())
    for _ in range(99):
        now[0] += 0.1
        assert not handled.exception("m/2.0.0", "m 2.0.0 failed a request", TimeoutError())
    assert handled.exception("m/1.0.0", "m 1.0.0 failed a request", RuntimeError("boom"))  # its own kind
    now[0] = 61.0
    assert handled.exception("m/2.0.0", "m 2.0.0 failed a request", TimeoutError())
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "m 2.0.0 failed a request: TimeoutError",
        "m 1.0.0 failed a request: boom",
        "m 2.0.0 failed a request: TimeoutError (99 more since the last report)",
    ]
    assert all(r.exc_info is not None for r in caplog.records)  # the traceback goes with it


def test_every_process_logs_one_json_schema_and_the_server_a_line_per_decision(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The agent, the fleet server and the gateway share `configure_logging`: one JSON object
    per line with the same field names, personal data redacted; a campaign's decisions (here
    its creation and an operator's pause) are log lines too, not only rows."""
    import json
    from datetime import UTC, datetime

    from fleet_server.campaigns import service
    from fleet_server.campaigns.spec import CampaignSpec
    from fleet_server.db import Database
    from fleet_server.migrate import upgrade
    from shared.logs import OWN_LOGGERS, configure_logging

    root = logging.getLogger()
    saved = (root.handlers[:], root.level, {n: logging.getLogger(n).level for n in OWN_LOGGERS})
    try:
        configure_logging(logging.INFO)
        logging.getLogger("agent.mqtt").warning("cannot reach broker for vehicle owner ops@example.com")
        logging.getLogger("httpx").info("a library's chatter stays out")
        db = Database(f"sqlite:///{tmp_path / 'f.db'}")
        upgrade(db)
        now = datetime(2026, 12, 2, tzinfo=UTC)
        spec = {"name": "n", "target": "t", "repository": "r", "cohort": {"sku": "s"}}
        spec["waves"] = [{"percent": 100}]
        with db.session() as s:
            c = service.create(s, spec=CampaignSpec.model_validate(spec), actor="ops", now=now)
            service.submit(s, campaign_id=c.id, actor="ops", now=now)
            why = "test fleet: no bench"
            service.approve(s, campaign_id=c.id, actor="admin", now=now, override_reason=why)
            service.pause(s, campaign_id=c.id, actor="ops", now=now, reason="looking at wave 1")
        for handler in root.handlers:
            handler.flush()
    finally:
        root.handlers[:], _, levels = saved[0], root.setLevel(saved[1]), saved[2]
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    agent = next(line for line in lines if line["logger"] == "agent.mqtt")
    assert "ops@example.com" not in agent["message"] and "redacted:" in agent["message"]
    assert not any(line["logger"] == "httpx" for line in lines)
    events = [line.get("event") for line in lines if line["logger"] == "tidegate.campaigns"]
    assert events == [
        "campaign.created",
        "campaign.waiting_for_approval",
        "campaign.override",
        "campaign.scheduled",
        "campaign.paused",
    ]
