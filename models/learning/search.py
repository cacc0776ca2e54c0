"""Hyper-parameter search with Optuna on the walk-forward folds.

The objective is the mean out-of-fold metric. After each fold the running mean is reported,
so a trial that trails the median of earlier trials at the same fold is pruned. The caller
creates the study (with Optuna's RDB storage, so a stopped search resumes): the budget counts
trials already finished in it, and ``timeout`` bounds one invocation.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import optuna

from models.learning.datasets import Dataset
from models.learning.estimators import LearnerSettings, make_estimator
from models.learning.evaluation import cross_validate
from models.learning.folds import Fold

Bounds = dict[str, list[float]]

# (kind, low, high): "int"/"float" uniform, "log_int"/"log" on a log scale.
SPACES: dict[str, dict[str, tuple[str, float, float]]] = {
    "lightgbm": {
        "n_estimators": ("log_int", 50, 600),
        "learning_rate": ("log", 0.01, 0.3),
        "num_leaves": ("log_int", 8, 128),
        "min_child_samples": ("log_int", 10, 300),
        "subsample": ("float", 0.5, 1.0),
        "colsample_bytree": ("float", 0.3, 1.0),
        "reg_lambda": ("log", 1e-3, 10.0),
    },
    "xgboost": {
        "n_estimators": ("log_int", 50, 600),
        "learning_rate": ("log", 0.01, 0.3),
        "max_depth": ("int", 3, 9),
        "min_child_weight": ("log", 1.0, 50.0),
        "subsample": ("float", 0.5, 1.0),
        "colsample_bytree": ("float", 0.3, 1.0),
        "reg_lambda": ("log", 1e-3, 10.0),
    },
    "catboost": {
        "iterations": ("log_int", 100, 800),
        "learning_rate": ("log", 0.01, 0.3),
        "depth": ("int", 4, 8),
        "l2_leaf_reg": ("log", 1.0, 30.0),
        "rsm": ("float", 0.3, 1.0),
    },
}
_FIXED = {"lightgbm": {"subsample_freq": 1}, "xgboost": {}, "catboost": {}}


def suggest(trial: optuna.Trial, family: str, overrides: Bounds | None = None) -> dict[str, Any]:
    """Parameters for ``trial`` from the family's space, bounds overridden by ``overrides``."""
    space = dict(SPACES[family])
    for name, bounds in (overrides or {}).items():
        if name not in space:
            raise ValueError(f"{family} search has no parameter {name!r}; it searches {', '.join(space)}")
        kind = space[name][0]
        space[name] = (kind, bounds[0], bounds[1])
    params: dict[str, Any] = dict(_FIXED[family])
    for name, (kind, low, high) in space.items():
        if kind == "int":
            params[name] = trial.suggest_int(name, int(low), int(high))
        elif kind == "log_int":
            params[name] = trial.suggest_int(name, int(low), int(high), log=True)
        elif kind == "log":
            params[name] = trial.suggest_float(name, low, high, log=True)
        else:
            params[name] = trial.suggest_float(name, low, high)
    return params


def params_of(trial: optuna.trial.FrozenTrial, family: str) -> dict[str, Any]:
    return {**_FIXED[family], **trial.params}


@dataclass(frozen=True)
class SearchResult:
    best_params: dict[str, Any]
    best_value: float
    best_trial: int
    complete: int
    pruned: int
    failed: int
    ran: int          # trials run by this invocation
    seconds: float


TrialCallback = Callable[[optuna.trial.FrozenTrial, optuna.Study, int], None]


def finished_trials(study: optuna.Study) -> int:
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    return len(study.get_trials(deepcopy=False, states=states))


def run_search(
    study: optuna.Study,
    dataset: Dataset,
    folds: list[Fold],
    family: str,
    metric: str,
    settings: LearnerSettings,
    n_trials: int,
    timeout_s: float | None = None,
    bounds: Bounds | None = None,
    on_trial: TrialCallback | None = None,
) -> SearchResult:
    """Run the trials the budget still allows (``n_trials`` minus those the study finished)."""
    started = time.perf_counter()
    task = dataset.target.task

    def objective(trial: optuna.Trial) -> float:
        params = suggest(trial, family, bounds)

        def report(fold: int, _: dict[str, float], running: dict[str, float]) -> None:
            value = running[metric]
            if math.isnan(value):
                return
            trial.report(value, step=fold)
            if trial.should_prune():
                raise optuna.TrialPruned(f"fold {fold}: mean {metric} {value:.5f} trails the median")

        result = cross_validate(
            f"trial {trial.number}", dataset, folds,
            lambda: make_estimator(family, task, params, settings, dataset.target.n_classes), after_fold=report,
        )
        value = result.mean[metric]
        if math.isnan(value):
            raise optuna.TrialPruned(f"{metric} undefined on these folds")
        return value

    remaining = max(0, n_trials - finished_trials(study))
    before = len(study.trials)
    if remaining:
        callbacks = [lambda s, t: on_trial(t, s, n_trials)] if on_trial else None
        study.optimize(objective, n_trials=remaining, timeout=timeout_s, callbacks=callbacks, gc_after_trial=False,
                       catch=())
    states = [t.state for t in study.get_trials(deepcopy=False)]
    complete = states.count(optuna.trial.TrialState.COMPLETE)
    if not complete:
        raise ValueError(f"search finished no trial out of {len(states)} (all pruned or failed)")
    best = study.best_trial
    return SearchResult(
        best_params=params_of(best, family), best_value=float(best.value), best_trial=best.number,
        complete=complete, pruned=states.count(optuna.trial.TrialState.PRUNED),
        failed=states.count(optuna.trial.TrialState.FAIL), ran=len(study.trials) - before,
        seconds=time.perf_counter() - started,
    )


def new_sampler_and_pruner(seed: int) -> tuple[optuna.samplers.BaseSampler, optuna.pruners.BasePruner]:
    """Seeded TPE and a median pruner that waits for 5 trials and the first fold."""
    return optuna.samplers.TPESampler(seed=seed), optuna.pruners.MedianPruner(n_startup_trials=5, n_warmup_steps=1)
