"""Figures of a training: feature importance, ROC, calibration, metrics per fold.

Built on ``matplotlib.figure.Figure`` directly (no pyplot state, no display): callers save
or log them.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.figure import Figure
from sklearn.metrics import roc_curve

from models.learning.datasets import Task


def importance_figure(names: tuple[str, ...], shares: np.ndarray, top: int = 30) -> Figure:
    order = np.argsort(shares)[::-1][:top][::-1]
    fig = Figure(figsize=(7, max(3.0, 0.22 * len(order) + 1)))
    ax = fig.subplots()
    ax.barh([names[i] for i in order], shares[order], color="#3b6ea5")
    ax.set_xlabel("share of total gain (mean over folds)")
    ax.set_title(f"feature importance, top {len(order)}")
    fig.tight_layout()
    return fig


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray]]) -> Figure:
    """``curves``: name -> (is up, P(up)) of out-of-sample rows."""
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    for name, (y, p) in curves.items():
        if len(np.unique(y)) < 2:
            continue
        fpr, tpr, _ = roc_curve(y, p)
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title("ROC of 'up', out of sample")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def calibration_figure(y: np.ndarray, p: np.ndarray, bins: int = 10) -> Figure:
    """Reliability diagram: mean predicted P(up) against the observed share of ups per bin."""
    edges = np.quantile(p, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges, p, side="right") - 1, 0, bins - 1)
    predicted, observed, counts = [], [], []
    for b in range(bins):
        chosen = which == b
        if chosen.any():
            predicted.append(p[chosen].mean())
            observed.append(y[chosen].mean())
            counts.append(int(chosen.sum()))
    fig = Figure(figsize=(5, 5))
    ax = fig.subplots()
    lo, hi = float(min(predicted + observed)), float(max(predicted + observed))
    ax.plot([lo, hi], [lo, hi], color="grey", linestyle=":")
    ax.plot(predicted, observed, marker="o")
    ax.set_xlabel("mean predicted P(up)")
    ax.set_ylabel("observed share of up")
    ax.set_title("calibration, out of sample (quantile bins)")
    fig.tight_layout()
    return fig


def folds_figure(metric: str, per_fold: dict[str, list[float]]) -> Figure:
    """``per_fold``: candidate name -> metric per fold."""
    fig = Figure(figsize=(7, 4))
    ax = fig.subplots()
    for name, values in per_fold.items():
        ax.plot(range(len(values)), [v if not math.isnan(v) else None for v in values], marker="o", label=name)
    ax.set_xlabel("fold (time order)")
    ax.set_ylabel(metric)
    ax.set_title(f"{metric} per walk-forward fold")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def returns_figure(pred: np.ndarray, realized: np.ndarray, bins: int = 10) -> Figure:
    """Mean realized return per decile of the predicted return (regression targets)."""
    edges = np.quantile(pred, np.linspace(0, 1, bins + 1))
    which = np.clip(np.searchsorted(edges, pred, side="right") - 1, 0, bins - 1)
    means = [realized[which == b].mean() if (which == b).any() else np.nan for b in range(bins)]
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.bar(range(1, bins + 1), means, color="#3b6ea5")
    ax.set_xlabel("decile of the predicted return")
    ax.set_ylabel("mean realized return")
    ax.set_title("realized return by predicted decile, out of sample")
    fig.tight_layout()
    return fig


def training_figures(task: Task, names: tuple[str, ...], importance: np.ndarray | None, y: np.ndarray,
                     raw: np.ndarray, label: np.ndarray, metric: str, per_fold: dict[str, list[float]],
                     roc: dict[str, tuple[np.ndarray, np.ndarray]] | None = None) -> dict[str, Figure]:
    """Every figure that applies to ``task``, by artifact file name."""
    figures: dict[str, Figure] = {"metrics_per_fold.png": folds_figure(metric, per_fold)}
    if importance is not None:
        figures["feature_importance.png"] = importance_figure(names, importance)
    if task is Task.REGRESSION:
        figures["return_deciles.png"] = returns_figure(raw, label)
    else:
        up = (label > 0).astype(np.int32)
        p_up = raw[:, -1]
        figures["roc.png"] = roc_figure(roc or {"model": (up, p_up)})
        figures["calibration.png"] = calibration_figure(up, p_up)
    return figures
