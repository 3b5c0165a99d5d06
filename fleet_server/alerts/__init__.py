"""Alerts over the fleet: rules evaluated by the scheduler, remediated through the
campaign service (a drifting wave is paused), notified to webhooks."""
