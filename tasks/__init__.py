"""Prefect tasks: thin wrappers over `sanitator` that add retries, timeouts and placement."""
