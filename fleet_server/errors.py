"""The fleet server's error root: each deliberate error carries the HTTP status the API answers
with, so a route never has to guess, and anything that is not one of these (a `ValueError` from a
bug, a `KeyError`) reaches the caller as a 500 and the log as a traceback instead of passing for
the caller's mistake."""

from __future__ import annotations

from shared.errors import TidegateError


class FleetError(TidegateError):
    """A request the fleet server refuses on purpose: the caller's input or the state it names."""

    http_status = 422


class NotFoundError(FleetError):
    http_status = 404


class ConflictError(FleetError):
    """The request is well formed but the state it would change does not allow it."""

    http_status = 409
