"""The model registry and experiment tracking (MLflow): a plain client class, and a thin
Dagster resource that builds it."""

from resources.registry.tracking import CHALLENGER, CHAMPION, ModelRegistry, VersionInfo, code_version, pip_requirements

__all__ = ["CHALLENGER", "CHAMPION", "ModelRegistry", "VersionInfo", "code_version", "pip_requirements"]
