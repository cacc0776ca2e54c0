"""A registered model's walk-forward backtest, end to end: its out-of-sample predictions
(``model_predictions``, checked against ``model_folds``) and the warehouse's bars -> the model
strategy on the trading engine -> ``backtest_runs/trades/equity`` -> the tearsheet (on disk and
in an MLflow run of its own, nested under the model's training run) -> the model version's
tags -> ``backtest.started|progress|completed.{run_id}`` on the bus.

No Dagster here: the asset, ``tradeforge backtest --model`` and the training's promotion gate
drive the same code (the gate on the predictions it holds in memory, before they are stored).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import polars as pl

from models.backtest.model import ModelBacktest, check_out_of_sample, run_model_backtest, strategy_params
from models.backtest.spec import build_config
from models.backtest.tearsheet import tearsheet_html
from models.learning.specs import BacktestSettings, ModelSpec
from models.market.timeframes import Timeframe
from resources.bus.client import EventPublisher
from resources.bus.subjects import backtest as backtest_subject
from resources.registry.tracking import ModelRegistry, VersionInfo
from resources.warehouse.backtests import load_bars, tearsheet_dir, write_backtest
from resources.warehouse.client import WarehouseResource
from resources.warehouse.learning import read_folds, read_predictions

Say = Callable[[str], None]
TEARSHEET_ARTIFACT = "backtest/tearsheet.html"
_REF = re.compile(r"^(?P<name>[^@\s]+)@(?P<alias>[A-Za-z0-9_.-]+)$")


def parse_model_ref(text: str) -> tuple[str, str]:
    """``NAME@alias`` (champion, challenger, any alias) or ``NAME@v3`` / ``NAME@3`` (a version)."""
    match = _REF.match(text.strip())
    if not match:
        raise ValueError(f"--model {text!r} is not NAME@alias or NAME@VERSION (e.g. direction_1h.M5.demo@challenger)")
    return match.group("name"), match.group("alias")


def resolve_model(registry: ModelRegistry, ref: str) -> VersionInfo:
    """The registered version ``ref`` names; one clear error when there is none."""
    name, alias = parse_model_ref(ref)
    from mlflow.exceptions import MlflowException

    if re.fullmatch(r"v?\d+", alias):
        try:
            return registry.version(name, alias.lstrip("v"))
        except MlflowException:
            raise ValueError(f"registered model {name} has no version {alias.lstrip('v')} in {registry.describe()}") from None
    found = registry.alias(name, alias)
    if found is None:
        try:
            registry.client.get_registered_model(name)
        except MlflowException:
            raise ValueError(f"no registered model {name} in {registry.describe()} (tradeforge train NAME registers one)") from None
        raise ValueError(f"registered model {name} has no version with alias {alias!r}")
    return found


def settings_of(version: VersionInfo, specs: Mapping[str, ModelSpec]) -> tuple[BacktestSettings, bool, str]:
    """The backtest settings of the spec that trained ``version`` (its ``backtest`` section),
    whether its target is a return, and a note when the spec is no longer in the file."""
    regression = version.tags.get("task") == "regression"
    spec = specs.get(version.tags.get("spec", ""))
    if spec is None:
        return BacktestSettings(), regression, f"spec {version.tags.get('spec', '?')!r} is not in the specs file: default settings"
    return spec.backtest, regression, ""


def run_id_for(model_name: str, version: int, settings: BacktestSettings, symbols: Sequence[str],
               start: datetime, end: datetime) -> str:
    """Deterministic and one subject token: the same model, settings and window are the same run."""
    text = json.dumps({"model": model_name, "version": version, "settings": settings.model_dump(), "symbols": sorted(symbols),
                       "start": start.isoformat(), "end": end.isoformat()}, sort_keys=True, default=str)
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", model_name)
    return f"{safe}-v{version}-{hashlib.blake2b(text.encode(), digest_size=6).hexdigest()}"


def backtest_predictions(warehouse: WarehouseResource, predictions: pl.DataFrame, folds: pl.DataFrame,
                         settings: BacktestSettings, regression: bool, label: str, say: Say = lambda _: None,
                         progress: Callable[[int, int], None] | None = None, name: str | None = None) -> ModelBacktest:
    """Out-of-sample ``predictions`` (refused otherwise) traded on the warehouse's bars of their
    symbols and timeframe, from their first bar (with warm-up bars before) to their last."""
    check_out_of_sample(predictions, folds, label)
    timeframes = predictions["timeframe"].unique().to_list()
    if len(timeframes) != 1:
        raise ValueError(f"{label}: predictions of several timeframes {sorted(timeframes)}")
    tf = Timeframe(timeframes[0])
    config = build_config(settings.initial_equity, settings.account_currency, settings.risk, settings.fill)
    params = strategy_params(settings.params, regression)
    symbols = sorted(predictions["symbol"].unique().to_list())
    first, last = predictions["ts"].min(), predictions["ts"].max()
    bars, rates = load_bars(warehouse, symbols, tf, first, last + timedelta(minutes=tf.minutes), config.risk.atr_period + 1,
                            config.account_currency, say)
    return run_model_backtest(bars, predictions, folds, params, config, label=label, name=name or label, rates=rates,
                              progress=progress)


@dataclass
class ModelBacktestRun:
    run_id: str
    model_name: str
    version: int
    backtest: ModelBacktest
    tearsheet: Path
    mlflow_run_id: str
    mlflow_url: str
    seconds: float
    note: str = ""

    @property
    def metrics(self) -> dict[str, float]:
        return self.backtest.result.metrics


def execute_model_backtest(warehouse: WarehouseResource, registry: ModelRegistry, events: EventPublisher,
                           version: VersionInfo, specs: Mapping[str, ModelSpec], *, symbols: Sequence[str] | None = None,
                           start: datetime | None = None, end: datetime | None = None, source: str = "dagster",
                           say: Say = lambda _: None) -> ModelBacktestRun:
    """Backtest one registered model version over its out-of-sample folds (optionally only
    ``symbols`` and bars opening in ``[start, end)``); store, log and announce it."""
    started = time.perf_counter()
    name, number = version.name, int(version.version)
    label = f"{name} v{number}"
    settings, regression, note = settings_of(version, specs)
    if note:
        say(f"  {note}")
    predictions, folds = read_predictions(warehouse, name, number), read_folds(warehouse, name, number)
    if predictions.is_empty():
        raise ValueError(f"{label} has no predictions in model_predictions of {warehouse.describe()}: "
                         f"train it into this warehouse first")
    check_out_of_sample(predictions, folds, label)  # the whole model is refused, not just a window of it
    known = sorted(predictions["symbol"].unique().to_list())
    if symbols:
        unknown = sorted(set(symbols) - set(known))
        if unknown:
            raise ValueError(f"{label} has no predictions for {', '.join(unknown)}; it predicts {', '.join(known)}")
        predictions = predictions.filter(pl.col("symbol").is_in(list(symbols)))
    span = f"{predictions['ts'].min():%Y-%m-%d %H:%M} .. {predictions['ts'].max():%Y-%m-%d %H:%M} UTC"
    if start is not None:
        predictions = predictions.filter(pl.col("ts") >= start)
    if end is not None:
        predictions = predictions.filter(pl.col("ts") < end)
    if predictions.is_empty():
        raise ValueError(f"{label} has no out-of-sample predictions between {start or '...'} and {end or '...'}; "
                         f"its folds test {span}")
    chosen = sorted(predictions["symbol"].unique().to_list())
    first, last = predictions["ts"].min(), predictions["ts"].max()
    run_id = run_id_for(name, number, settings, chosen, first, last)
    nonce = f"{time.time_ns()}"
    sequence = [0]

    def publish(kind: str, payload: dict[str, Any]) -> None:
        sequence[0] += 1
        events.publish(backtest_subject(kind, run_id), {"run_id": run_id, "model_name": name, "model_version": number,
                                                        **payload}, msg_id=f"{run_id}.{nonce}.{kind}.{sequence[0]}")

    def progress(done: int, total: int) -> None:
        say(f"  engine: {done:,}/{total:,} bars ({done / total:.0%})")
        publish("progress", {"bars_done": done, "bars": total, "share": round(done / total, 4)})

    say(f"backtest {label}: {predictions.height:,} out-of-sample predictions of {', '.join(chosen)} "
        f"{predictions['timeframe'][0]}, {first:%Y-%m-%d %H:%M} .. {last:%Y-%m-%d %H:%M} UTC, in {folds.filter(pl.col('fold') >= 0).height} folds")
    publish("started", {"symbols": chosen, "timeframe": predictions["timeframe"][0], "predictions": predictions.height,
                        "start": first.isoformat(), "end": last.isoformat(), "source": source})
    try:
        backtest = backtest_predictions(warehouse, predictions, folds, settings, regression, label, say, progress, name=label)
    except Exception as exc:
        publish("failed", {"error": f"{type(exc).__name__}: {exc}"})
        raise
    result = backtest.result
    params = strategy_params(settings.params, regression)
    title = f"{label} (walk-forward, out-of-sample folds only): {', '.join(chosen)} {result.timeframe}"
    page = tearsheet_html(result, title=title, tables={"Out-of-sample folds": backtest.folds},
                          note=f"model strategy {params}; risk {settings.risk or 'defaults'}; costs {settings.fill or 'defaults'}; "
                               f"{backtest.predictions:,} predictions ({backtest.unmatched} without a bar)")
    path = tearsheet_dir() / f"{run_id}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page)
    mlflow_run_id = _log_to_mlflow(registry, version, run_id, settings, params, backtest, path, chosen, source)
    write_backtest(warehouse, run_id, result, name=label, params=params, config=settings.model_dump(), tearsheet=str(path),
                   source=source, model_name=name, model_version=number, mlflow_run_id=mlflow_run_id)
    m = result.metrics
    registry.tag_version(name, str(number), {
        "backtest.run_id": run_id, "backtest.mlflow_run_id": mlflow_run_id, "backtest.sharpe": _text(m["sharpe"]),
        "backtest.total_return": _text(m["total_return"]), "backtest.max_drawdown": _text(m["max_drawdown"]),
        "backtest.trades": str(int(m["trades"])),
    })
    url = registry.run_url(mlflow_run_id)
    seconds = time.perf_counter() - started
    publish("completed", {"sharpe": _finite(m["sharpe"]), "total_return": _finite(m["total_return"]),
                          "max_drawdown": _finite(m["max_drawdown"]), "trades": int(m["trades"]),
                          "final_equity": _finite(m["final_equity"]), "tearsheet": str(path), "mlflow_run": url,
                          "seconds": round(seconds, 3)})
    say(f"  stored run {run_id}; tearsheet {path}; MLflow {url}")
    return ModelBacktestRun(run_id, name, number, backtest, path, mlflow_run_id, url, seconds, note)


def _log_to_mlflow(registry: ModelRegistry, version: VersionInfo, run_id: str, settings: BacktestSettings,
                   params: dict[str, Any], backtest: ModelBacktest, tearsheet: Path, symbols: Sequence[str], source: str) -> str:
    """A run of its own in the model's experiment, nested under the training run that made
    the version (MLflow shows it as its child): settings, metrics, tearsheet, folds."""
    result = backtest.result
    parent = registry.client.get_run(version.run_id)
    experiment = registry.client.get_experiment(parent.info.experiment_id).name
    mlflow_run = registry.start_run(experiment, f"backtest v{version.version} {result.equity['ts'][0]:%Y-%m-%d}..{result.equity['ts'][-1]:%Y-%m-%d}",
                                    tags={"mlflow.parentRunId": version.run_id, "tradeforge.kind": "backtest",
                                          "tradeforge.backtest_run_id": run_id, "tradeforge.model": version.name,
                                          "tradeforge.model_version": version.version, "tradeforge.source": source})
    try:
        registry.log_params(mlflow_run, {"model": f"{version.name}@{version.version}", "symbols": ",".join(symbols),
                                         "timeframe": result.timeframe, "initial_equity": settings.initial_equity,
                                         "account_currency": settings.account_currency,
                                         **{f"strategy.{k}": v for k, v in params.items()},
                                         **{f"risk.{k}": v for k, v in settings.risk.items()},
                                         **{f"fill.{k}": v for k, v in settings.fill.items()},
                                         "start": result.equity["ts"][0], "end": result.equity["ts"][-1]})
        registry.log_metrics(mlflow_run, {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))})
        for row in backtest.folds.iter_rows(named=True):
            registry.log_metrics(mlflow_run, {"fold_return": row["return"], "fold_max_drawdown": row["max_drawdown"],
                                              "fold_trades": float(row["trades"])}, step=int(row["fold"]))
        registry.client.log_text(mlflow_run, tearsheet.read_text(), TEARSHEET_ARTIFACT)
        registry.log_dict(mlflow_run, backtest.folds.with_columns(pl.col("test_start", "test_end").dt.to_string())
                          .to_dicts(), "backtest/folds.json")
    except Exception:
        registry.finish_run(mlflow_run, failed=True)
        raise
    registry.finish_run(mlflow_run)
    return mlflow_run


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _text(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.6f}"
