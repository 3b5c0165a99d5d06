"""The operators' live dashboard: one self-contained page over the API."""
