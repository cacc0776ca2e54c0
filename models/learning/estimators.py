"""One estimator interface over XGBoost, LightGBM, CatBoost and the naive baselines.

``fit(X, y)`` then ``predict(X)``: class probabilities ``(rows, classes)`` for a classifier,
values ``(rows,)`` for a regressor. Parameters are each library's own names, passed through
on top of what makes a run reproducible (seed, deterministic histograms, thread count), so a
spec reads like the library's documentation. ``device="gpu"`` asks the library for its GPU
mode where it has one; nothing requires it.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from models.learning.datasets import Task

FAMILIES = ("lightgbm", "xgboost", "catboost")
BASELINES = ("majority", "previous_direction")


@dataclass(frozen=True, slots=True)
class LearnerSettings:
    seed: int = 7
    n_jobs: int = 1
    device: str = "cpu"  # "cpu" or "gpu"

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "gpu"):
            raise ValueError(f"device must be 'cpu' or 'gpu', not {self.device!r}")
        if self.n_jobs < 1:
            raise ValueError("n_jobs must be at least 1")


class Estimator(Protocol):
    family: str
    task: Task

    def fit(self, X: np.ndarray, y: np.ndarray, feature_names: tuple[str, ...] | None = None) -> Estimator: ...

    def predict(self, X: np.ndarray) -> np.ndarray: ...

    def importance(self) -> np.ndarray | None: ...

    @property
    def native(self) -> Any: ...


class _Boosted:
    """The three libraries through their scikit-learn classes."""

    family = ""

    def __init__(self, task: Task, params: dict[str, Any], settings: LearnerSettings, n_classes: int) -> None:
        self.task, self.params, self.settings, self.n_classes = task, dict(params), settings, n_classes
        self.model: Any = None

    def _build(self) -> Any:
        raise NotImplementedError

    def fit(self, X: np.ndarray, y: np.ndarray, feature_names: tuple[str, ...] | None = None) -> _Boosted:
        self.model = self._build()
        self._fit(X, y, feature_names)
        return self

    def _fit(self, X: np.ndarray, y: np.ndarray, feature_names: tuple[str, ...] | None) -> None:
        self.model.fit(X, y)

    def predict(self, X: np.ndarray) -> np.ndarray:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="X does not have valid feature names")
            if self.task is Task.REGRESSION:
                return np.asarray(self.model.predict(X), dtype=np.float64)
            return np.asarray(self.model.predict_proba(X), dtype=np.float64)

    def importance(self) -> np.ndarray | None:
        raw = np.asarray(self._gain(), dtype=np.float64)
        total = raw.sum()
        return raw / total if total > 0 else raw

    def _gain(self) -> np.ndarray:
        raise NotImplementedError

    @property
    def native(self) -> Any:
        return self.model


class LightGBMEstimator(_Boosted):
    family = "lightgbm"

    def _build(self) -> Any:
        import lightgbm as lgb

        params = {"random_state": self.settings.seed, "n_jobs": self.settings.n_jobs, "deterministic": True,
                  "force_col_wise": True, "verbose": -1, **self.params}
        if self.settings.device == "gpu":
            params.setdefault("device_type", "gpu")
        if self.task is Task.REGRESSION:
            return lgb.LGBMRegressor(**params)
        return lgb.LGBMClassifier(**params)

    def _fit(self, X: np.ndarray, y: np.ndarray, feature_names: tuple[str, ...] | None) -> None:
        self.model.fit(X, y, feature_name=list(feature_names) if feature_names else "auto")

    def _gain(self) -> np.ndarray:
        return self.model.booster_.feature_importance(importance_type="gain")


class XGBoostEstimator(_Boosted):
    family = "xgboost"

    def _build(self) -> Any:
        import xgboost as xgb

        params = {"random_state": self.settings.seed, "n_jobs": self.settings.n_jobs, "tree_method": "hist",
                  "verbosity": 0, **self.params}
        if self.settings.device == "gpu":
            params.setdefault("device", "cuda")
        if self.task is Task.REGRESSION:
            return xgb.XGBRegressor(**params)
        if self.task is Task.MULTICLASS:
            params.setdefault("objective", "multi:softprob")
        return xgb.XGBClassifier(**params)

    def _fit(self, X: np.ndarray, y: np.ndarray, feature_names: tuple[str, ...] | None) -> None:
        self.model.fit(X, y, verbose=False)
        if feature_names:
            self.model.get_booster().feature_names = list(feature_names)

    def _gain(self) -> np.ndarray:
        booster = self.model.get_booster()
        scores = booster.get_score(importance_type="gain")
        names = booster.feature_names or [f"f{i}" for i in range(booster.num_features())]
        return np.array([scores.get(name, 0.0) for name in names])


class CatBoostEstimator(_Boosted):
    family = "catboost"

    def _build(self) -> Any:
        import catboost as cb

        params = {"random_seed": self.settings.seed, "thread_count": self.settings.n_jobs, "verbose": False,
                  "allow_writing_files": False, **self.params}
        if self.settings.device == "gpu":
            params.setdefault("task_type", "GPU")
        if self.task is Task.REGRESSION:
            return cb.CatBoostRegressor(**params)
        if self.task is Task.MULTICLASS:
            params.setdefault("loss_function", "MultiClass")
        return cb.CatBoostClassifier(**params)

    def _fit(self, X: np.ndarray, y: np.ndarray, feature_names: tuple[str, ...] | None) -> None:
        import catboost as cb

        self.model.fit(cb.Pool(X, y, feature_names=list(feature_names) if feature_names else None))

    def _gain(self) -> np.ndarray:
        return self.model.get_feature_importance()


class MajorityBaseline:
    """The training rows' class frequencies for every row (the mean for a regression): what
    knowing nothing but the base rate scores."""

    family = "majority"

    def __init__(self, task: Task, n_classes: int) -> None:
        self.task, self.n_classes = task, n_classes
        self.value: np.ndarray | float = 0.0

    def fit(self, X: np.ndarray, y: np.ndarray, feature_names: tuple[str, ...] | None = None) -> MajorityBaseline:
        if self.task is Task.REGRESSION:
            self.value = float(np.mean(y))
        else:
            counts = np.bincount(y.astype(np.int64), minlength=self.n_classes).astype(np.float64)
            self.value = (counts + 1.0) / (counts.sum() + self.n_classes)  # Laplace: no certain zero
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        if self.task is Task.REGRESSION:
            return np.full(len(X), self.value, dtype=np.float64)
        return np.tile(self.value, (len(X), 1))

    def importance(self) -> None:
        return None

    @property
    def native(self) -> None:
        return None


class PreviousDirectionBaseline:
    """Persistence: the next move follows the previous bar's direction. Its input is one
    column, the previous 1-bar return; the probabilities (or mean return) for an up and a
    down previous bar are the training rows' frequencies, so its log loss is finite and
    its AUC measures pure persistence."""

    family = "previous_direction"

    def __init__(self, task: Task, n_classes: int) -> None:
        self.task, self.n_classes = task, n_classes
        self.by_side: dict[bool, np.ndarray | float] = {}

    def fit(self, X: np.ndarray, y: np.ndarray, feature_names: tuple[str, ...] | None = None) -> PreviousDirectionBaseline:
        up = X[:, 0] > 0
        for side in (True, False):
            chosen = y[up == side]
            if self.task is Task.REGRESSION:
                self.by_side[side] = float(np.mean(chosen)) if len(chosen) else float(np.mean(y))
            else:
                counts = np.bincount(chosen.astype(np.int64), minlength=self.n_classes).astype(np.float64)
                self.by_side[side] = (counts + 1.0) / (counts.sum() + self.n_classes)
        return self

    def predict(self, X: np.ndarray) -> np.ndarray:
        up = X[:, 0] > 0
        if self.task is Task.REGRESSION:
            return np.where(up, self.by_side[True], self.by_side[False]).astype(np.float64)
        return np.where(up[:, None], self.by_side[True], self.by_side[False])

    def importance(self) -> None:
        return None

    @property
    def native(self) -> None:
        return None


_CLASSES = {"lightgbm": LightGBMEstimator, "xgboost": XGBoostEstimator, "catboost": CatBoostEstimator}


def make_estimator(
    family: str, task: Task, params: dict[str, Any] | None = None, settings: LearnerSettings | None = None,
    n_classes: int = 2,
) -> Estimator:
    """An unfitted estimator of ``family`` (a learner or a baseline) for ``task``."""
    if family == "majority":
        return MajorityBaseline(task, n_classes)
    if family == "previous_direction":
        return PreviousDirectionBaseline(task, n_classes)
    try:
        cls = _CLASSES[family]
    except KeyError:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES + BASELINES)}") from None
    return cls(task, params or {}, settings or LearnerSettings(), n_classes)


def probabilities_by_side(proba: np.ndarray, task: Task) -> dict[str, np.ndarray | None]:
    """Class probabilities as prob_down / prob_flat / prob_up (None where the task has no such class)."""
    if task is Task.BINARY:
        return {"prob_down": proba[:, 0], "prob_flat": None, "prob_up": proba[:, 1]}
    if task is Task.MULTICLASS:
        return {"prob_down": proba[:, 0], "prob_flat": proba[:, 1], "prob_up": proba[:, 2]}
    return {"prob_down": None, "prob_flat": None, "prob_up": None}


def signed_prediction(raw: np.ndarray, task: Task) -> np.ndarray:
    """What the model predicts, in the target's own units: -1/+1 (binary: up or not up),
    -1/0/+1 (barrier), or the forward return."""
    if task is Task.BINARY:
        return np.where(raw[:, 1] >= 0.5, 1.0, -1.0)
    if task is Task.MULTICLASS:
        return raw.argmax(axis=1).astype(np.float64) - 1.0
    return raw.astype(np.float64)
