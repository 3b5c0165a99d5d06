"""Devices: registration and inventory."""
