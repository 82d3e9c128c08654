"""Alembic migrations of the gatekeeper database; run them with `gatekeeper db upgrade`."""
