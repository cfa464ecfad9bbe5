"""Prefect flows: audit_zoo (nightly registry audit) and the flows built on it."""
