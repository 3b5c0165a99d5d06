"""Contracts that two or more Tidegate packages rely on.

`shared` imports none of the other Tidegate packages: bundle format, update
trust, gates, statistics and the telemetry schema live here so that the
agent, the fleet server, the builder, the cloud gateway and the bench runner
agree on one definition of each.
"""

__all__ = ["TidegateError"]

from shared.errors import TidegateError
