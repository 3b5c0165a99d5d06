"""The gateway's errors, each with the HTTP status the API answers it with."""

from __future__ import annotations

from shared.errors import TidegateError


class GatewayError(TidegateError):
    http_status = 500


class UnknownModelError(GatewayError):
    http_status = 404


class ReleaseError(GatewayError):
    """An operation the model's release state does not allow."""

    http_status = 409


class InvalidReleaseError(GatewayError):
    """A release operation asked with settings that cannot work (a budget on an unknown
    metric or class, a step outside the plan)."""

    http_status = 422


class UnavailableError(GatewayError):
    """The model failed and there is no fallback."""

    http_status = 503


class OverloadError(GatewayError):
    http_status = 429


class ReplicationError(GatewayError):
    """The replicas' shared store refused or could not be reached (`cloud_serving.replication`)."""

    http_status = 503


class DuplicateGatewayError(ReplicationError):
    """Another live gateway replica uses this replica id."""
