"""Webhooks: subscriptions per event type, deliveries queued in the transaction that made the
event (a transactional outbox), signed in the Standard Webhooks format, retried with backoff."""
