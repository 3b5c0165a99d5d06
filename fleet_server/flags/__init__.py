"""Feature flags: named JSON values the inference gateway reads (thresholds, arms, switches)."""
