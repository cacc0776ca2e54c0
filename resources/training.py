"""Training settings: where the model specs live, threads, the Optuna study storage."""

from __future__ import annotations

import os
from pathlib import Path

import yaml
from dagster import ConfigurableResource, EnvVar
from pydantic import Field

from models.learning.specs import ModelSpec, parse_specs

DEFAULT_SPECS = Path(__file__).resolve().parents[1] / "orchestration" / "model_specs.yaml"


def load_specs(path: Path | str | None = None) -> dict[str, ModelSpec]:
    """Specs from a YAML file (default: ``orchestration/model_specs.yaml``)."""
    source = Path(path) if path else DEFAULT_SPECS
    try:
        document = yaml.safe_load(source.read_text())
    except FileNotFoundError:
        raise ValueError(f"model specs file {source} does not exist") from None
    except yaml.YAMLError as exc:
        raise ValueError(f"model specs file {source} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return parse_specs(document)


def default_optuna_storage() -> str:
    path = Path(os.environ.get("TRADEFORGE_HOME", ".tradeforge")).resolve() / "optuna" / "studies.db"
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


class TrainingResource(ConfigurableResource):
    """Which models exist (a YAML file of specs: data, not code) and how training runs."""

    specs_path: str | None = Field(default=None, description="model specs YAML; default orchestration/model_specs.yaml")
    threads: int | None = Field(default=None, description="learner threads when a spec sets none; default: every core")
    optuna_storage: str | None = Field(default=None, description="Optuna RDB URL; default SQLite under $TRADEFORGE_HOME/optuna")

    def specs(self) -> dict[str, ModelSpec]:
        return load_specs(self.specs_path)

    def spec(self, name: str) -> ModelSpec:
        specs = self.specs()
        if name not in specs:
            known = ", ".join(sorted(specs)) or "none"
            raise ValueError(f"no model spec named {name!r} in {self.specs_path or DEFAULT_SPECS} (specs: {known})")
        return specs[name]

    def threads_for(self, spec: ModelSpec) -> int:
        return spec.threads or self.threads or os.cpu_count() or 1

    def storage(self) -> str:
        return self.optuna_storage or default_optuna_storage()


def training_from_env() -> TrainingResource:
    env = os.environ
    config: dict = {}
    if env.get("TRADEFORGE_MODEL_SPECS"):
        config["specs_path"] = env["TRADEFORGE_MODEL_SPECS"]
    if env.get("TRADEFORGE_TRAIN_THREADS"):
        config["threads"] = EnvVar.int("TRADEFORGE_TRAIN_THREADS")
    if env.get("OPTUNA_STORAGE"):
        config["optuna_storage"] = EnvVar("OPTUNA_STORAGE")  # may carry database credentials
    return TrainingResource(**config)
