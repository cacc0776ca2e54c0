"""Warehouse side of training: the rows a dataset is built from, and what a training writes
(out-of-sample predictions, folds, runs, metrics, promotion decisions).

Columns of the tables are documented in the README ("Training"); backtests read
`model_predictions` and refuse any bar outside the test range of its fold in `model_folds`.
"""

from __future__ import annotations

from datetime import date, datetime, time
from datetime import UTC as _UTC

import polars as pl

from models.features.registry import FEATURE_NAMES
from models.learning.datasets import KEY_COLUMNS, PREVIOUS_RETURN
from models.learning.datasets import target as learning_target
from resources.warehouse.client import TableWrite, Warehouse, WarehouseResource
from resources.warehouse.commits import PARTITIONED, visible
from resources.warehouse.market import seconds_to_datetime

PREDICTION_COLUMNS = [
    "model_name", "model_version", "run_id", "symbol", "timeframe", "ts", "close_ts", "fold", "target", "label",
    "prediction", "prob_up", "prob_down", "prob_flat", "feature_set",
]
FOLD_COLUMNS = [
    "model_name", "model_version", "run_id", "fold", "symbols", "timeframe", "target", "scheme", "train_start",
    "train_end", "train_label_end", "test_start", "test_end", "train_rows", "test_rows", "purged_rows",
    "embargoed_rows", "embargo_s", "horizon_s", "feature_set",
]


def _day_start(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=_UTC)


def read_training_rows(
    warehouse: Warehouse,
    symbols: list[str],
    timeframe: str,
    feature_set: str,
    target: str,
    start: date | None = None,
    end: date | None = None,
    features: list[str] | None = None,
) -> pl.DataFrame:
    """Warm `ml_features` rows of one feature set whose ``target`` is known, bars opening in
    ``[start, end)`` (either open), every symbol of ``symbols``, in no particular order: the
    committed rows (a re-materialized day counts once; see resources/warehouse/commits.py)."""
    target = learning_target(target).name  # a known label column, never free text in the SQL
    wanted = list(dict.fromkeys([*(features or FEATURE_NAMES), PREVIOUS_RETURN]))
    unknown = [name for name in wanted if name not in FEATURE_NAMES]
    if unknown:
        raise ValueError(f"not registered features: {', '.join(unknown[:10])}")
    where = [
        "feature_set = {feature_set:String}", "symbol IN {symbols:Array(String)}", "timeframe = {timeframe:String}",
        "warm = 1", f"{target} IS NOT NULL", visible("ml_features"),
    ]
    params: dict = {"feature_set": feature_set, "symbols": list(symbols), "timeframe": timeframe}
    if start is not None:
        where.append("ts >= {start:DateTime('UTC')}")
        params["start"] = _day_start(start)
    if end is not None:
        where.append("ts < {end:DateTime('UTC')}")
        params["end"] = _day_start(end)
    # Features travel as Float32, what the learners use: half the bytes. The dataset sorts the
    # rows itself (polars), cheaper than an ORDER BY in the embedded engine.
    features = ", ".join(f"CAST({name} AS Nullable(Float32)) AS {name}" for name in wanted)
    columns = ", ".join([*KEY_COLUMNS, "feature_set", "warm"])
    frame = warehouse.query_frame(
        f"SELECT {columns}, {features}, {target} FROM ml_features WHERE {' AND '.join(where)}", params,
    )
    return seconds_to_datetime(frame, "ts", "close_ts") if frame.height else frame


def feature_sets(warehouse: Warehouse, symbols: list[str], timeframe: str) -> pl.DataFrame:
    """Feature sets present for these symbols: rows, warm rows, last bar (newest first)."""
    return warehouse.query_frame(
        "SELECT feature_set, count() AS rows, sum(warm) AS warm_rows, max(ts) AS last_ts FROM ml_features "
        f"WHERE symbol IN {{symbols:Array(String)}} AND timeframe = {{timeframe:String}} AND {visible('ml_features')} "
        "GROUP BY feature_set ORDER BY last_ts DESC",
        {"symbols": list(symbols), "timeframe": timeframe},
    )


def write_training(
    warehouse: WarehouseResource,
    model_name: str,
    model_version: int,
    predictions: pl.DataFrame,
    folds: pl.DataFrame,
    run: pl.DataFrame,
    metrics: pl.DataFrame,
) -> None:
    """Everything one training writes, replaced for this model version and run in one commit
    (a rerun of the same version writes the same rows once; a crash leaves all or none)."""
    key = "model_name = {name:String} AND model_version = {version:UInt32}"
    params = {"name": model_name, "version": model_version}
    version_scope = [PARTITIONED["model_predictions"].scope(model_name, model_version)]
    run_id = run["run_id"][0]
    by_run = "run_id = {run:String}"
    warehouse.replace(
        TableWrite("model_predictions", key, params, predictions.select(PREDICTION_COLUMNS), version_scope),
        TableWrite("model_folds", key, params, folds.select(FOLD_COLUMNS), version_scope),
        TableWrite("training_metrics", by_run, {"run": run_id}, metrics, [run_id]),
        TableWrite("training_runs", by_run, {"run": run_id}, run, [run_id]),
    )


def write_run(warehouse: Warehouse, run: pl.DataFrame) -> None:
    """A training run's row alone (a failed training, which has nothing else to write)."""
    run_id = run["run_id"][0]
    warehouse.replace(TableWrite("training_runs", "run_id = {run:String}", {"run": run_id}, run, [run_id]))


PROMOTION_SCHEMA = {
    "model_name": pl.String, "model_version": pl.UInt32, "run_id": pl.String, "decision": pl.String, "reason": pl.String,
    "metric": pl.String, "challenger_value": pl.Float64, "champion_value": pl.Float64, "champion_version": pl.UInt32,
    "margin": pl.Float64,
}


def write_promotion(warehouse: Warehouse, row: dict) -> None:
    """One decision of the gate (approved, refused) or of the promotion (promoted)."""
    warehouse.insert_frame("model_promotions", pl.DataFrame([row], schema=PROMOTION_SCHEMA))


def read_predictions(warehouse: Warehouse, model_name: str, model_version: int) -> pl.DataFrame:
    frame = warehouse.query_frame(
        f"SELECT {', '.join(PREDICTION_COLUMNS)} FROM model_predictions WHERE model_name = {{name:String}} "
        f"AND model_version = {{version:UInt32}} AND {visible('model_predictions')} ORDER BY close_ts, symbol",
        {"name": model_name, "version": model_version},
    )
    return seconds_to_datetime(frame, "ts", "close_ts") if frame.height else frame


def read_folds(warehouse: Warehouse, model_name: str, model_version: int) -> pl.DataFrame:
    frame = warehouse.query_frame(
        f"SELECT {', '.join(FOLD_COLUMNS)} FROM model_folds WHERE model_name = {{name:String}} "
        f"AND model_version = {{version:UInt32}} AND {visible('model_folds')} ORDER BY fold",
        {"name": model_name, "version": model_version},
    )
    if not frame.height:
        return frame
    return seconds_to_datetime(frame, "train_start", "train_end", "train_label_end").with_columns(
        pl.from_epoch(pl.col(c).cast(pl.Int64), time_unit="s").dt.replace_time_zone("UTC") for c in ("test_start", "test_end")
    )


def read_promotions(warehouse: Warehouse, model_name: str) -> pl.DataFrame:
    return warehouse.query_frame(
        "SELECT model_name, model_version, run_id, decision, reason, metric, challenger_value, champion_value, "
        "champion_version, margin FROM model_promotions WHERE model_name = {name:String} ORDER BY decided_at, decision",
        {"name": model_name},
    )


def read_training_runs(warehouse: Warehouse, spec: str | None = None) -> pl.DataFrame:
    where = f"WHERE {visible('training_runs')}" + (" AND spec = {spec:String}" if spec else "")
    return warehouse.query_frame(
        f"SELECT * EXCEPT (params, _scope, _batch) FROM training_runs {where} ORDER BY started_at", {"spec": spec} if spec else {}
    )
