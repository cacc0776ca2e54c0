"""Walk-forward optimisation with Optuna: optimise in-sample, judge on the next window.

The bars are cut into consecutive windows; in each, an Optuna study (TPE, seeded) searches
strategy and risk parameters for the best in-sample objective (daily Sharpe by default), then
the best parameters run on the following window, which the search never saw (the strategy is
warmed up on the bars before it, without trading). The out-of-sample windows chained together
are the result. Because the best of many trials looks good by chance, the out-of-sample Sharpe
is deflated for the number of trials and the spread of their Sharpes (Deflated Sharpe Ratio).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import optuna
import polars as pl
from scipy.stats import kurtosis, skew

from models.backtest import metrics as M
from models.backtest.runner import BacktestConfig, BacktestResult, run_backtest
from models.trading.strategy import Strategy

# name -> ("int", low, high) | ("float", low, high) | ("categorical", [choices])
Space = dict[str, tuple]
Builder = Callable[[dict[str, Any]], tuple[Strategy, BacktestConfig]]


@dataclass
class WindowResult:
    train: tuple[datetime, datetime]
    test: tuple[datetime, datetime]
    best_params: dict[str, Any]
    in_sample: float
    out_of_sample: dict[str, float]


@dataclass
class WalkForwardResult:
    windows: list[WindowResult]
    oos_returns: np.ndarray  # daily, chained
    oos_metrics: dict[str, float]
    trials: int
    deflated_sharpe: float
    trial_sharpes: list[float] = field(default_factory=list)  # per-period, for the deflation


def _suggest(trial: optuna.Trial, space: Space) -> dict[str, Any]:
    params = {}
    for name, spec in space.items():
        kind = spec[0]
        if kind == "int":
            params[name] = trial.suggest_int(name, spec[1], spec[2])
        elif kind == "float":
            params[name] = trial.suggest_float(name, spec[1], spec[2])
        elif kind == "categorical":
            params[name] = trial.suggest_categorical(name, list(spec[1]))
        else:
            raise ValueError(f"parameter {name}: unknown kind {kind!r} (int, float, categorical)")
    return params


def _daily(result: BacktestResult, initial: float) -> np.ndarray:
    ts = result.equity["ts"].dt.epoch("ms").to_numpy()
    _, eq = M.daily_equity(ts, result.equity["equity"].to_numpy())
    return M.returns_from_equity(eq, initial)


def walk_forward(bars: pl.DataFrame, build: Builder, space: Space, *, windows: int = 4, train_fraction: float = 0.75,
                 trials: int = 30, seed: int = 0, warmup_bars: int = 500, objective: str = "sharpe",
                 progress: Callable[[str], None] | None = None) -> WalkForwardResult:
    """Anchored on consecutive, non-overlapping windows of equal length: each has a training
    part (``train_fraction``) and a test part; parameters found on the training part run on
    the test part. ``build(params)`` returns the strategy and backtest config to evaluate."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    bars = bars.sort("ts")
    n = bars.height
    size = n // windows
    if size < 10:
        raise ValueError(f"{n} bars are too few for {windows} walk-forward windows")
    results, chained, trial_sharpes = [], [], []
    total_trials = 0
    for w in range(windows):
        start, stop = w * size, (w + 1) * size if w < windows - 1 else n
        split = start + int((stop - start) * train_fraction)
        train = bars.slice(start, split - start)
        periods = M.periods_per_year(bars["ts"].dt.epoch("ms").to_numpy())

        def score(trial: optuna.Trial) -> float:
            strategy, config = build(_suggest(trial, space))
            result = run_backtest(train, strategy, config)
            daily = _daily(result, config.initial_equity)
            sr = M.sharpe_ratio(daily, periods)
            trial_sharpes.append(sr / math.sqrt(periods) if math.isfinite(sr) else 0.0)
            value = result.metrics.get(objective, math.nan)
            return value if math.isfinite(value) else -1e9

        study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed + w))
        study.optimize(score, n_trials=trials)
        total_trials += trials
        strategy, config = build(study.best_params)
        test_from = bars["ts"][split]
        test = bars.slice(max(start, split - warmup_bars), stop - max(start, split - warmup_bars))
        result = run_backtest(test, strategy, config, trade_from=test_from)
        chained.append(_daily(result, config.initial_equity))
        results.append(WindowResult((train["ts"][0], train["ts"][-1]), (test_from, bars["ts"][stop - 1]),
                                    dict(study.best_params), float(study.best_value), result.metrics))
        if progress:
            progress(f"window {w + 1}/{windows}: in-sample {objective} {study.best_value:.3f}, "
                     f"out-of-sample {objective} {result.metrics.get(objective, math.nan):.3f} with {study.best_params}")
    oos = np.concatenate(chained)
    periods = M.periods_per_year(bars["ts"].dt.epoch("ms").to_numpy())
    sr = M.sharpe_ratio(oos, periods)
    oos_metrics = {
        "total_return": float(np.prod(1 + oos) - 1), "annual_return": M.annual_return(oos, periods),
        "sharpe": sr, "sortino": M.sortino_ratio(oos, periods), "max_drawdown": M.max_drawdown_of_returns(oos),
        "days": len(oos),
    }
    per_period = sr / math.sqrt(periods) if math.isfinite(sr) else 0.0
    dsr = M.deflated_sharpe_ratio(per_period, len(oos), float(skew(oos)) if len(oos) > 2 else 0.0,
                                  float(kurtosis(oos, fisher=False)) if len(oos) > 3 else 3.0,
                                  float(np.var(trial_sharpes, ddof=1)) if len(trial_sharpes) > 1 else 0.0, total_trials)
    return WalkForwardResult(results, oos, oos_metrics, total_trials, dsr, trial_sharpes)
