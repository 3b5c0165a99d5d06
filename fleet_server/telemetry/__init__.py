"""Health beacons and install receipts from devices: latest per device plus a bounded history."""
