"""Error roots and the logging of errors a hot path answers around."""

from __future__ import annotations

import logging

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
