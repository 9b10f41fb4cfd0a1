"""Orchestration: the StateDB, the idempotent stage activities and the orchestrators."""
