"""Data drift, concept drift and calibration: the statistics (`stats`), the job over two
tables (`job`: `run_drift`, `DriftConfig`), table files (`tables`) and the report (`report`).
The CLI runs it on files; the fleet server and the gateway run the same job on what they
have collected. Nothing is imported here: the CLI mounts `cli` without loading scipy."""
