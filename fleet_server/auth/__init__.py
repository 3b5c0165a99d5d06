"""Operator API tokens with roles, and the audit log of operator actions."""
