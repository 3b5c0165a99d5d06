"""A fleet simulator: many protocol-accurate simulated agents in one process."""
