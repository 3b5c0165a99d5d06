"""The cloud inference gateway: shadow, canary, blue/green, A/B and bandit releases."""
