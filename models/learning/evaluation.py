"""Cross-validation over walk-forward folds: out-of-sample predictions and their metrics.

Every prediction comes from a model fitted on its fold's (purged) training rows only, so the
concatenated predictions are out of sample by construction. The time spent inside the
learners (fit and predict) is measured apart from everything else, so the cost of the data
path can be stated as a share.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from models.learning.datasets import Dataset, Task
from models.learning.estimators import Estimator
from models.learning.folds import Fold
from models.learning.metrics import mean_of, score

FoldCallback = Callable[[int, dict[str, float], dict[str, float]], None]
"""Called after each fold with (fold index, that fold's metrics, mean so far); may raise to
stop (Optuna's pruning does)."""


@dataclass
class CVResult:
    name: str
    folds: list[Fold]
    raw: np.ndarray            # out-of-sample predictions, rows in the order of `index`
    index: np.ndarray          # dataset row of each prediction (the test rows, fold after fold)
    fold_of: np.ndarray        # fold of each prediction
    per_fold: list[dict[str, float]]
    overall: dict[str, float]  # on all out-of-sample predictions at once
    mean: dict[str, float]     # mean over folds
    learner_seconds: float     # inside fit/predict
    seconds: float             # the whole cross-validation
    importance: np.ndarray | None = None  # mean share of gain per feature over folds
    fold_seconds: list[float] = field(default_factory=list)


def _inputs(dataset: Dataset, inputs: str) -> np.ndarray:
    if inputs == "features":
        return dataset.X
    if inputs == "previous_return":
        return dataset.previous_return.reshape(-1, 1)
    raise ValueError(f"unknown inputs {inputs!r}")


def cross_validate(
    name: str,
    dataset: Dataset,
    folds: list[Fold],
    make: Callable[[], Estimator],
    inputs: str = "features",
    after_fold: FoldCallback | None = None,
) -> CVResult:
    """Fit a fresh estimator per fold on its training rows, predict its test rows."""
    started = time.perf_counter()
    X = _inputs(dataset, inputs)
    names = dataset.feature_names if inputs == "features" else ("previous_return",)
    task = dataset.target.task
    raws, per_fold, importances, fold_seconds = [], [], [], []
    learner = 0.0
    for fold in folds:
        y_train = dataset.y[fold.train]
        if task is not Task.REGRESSION:
            missing = sorted(set(range(dataset.target.n_classes)) - set(np.unique(y_train).tolist()))
            if missing:
                labels = [dataset.target.classes[m] for m in missing]
                raise ValueError(f"fold {fold.index}: no training row of class {labels} for {dataset.target.name}; use fewer folds or more data")
        t0 = time.perf_counter()
        estimator = make().fit(X[fold.train], y_train, names)
        raw = estimator.predict(X[fold.test])
        elapsed = time.perf_counter() - t0
        learner += elapsed
        fold_seconds.append(elapsed)
        metrics = score(task, dataset.y[fold.test], raw, dataset.days[fold.test])
        raws.append(raw)
        per_fold.append(metrics)
        weights = estimator.importance()
        if weights is not None:
            importances.append(weights)
        if after_fold is not None:
            after_fold(fold.index, metrics, mean_of(per_fold))
    index = np.concatenate([np.arange(f.test_start, f.test_stop) for f in folds])
    fold_of = np.concatenate([np.full(f.test_rows, f.index, dtype=np.int32) for f in folds])
    raw = np.concatenate(raws)
    overall = score(task, dataset.y[index], raw, dataset.days[index])
    return CVResult(
        name=name, folds=folds, raw=raw, index=index, fold_of=fold_of, per_fold=per_fold, overall=overall,
        mean=mean_of(per_fold), learner_seconds=learner, seconds=time.perf_counter() - started,
        importance=np.mean(importances, axis=0) if importances else None, fold_seconds=fold_seconds,
    )
