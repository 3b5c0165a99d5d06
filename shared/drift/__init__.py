"""Data drift, concept drift and calibration: the statistics (`stats`), the job over two
tables (`job`), table files (`tables`) and the report (`report`). The CLI runs it on files;
the fleet server and the gateway run the same job on what they have collected."""

from shared.drift.job import DriftConfig, DriftInputError, DriftReport, Table, run_drift

__all__ = ["DriftConfig", "DriftInputError", "DriftReport", "Table", "run_drift"]
