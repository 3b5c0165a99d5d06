"""The operators' client: `tidegate fleet`, over the fleet server's HTTP API only."""
