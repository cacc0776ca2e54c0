"""Dagster sensors for events outside Dagster (NATS, MLflow registry, runner health)."""
