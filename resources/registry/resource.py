"""The Dagster resource over :class:`ModelRegistry` (kept apart so the client imports without
Dagster)."""

from __future__ import annotations

import os

from dagster import ConfigurableResource, EnvVar
from pydantic import Field

from resources.registry.tracking import ModelRegistry


class RegistryResource(ConfigurableResource):
    """MLflow tracking and registry: ``tracking_uri`` unset means the embedded SQLite store
    under ``$TRADEFORGE_HOME/mlflow`` (or ``MLFLOW_TRACKING_URI`` when set)."""

    tracking_uri: str | None = Field(default=None, description="an MLflow tracking URI; unset: embedded SQLite")
    artifact_root: str | None = Field(default=None, description="artifact folder of the embedded store")
    ui_url: str | None = Field(default=None, description="where links to runs point (default: the server, or 127.0.0.1:5000)")

    def get_client(self) -> ModelRegistry:
        return ModelRegistry(self.tracking_uri, self.artifact_root, self.ui_url)


def registry_from_env() -> RegistryResource:
    """``MLFLOW_TRACKING_URI`` stays an ``EnvVar`` (it may carry credentials)."""
    config = {}
    if os.environ.get("MLFLOW_TRACKING_URI"):
        config["tracking_uri"] = EnvVar("MLFLOW_TRACKING_URI")
    if os.environ.get("MLFLOW_UI_URL"):
        config["ui_url"] = EnvVar("MLFLOW_UI_URL")
    return RegistryResource(**config)
