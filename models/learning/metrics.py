"""Metrics of out-of-sample predictions.

Classifiers: AUC (one-vs-rest macro for three classes), log loss, accuracy, precision,
recall and F1 (of "up" for a binary target, macro for three classes) and the Brier score.
Returns: IC (Pearson correlation of prediction and realized return), RankIC (Spearman), and
ICIR: the mean daily IC over its standard deviation (at least 5 days), a stability measure; plus RMSE
and the hit rate of the predicted sign.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

from models.learning.datasets import Task

CLASSIFICATION_METRICS = ("auc", "log_loss", "accuracy", "precision", "recall", "f1", "brier")
REGRESSION_METRICS = ("ic", "rank_ic", "icir", "rmse", "hit_rate")
HIGHER_IS_BETTER = {
    "auc": True, "log_loss": False, "accuracy": True, "precision": True, "recall": True, "f1": True,
    "brier": False, "ic": True, "rank_ic": True, "icir": True, "rmse": False, "hit_rate": True,
}
MIN_ICIR_PERIODS = 5  # fewer days make the IC's dispersion (and so ICIR) meaningless
PRIMARY = {Task.BINARY: "log_loss", Task.MULTICLASS: "log_loss", Task.REGRESSION: "ic"}


def metric_names(task: Task) -> tuple[str, ...]:
    return REGRESSION_METRICS if task is Task.REGRESSION else CLASSIFICATION_METRICS


def score(task: Task, y: np.ndarray, raw: np.ndarray, days: np.ndarray | None = None) -> dict[str, float]:
    """Every metric of ``task`` for encoded targets ``y`` and raw predictions (probabilities
    or values); ``days`` groups rows into the periods of ICIR."""
    if task is Task.REGRESSION:
        return regression_metrics(y, raw, days)
    return classification_metrics(y, raw)


def classification_metrics(y: np.ndarray, proba: np.ndarray) -> dict[str, float]:
    # scikit-learn on first use: importing it costs ~1 s, which every command would pay
    from sklearn.metrics import accuracy_score, log_loss, precision_recall_fscore_support, roc_auc_score

    k = proba.shape[1]
    labels = list(range(k))
    clipped = np.clip(proba, 1e-15, 1 - 1e-15)
    clipped = clipped / clipped.sum(axis=1, keepdims=True)
    predicted = proba.argmax(axis=1)
    present = np.unique(y)
    if len(present) < 2:
        auc = math.nan
    elif k == 2:
        auc = float(roc_auc_score(y, proba[:, 1]))
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            auc = float(roc_auc_score(y, clipped, multi_class="ovr", average="macro", labels=labels)) if len(present) == k else math.nan
    average = "binary" if k == 2 else "macro"
    precision, recall, f1, _ = precision_recall_fscore_support(
        y, predicted, average=average, labels=None if k == 2 else labels, zero_division=0
    )
    onehot = np.eye(k)[y.astype(np.int64)]
    brier = float(np.mean((proba[:, 1] - y) ** 2)) if k == 2 else float(np.mean(np.sum((proba - onehot) ** 2, axis=1)))
    return {
        "auc": auc,
        "log_loss": float(log_loss(y, clipped, labels=labels)),
        "accuracy": float(accuracy_score(y, predicted)),
        "precision": float(precision),
        "recall": float(recall),
        "f1": float(f1),
        "brier": brier,
    }


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant (a constant forecast has no skill)."""
    if len(a) < 2:
        return math.nan
    if np.all(a == a[0]) or np.all(b == b[0]):
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def _ranks(values: np.ndarray) -> np.ndarray:
    """Average ranks (ties share their mean rank), as Spearman's correlation needs."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(len(values), dtype=np.float64)
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    sums = np.bincount(inverse, weights=ranks)
    return sums[inverse] / counts[inverse]


def regression_metrics(y: np.ndarray, pred: np.ndarray, days: np.ndarray | None = None) -> dict[str, float]:
    ic = _corr(pred, y)
    daily = []
    if days is not None and len(days):
        order = np.argsort(days, kind="stable")
        d, p, t = days[order], pred[order], y[order]
        cuts = np.flatnonzero(np.diff(d)) + 1
        for ps, ts in zip(np.split(p, cuts), np.split(t, cuts), strict=True):
            if len(ps) >= 3:
                daily.append(_corr(ps, ts))
    daily_ic = np.array([v for v in daily if not math.isnan(v)])
    spread = daily_ic.std() if len(daily_ic) >= MIN_ICIR_PERIODS else 0.0
    icir = float(daily_ic.mean() / spread) if spread > 0 else math.nan
    return {
        "ic": ic,
        "rank_ic": _corr(_ranks(pred), _ranks(y)),
        "icir": icir,
        "rmse": float(np.sqrt(np.mean((pred - y) ** 2))),
        "hit_rate": float(np.mean(np.sign(pred) == np.sign(y))),
    }


def is_better(metric: str, candidate: float, reference: float, margin: float = 0.0) -> bool:
    """``candidate`` beats ``reference`` by more than ``margin`` (in the metric's direction);
    NaN never beats anything."""
    if math.isnan(candidate) or math.isnan(reference):
        return False if math.isnan(candidate) else True
    if HIGHER_IS_BETTER[metric]:
        return candidate > reference + margin
    return candidate < reference - margin


def mean_of(folds: list[dict[str, float]]) -> dict[str, float]:
    """Mean per metric over folds, ignoring NaN folds (NaN when every fold is)."""
    names = folds[0].keys() if folds else ()
    out = {}
    for name in names:
        values = [f[name] for f in folds if not math.isnan(f[name])]
        out[name] = float(np.mean(values)) if values else math.nan
    return out
