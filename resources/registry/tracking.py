"""Experiment tracking and the model registry: a small client of our own over ``MlflowClient``.

Embedded default: MLflow's SQLite store at ``$TRADEFORGE_HOME/mlflow/mlflow.db`` with
artifacts under ``$TRADEFORGE_HOME/mlflow/artifacts``, used in-process (no server).
``MLFLOW_TRACKING_URI`` selects a tracking server instead (its artifact store then applies).
Nothing here uses MLflow's global state (``mlflow.set_tracking_uri``, active runs), so two
clients on two stores can live in one process, and the live runner can use this class
without Dagster.

Models are saved with their flavor, an explicit signature and explicit pip requirements
(inferring requirements costs seconds and lists both xgboost packages), then logged as the
run's ``model`` artifact and registered from there.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import tempfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_ARTIFACT = "model"
RECIPE_ARTIFACT = "recipe.json"
_PARAM_LIMIT = 6000  # MLflow's limit on a parameter value
_REQUIREMENTS = {
    "lightgbm": ["lightgbm", "scikit-learn", "numpy", "pandas"],
    "xgboost": ["xgboost-cpu", "scikit-learn", "numpy", "pandas"],
    "catboost": ["catboost", "numpy", "pandas"],
}


def default_tracking_dir() -> Path:
    return Path(os.environ.get("TRADEFORGE_HOME", ".tradeforge")).resolve() / "mlflow"


def pip_requirements(family: str) -> list[str]:
    """Pinned to what this environment runs: what the model was trained and tested with."""
    pins = []
    for package in _REQUIREMENTS[family]:
        try:
            pins.append(f"{package}=={metadata.version(package)}")
        except metadata.PackageNotFoundError:
            pins.append(package)
    return pins


def code_version() -> str:
    """The git commit of this checkout (``+dirty`` with uncommitted changes), else the
    package version: recorded with every training."""
    root = Path(__file__).resolve().parents[2]
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True, text=True, timeout=5).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        try:
            return f"tradeforge {metadata.version('tradeforge')}"
        except metadata.PackageNotFoundError:
            return "unknown"


@dataclass(frozen=True)
class VersionInfo:
    name: str
    version: str
    run_id: str
    tags: dict[str, str]


class ModelRegistry:
    """Runs, metrics, artifacts, registered models and their aliases."""

    def __init__(self, tracking_uri: str | None = None, artifact_root: str | None = None, ui_url: str | None = None) -> None:
        env_uri = os.environ.get("MLFLOW_TRACKING_URI")
        self.embedded = not (tracking_uri or env_uri)
        home = default_tracking_dir()
        self.tracking_uri = tracking_uri or env_uri or f"sqlite:///{home / 'mlflow.db'}"
        self.artifact_root = artifact_root or _artifact_root(self.tracking_uri, home)
        self.ui_url = (ui_url or os.environ.get("MLFLOW_UI_URL")
                       or (self.tracking_uri if self.tracking_uri.startswith("http") else "http://127.0.0.1:5000")).rstrip("/")
        self._client: Any = None

    # -- the client ------------------------------------------------------------------------
    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = _mlflow_client(self.tracking_uri)
        return self._client

    def describe(self) -> str:
        """Where runs and models live, without credentials."""
        if self.embedded:
            return f"MLflow on {self.tracking_uri.removeprefix('sqlite:///')} (artifacts {self.artifact_root})"
        from urllib.parse import urlsplit

        parts = urlsplit(self.tracking_uri)
        return f"MLflow at {parts.scheme}://{parts.hostname}{':' + str(parts.port) if parts.port else ''}{parts.path}"

    # -- runs ------------------------------------------------------------------------------
    def experiment_id(self, name: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        location = None
        if self.artifact_root:
            location = Path(self.artifact_root, name).resolve().as_uri()
        try:
            return self.client.create_experiment(name, artifact_location=location)
        except Exception:  # created meanwhile by another process
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def start_run(self, experiment: str, run_name: str, tags: dict[str, str] | None = None) -> str:
        run = self.client.create_run(self.experiment_id(experiment), run_name=run_name, tags=tags or {})
        return run.info.run_id

    def finish_run(self, run_id: str, failed: bool = False) -> None:
        self.client.set_terminated(run_id, status="FAILED" if failed else "FINISHED")

    def log_params(self, run_id: str, params: dict[str, Any]) -> None:
        from mlflow.entities import Param

        items = [Param(k, _text(v)[:_PARAM_LIMIT]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(run_id, params=items[i : i + 100])

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
        import math
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and not math.isnan(v)]
        for i in range(0, len(items), 500):
            self.client.log_batch(run_id, metrics=items[i : i + 500])

    def set_tags(self, run_id: str, tags: dict[str, Any]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(run_id, tags=[RunTag(k, _text(v)) for k, v in tags.items()])

    def log_dict(self, run_id: str, document: Any, path: str) -> None:
        self.client.log_text(run_id, json.dumps(document, indent=2, default=str), path)

    def log_figure(self, run_id: str, figure: Any, path: str) -> None:
        self.client.log_figure(run_id, figure, path, save_kwargs={"dpi": 110})

    def log_dataset(self, run_id: str, name: str, digest: str, source: str, profile: dict[str, Any]) -> None:
        """The dataset as an MLflow input (its fingerprint as the digest), shown with the run."""
        from mlflow.entities import Dataset, DatasetInput, InputTag

        dataset = Dataset(name=name, digest=digest[:36], source_type="clickhouse", source=source, profile=json.dumps(profile, default=str))
        self.client.log_inputs(run_id, [DatasetInput(dataset, [InputTag("mlflow.data.context", "training")])])

    def run_url(self, run_id: str) -> str:
        run = self.client.get_run(run_id)
        return f"{self.ui_url}/#/experiments/{run.info.experiment_id}/runs/{run_id}"

    def model_url(self, name: str, version: str) -> str:
        return f"{self.ui_url}/#/models/{name}/versions/{version}"

    def read_recipe(self, run_id: str) -> dict[str, Any]:
        """The recipe a run recorded (family, task, params, features, seed): enough to refit it."""
        import mlflow.artifacts

        with tempfile.TemporaryDirectory() as tmp:
            path = mlflow.artifacts.download_artifacts(
                run_id=run_id, artifact_path=RECIPE_ARTIFACT, dst_path=tmp, tracking_uri=self.tracking_uri
            )
            return json.loads(Path(path).read_text())

    # -- models ----------------------------------------------------------------------------
    def log_model(self, run_id: str, family: str, native: Any, example: Any, output: Any) -> str:
        """Save ``native`` with its flavor (signature from ``example`` -> ``output``, explicit
        requirements) as the run's ``model`` artifact; returns the artifact URI."""
        from mlflow.models import infer_signature

        flavor = _flavor(family)
        signature = infer_signature(example, output)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, MODEL_ARTIFACT)
            flavor.save_model(native, path, signature=signature, pip_requirements=pip_requirements(family))
            self.client.log_artifacts(run_id, path, MODEL_ARTIFACT)
        return f"{self.client.get_run(run_id).info.artifact_uri}/{MODEL_ARTIFACT}"

    def register(self, name: str, run_id: str, source: str, tags: dict[str, Any], description: str = "") -> str:
        """A new version of registered model ``name`` from a logged model; returns the version."""
        from mlflow.exceptions import MlflowException

        try:
            self.client.get_registered_model(name)
        except MlflowException:
            try:
                self.client.create_registered_model(
                    name, description="One registered model per (target, timeframe, universe); versions from any family "
                    "compete through the promotion gate.",
                )
            except MlflowException:
                pass  # created meanwhile
        version = self.client.create_model_version(
            name, source=source, run_id=run_id, tags={k: _text(v) for k, v in tags.items()}, description=description,
        )
        return str(version.version)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self.client.set_registered_model_alias(name, alias, version)

    def alias(self, name: str, alias: str) -> VersionInfo | None:
        """The version holding ``alias``, or None (no such model or alias)."""
        from mlflow.exceptions import MlflowException

        try:
            found = self.client.get_model_version_by_alias(name, alias)
        except MlflowException:
            return None
        return VersionInfo(name, str(found.version), found.run_id, dict(found.tags))

    def version(self, name: str, version: str) -> VersionInfo:
        found = self.client.get_model_version(name, version)
        return VersionInfo(name, str(found.version), found.run_id, dict(found.tags))

    def tag_version(self, name: str, version: str, tags: dict[str, Any]) -> None:
        for key, value in tags.items():
            self.client.set_model_version_tag(name, version, key, _text(value))

    def load_model(self, name: str, alias: str = CHAMPION, version: str | None = None) -> tuple[Any, VersionInfo]:
        """The native model (LightGBM/XGBoost/CatBoost scikit-learn object) holding ``alias``
        (or ``version``), with its version's tags (family, task, target, classes)."""
        found = self.version(name, version) if version else self.alias(name, alias)
        if found is None:
            raise LookupError(f"registered model {name} has no version with alias {alias!r}")
        flavor = _flavor(found.tags.get("family", ""))
        import mlflow.artifacts

        source = self.client.get_model_version(name, found.version).source
        with tempfile.TemporaryDirectory() as tmp:
            local = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=tmp, tracking_uri=self.tracking_uri)
            model = flavor.load_model(local)
        return model, found


def _artifact_root(tracking_uri: str, home: Path) -> str | None:
    """Where new experiments keep artifacts: a server decides for itself; a database URI
    would otherwise default to ``./mlruns`` in whatever folder the process runs in, so
    SQLite keeps them beside its file and other databases under ``MLFLOW_ARTIFACT_ROOT`` or
    ``$TRADEFORGE_HOME/mlflow/artifacts``."""
    scheme = tracking_uri.split(":", 1)[0].lower()
    if scheme in ("http", "https", "databricks"):
        return None
    if tracking_uri.startswith("sqlite:///"):
        return str(Path(tracking_uri.removeprefix("sqlite:///")).parent / "artifacts")
    return os.environ.get("MLFLOW_ARTIFACT_ROOT") or str(home / "artifacts")


_CLIENTS: dict[str, Any] = {}


def _mlflow_client(uri: str) -> Any:
    """One ``MlflowClient`` per store and process: building one checks the store's schema,
    which costs most of a second on SQLite."""
    if uri not in _CLIENTS:
        from mlflow import MlflowClient

        if uri.startswith("sqlite:///"):
            Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
            for name in ("mlflow.store.db.utils", "alembic.runtime.migration", "mlflow.store.model_registry.abstract_store"):
                logging.getLogger(name).setLevel(logging.WARNING)
        _CLIENTS[uri] = MlflowClient(tracking_uri=uri, registry_uri=uri)
    return _CLIENTS[uri]


def _flavor(family: str) -> Any:
    if family == "lightgbm":
        import mlflow.lightgbm as flavor
    elif family == "xgboost":
        import mlflow.xgboost as flavor
    elif family == "catboost":
        import mlflow.catboost as flavor
    else:
        raise ValueError(f"no MLflow flavor for family {family!r}")
    return flavor


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    return json.dumps(value, default=str, sort_keys=True) if isinstance(value, (dict, list, tuple)) else str(value)
