"""Walk-forward backtest of a registered model: its out-of-sample predictions, and only those.

A training writes one prediction per bar of each walk-forward fold's test rows
(``model_predictions``) and every fold's ranges (``model_folds``: a fold tests the bars whose
close lies in ``[test_start, test_end)``; fold -1 is the registered model refitted on every row,
in-sample everywhere). A model is judged here on exactly those predictions: any prediction
outside its own fold's test range (fold -1, a fold the table does not know, a bar the fold
trained on) refuses the whole backtest with the reason, never a silent filter. The
predictions go through :class:`~models.trading.strategy.ModelStrategy` (thresholds) into the
same engine as every other backtest; bars before the first tested bar only warm the engine up
(the ATR), and the results start at the first out-of-sample bar. Each fold's own numbers
(return, drawdown, trades) come beside the whole run's, so a model that earned everything in
one fold shows it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from models.backtest.metrics import drawdown
from models.backtest.runner import BacktestConfig, BacktestResult, Progress, run_backtest
from models.market.timeframes import Timeframe
from models.trading.strategy import ModelStrategy

REGRESSION_DEFAULTS = {"column": "prediction", "long_above": 0.0, "short_below": 0.0}


class InSamplePredictions(ValueError):
    """Predictions that are not out of sample for the model that made them."""


def strategy_params(params: Mapping[str, Any] | None, regression: bool) -> dict[str, Any]:
    """The model strategy's thresholds: a classifier's ``prob_up`` by default, a return
    forecaster's ``prediction`` (long above 0, short below) when the target is a return."""
    return {**(REGRESSION_DEFAULTS if regression else {}), **(params or {})}


def check_out_of_sample(predictions: pl.DataFrame, folds: pl.DataFrame, label: str = "the model") -> dict[int, int]:
    """Refuse (:class:`InSamplePredictions`) unless every prediction's bar closes inside its own
    fold's test range; returns the predictions per fold. ``folds`` has ``fold, test_start,
    test_end`` (``model_folds``); ``predictions`` has ``symbol, ts, close_ts, fold``."""
    if predictions.is_empty():
        raise InSamplePredictions(f"{label} has no out-of-sample predictions in model_predictions")
    missing = [c for c in ("symbol", "ts", "close_ts", "fold") if c not in predictions.columns]
    if missing:
        raise ValueError(f"predictions of {label} lack {', '.join(missing)}")
    tests = (folds.filter((pl.col("fold") >= 0) & pl.col("test_start").is_not_null() & pl.col("test_end").is_not_null())
             .select(pl.col("fold").cast(pl.Int64), pl.col("test_start").cast(pl.Datetime("ms", "UTC")),
                     pl.col("test_end").cast(pl.Datetime("ms", "UTC"))))
    rows = predictions.select("symbol", "close_ts", pl.col("fold").cast(pl.Int64)).with_columns(
        pl.col("close_ts").cast(pl.Datetime("ms", "UTC")))
    joined = rows.join(tests, on="fold", how="left")
    outside = joined.filter(pl.col("test_start").is_null() | (pl.col("close_ts") < pl.col("test_start"))
                            | (pl.col("close_ts") >= pl.col("test_end")))
    if outside.height:
        first = outside.sort("close_ts").row(0, named=True)
        fold = first["fold"]
        if fold == -1:
            why = "fold -1 is the registered model refitted on every row: in-sample everywhere"
        elif first["test_start"] is None:
            why = f"model_folds has no test range for fold {fold}"
        else:
            why = f"fold {fold} tests bars closing in [{first['test_start']:%Y-%m-%d %H:%M}, {first['test_end']:%Y-%m-%d %H:%M})"
        raise InSamplePredictions(
            f"{label}: {outside.height:,} of {predictions.height:,} predictions lie outside their fold's test range "
            f"(first: {first['symbol']} bar closing {first['close_ts']:%Y-%m-%d %H:%M} UTC, fold {fold}; {why}); "
            f"a model is backtested on its out-of-sample predictions only"
        )
    counts = rows.group_by("fold").len().sort("fold")
    return dict(zip(counts["fold"].to_list(), counts["len"].to_list(), strict=True))


@dataclass
class ModelBacktest:
    result: BacktestResult
    folds: pl.DataFrame  # per fold: window, bars, predictions, return, max drawdown, trades opened
    predictions: int
    unmatched: int  # predictions of bars not in the bars given (a bar the warehouse lacks)


def run_model_backtest(bars: pl.DataFrame, predictions: pl.DataFrame, folds: pl.DataFrame, params: Mapping[str, Any],
                       config: BacktestConfig = BacktestConfig(), *, label: str = "the model", name: str | None = None,
                       rates: Mapping[str, pl.DataFrame] | None = None, progress: Progress | None = None) -> ModelBacktest:
    """Backtest ``predictions`` (checked out of sample against ``folds``) on ``bars`` through
    the model strategy with ``params``. Bars before the first prediction warm up the engine."""
    per_fold = check_out_of_sample(predictions, folds, label)
    symbols = set(bars["symbol"].unique().to_list()) if bars.height else set()
    predictions = predictions.filter(pl.col("symbol").is_in(sorted(symbols)))
    if predictions.is_empty():
        raise ValueError(f"{label}: no predictions for the bars' symbols {sorted(symbols)}")
    first = predictions["ts"].min()
    strategy = ModelStrategy(**params)
    matched = bars.join(predictions.select("symbol", pl.col("ts").cast(bars["ts"].dtype)), on=["symbol", "ts"], how="semi").height
    result = run_backtest(bars, strategy, config, predictions=predictions, rates=rates, progress=progress,
                          name=name or label, trade_from=first)
    return ModelBacktest(result, fold_summary(result, folds, per_fold), predictions.height, predictions.height - matched)


def fold_summary(result: BacktestResult, folds: pl.DataFrame, per_fold: Mapping[int, int]) -> pl.DataFrame:
    """Each tested fold's own numbers: bars, predictions, return (equity at its last bar over
    equity before its first), max drawdown inside it, trades opened in it."""
    ts = result.equity["ts"].dt.epoch("ms").to_numpy()
    equity = result.equity["equity"].to_numpy()
    entries = result.trades["entry_ts"].dt.epoch("ms").to_numpy() if result.trades.height else np.array([], dtype=np.int64)
    initial = result.config.initial_equity
    close = ts + (Timeframe(result.timeframe).minutes * 60_000 if result.timeframe else 0)
    rows = []
    tested = folds.filter(pl.col("fold") >= 0).sort("fold")
    for fold, start, end in tested.select("fold", "test_start", "test_end").iter_rows():
        if start is None or end is None:
            continue
        lo, hi = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
        inside = (close >= lo) & (close < hi)  # a bar belongs to the fold whose range holds its close
        idx = np.flatnonzero(inside)
        if not len(idx):
            continue
        before = equity[idx[0] - 1] if idx[0] > 0 else initial
        window = np.r_[before, equity[idx]]
        rows.append({"fold": int(fold), "test_start": start, "test_end": end, "bars": len(idx),
                     "predictions": int(per_fold.get(int(fold), 0)),
                     "return": float(window[-1] / window[0] - 1.0), "max_drawdown": float(np.min(drawdown(window))),
                     "trades": int(np.sum((entries >= ts[idx[0]]) & (entries <= ts[idx[-1]])))})
    schema = {"fold": pl.Int64, "test_start": pl.Datetime("ms", "UTC"), "test_end": pl.Datetime("ms", "UTC"), "bars": pl.Int64,
              "predictions": pl.Int64, "return": pl.Float64, "max_drawdown": pl.Float64, "trades": pl.Int64}
    return pl.DataFrame(rows, schema=schema)

