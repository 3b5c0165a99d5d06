"""The on-device agent: A/B slots, the install state machine, self-test, Jobs client, telemetry."""
