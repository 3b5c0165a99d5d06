"""Campaigns: cohorts, waves, gates, rate and concurrency limits, blackout windows."""
