"""The model the runner infers with: loaded once from the registry, checked, hot-swapped.

``NAME@alias`` follows the alias (``champion`` by default): :class:`ModelWatcher` asks the
registry every ``poll_s`` seconds on a thread of its own, loads a new version there, checks it
like the first, and hands it over between two bars, so no bar waits for a download and none
is missed. ``NAME/VERSION`` pins a version. A model trained on another feature set than the
one this code computes, one whose features the runner does not make, or a missing model is
refused with one line saying what to do.

Inference is one row: a LightGBM model is asked through its booster (the same trees and the
same numbers as ``predict_proba``, without the scikit-learn and pandas checks that cost ten
times the trees themselves); other families through ``predict_proba``/``predict``. Feature
values go in as float32, as the training rows did.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from models.features.registry import FEATURE_NAMES

log = logging.getLogger(__name__)
_REF = re.compile(r"^(?P<name>[^@/]+)(?:@(?P<alias>[A-Za-z0-9_-]+)|/(?P<version>\d+))?$")


class ModelRefused(RuntimeError):
    """The model cannot trade: the message is one line naming what to do."""


@dataclass(frozen=True)
class ModelRef:
    name: str
    alias: str | None
    version: str | None

    def __str__(self) -> str:
        return f"{self.name}@{self.alias}" if self.alias else f"{self.name}/{self.version}"


def parse_ref(text: str) -> ModelRef:
    """``NAME@alias``, ``NAME/VERSION`` or ``NAME`` (= ``NAME@champion``)."""
    match = _REF.match(text.strip())
    if not match:
        raise ModelRefused(f"model {text!r} is not NAME@ALIAS or NAME/VERSION (e.g. direction_1h.M5.demo@champion)")
    if match["version"]:
        return ModelRef(match["name"], None, match["version"])
    return ModelRef(match["name"], match["alias"] or "champion", None)


@dataclass
class LiveModel:
    name: str
    version: str
    alias: str | None
    run_id: str
    family: str
    task: str  # binary, multiclass, regression
    feature_set: str
    features: tuple[str, ...]
    native: Any
    _predict: Callable[[np.ndarray], np.ndarray]

    @property
    def label(self) -> str:
        return f"{self.name} v{self.version}" + (f" (@{self.alias})" if self.alias else "")

    @property
    def column(self) -> str:
        """The column the model strategy reads: ``prob_up`` of a classifier, ``prediction`` of a regressor."""
        return "prediction" if self.task == "regression" else "prob_up"

    def vector(self, row: Mapping[str, object]) -> np.ndarray:
        """The row's features in the model's order, float32, NaN where null."""
        return np.array([[np.nan if (v := row[name]) is None else v for name in self.features]], dtype=np.float32)

    def predict(self, row: Mapping[str, object]) -> float:
        """P(up) for a classifier, the forecast for a regressor."""
        return float(self._predict(self.vector(row)))


def _predictor(native: Any, family: str, task: str) -> Callable[[np.ndarray], np.ndarray]:
    if family == "lightgbm":
        booster = native.booster_
        if task == "binary":
            return lambda x: booster.predict(x, num_threads=1)[0]
        if task == "multiclass":
            return lambda x: booster.predict(x, num_threads=1)[0, 2]
        return lambda x: booster.predict(x, num_threads=1)[0]
    if task == "binary":
        return lambda x: native.predict_proba(x)[0, 1]
    if task == "multiclass":
        return lambda x: native.predict_proba(x)[0, 2]
    return lambda x: native.predict(x)[0]


def load_live_model(registry: Any, ref: ModelRef, feature_set: str, version: str | None = None) -> LiveModel:
    """The version ``ref`` names (or ``version``), checked against the runner's feature set."""
    from mlflow.exceptions import MlflowException

    where = registry.describe()
    try:
        if version is None and ref.alias is not None:
            found = registry.alias(ref.name, ref.alias)
            if found is None:
                versions = _versions(registry, ref.name)
                if not versions:
                    raise ModelRefused(f"no registered model {ref.name!r} in {where}: train one (tradeforge train SPEC) "
                                       f"or set MLFLOW_TRACKING_URI to the registry that has it")
                raise ModelRefused(f"registered model {ref.name} has no version with alias {ref.alias!r} (versions: "
                                   f"{', '.join(versions)}); promote one, or run another alias (e.g. --model "
                                   f"{ref.name}@challenger)")
        else:
            found = registry.version(ref.name, version or ref.version)
    except MlflowException as exc:
        raise ModelRefused(f"model {ref} is not in {where}: {str(exc).splitlines()[0]}") from None
    tags = found.tags
    label = f"{ref.name} v{found.version}"
    trained_on = tags.get("feature_set", "")
    if trained_on != feature_set:
        raise ModelRefused(f"{label} was trained on feature set {trained_on or '(none recorded)'}, this runner computes "
                           f"{feature_set}: retrain it on the current features (tradeforge train SPEC) or run the code "
                           f"that computes its features")
    family, task = tags.get("family", ""), tags.get("task", "")
    if family not in ("lightgbm", "xgboost", "catboost") or task not in ("binary", "multiclass", "regression"):
        raise ModelRefused(f"{label} has family {family!r} and task {task!r}: the runner serves lightgbm, xgboost and "
                           f"catboost classifiers and regressors")
    try:
        recipe = registry.read_recipe(found.run_id)
    except Exception as exc:  # noqa: BLE001  (a missing artifact, a store that does not answer)
        raise ModelRefused(f"{label}: cannot read its recipe (the feature columns) from run {found.run_id}: {exc}") from None
    features = tuple(recipe.get("features") or ())
    unknown = [f for f in features if f not in FEATURE_NAMES]
    if not features or unknown:
        raise ModelRefused(f"{label} needs features the runner does not compute: {', '.join(unknown[:5]) or '(none listed)'}")
    try:
        native, _ = registry.load_model(ref.name, version=found.version)
    except Exception as exc:  # noqa: BLE001
        raise ModelRefused(f"{label}: cannot load the model from {where}: {exc}") from None
    return LiveModel(ref.name, found.version, ref.alias, found.run_id, family, task,
                     trained_on, features, native, _predictor(native, family, task))


def _versions(registry: Any, name: str) -> list[str]:
    try:
        found = registry.client.search_model_versions(f"name = '{name}'")
    except Exception:  # noqa: BLE001
        return []
    out = []
    for v in sorted(found, key=lambda v: int(v.version)):
        aliases = list(getattr(v, "aliases", []) or [])
        out.append(f"{v.version}" + (f" ({', '.join(aliases)})" if aliases else ""))
    return out


class ModelWatcher:
    """Follows an alias: a thread polls the registry and prepares the new version; the runner
    takes it between bars with :meth:`take`. A refused version is reported once and skipped."""

    def __init__(self, registry: Any, ref: ModelRef, feature_set: str, current: str, poll_s: float,
                 on_refused: Callable[[str, str], None] | None = None) -> None:
        self.registry, self.ref, self.feature_set, self.poll_s = registry, ref, feature_set, poll_s
        self.current = current  # the version being served
        self.on_refused = on_refused
        self._ready: LiveModel | None = None
        self._refused: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="model-watcher", daemon=True)

    def start(self) -> None:
        if self.ref.alias is not None and self.poll_s > 0:
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def take(self) -> LiveModel | None:
        with self._lock:
            model, self._ready = self._ready, None
        if model is not None:
            self.current = model.version
        return model

    def poll(self) -> None:
        """One look at the registry (the thread's loop; tests may call it directly)."""
        found = self.registry.alias(self.ref.name, self.ref.alias)
        if found is None or found.version == self.current or found.version in self._refused:
            return
        with self._lock:
            if self._ready is not None and self._ready.version == found.version:
                return
        try:
            model = load_live_model(self.registry, self.ref, self.feature_set, version=found.version)
        except ModelRefused as refused:
            self._refused.add(found.version)
            log.error("alias %s moved to v%s, refused: %s", self.ref, found.version, refused)
            if self.on_refused:
                self.on_refused(found.version, str(refused))
            return
        with self._lock:
            self._ready = model
        log.info("alias %s moved to v%s: loaded, swapping at the next bar", self.ref, found.version)

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception as exc:  # noqa: BLE001  (the registry may be down: keep serving the model we have)
                log.warning("model registry poll failed (%s); serving v%s", exc, self.current)
