"""`model_backtest`: a registered model version backtested walk-forward over its out-of-sample
folds (assets/model_backtest_run.py), one partition per version (``NAME@VERSION``).

The registry sensor (sensors/backtests.py) adds the partition and starts the run when a new
challenger is registered, whatever its gate said: a refused model's backtest is evidence too.
Metadata: the headline numbers after costs, each fold's return, the equity curve, links to the
tearsheet (on disk and in MLflow) and to the backtest's MLflow run.
"""


import logging
import math

import polars as pl
from dagster import (
    AllPartitionMapping,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    DynamicPartitionsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)

from assets.backtests import _checks
from assets.model_backtest_run import TEARSHEET_ARTIFACT, ModelBacktestRun, execute_model_backtest, resolve_model
from resources.bus.resource import BusResource
from resources.registry.resource import RegistryResource
from resources.training import TrainingResource
from resources.warehouse import WarehouseResource

MODEL_VERSIONS = DynamicPartitionsDefinition(name="model_versions")
log = logging.getLogger("tradeforge.backtest")


def version_key(model_name: str, version: str | int) -> str:
    return f"{model_name}@{version}"


def split_key(key: str) -> tuple[str, str]:
    name, sep, version = key.rpartition("@")
    if not sep or not version.isdigit():
        raise ValueError(f"partition {key!r} is not NAME@VERSION")
    return name, version


def _say(context: AssetExecutionContext):
    def say(message: str) -> None:
        context.log.info(message)
        log.info(message)  # the command line shows progress from here

    return say


def _numbers(m: dict) -> dict:
    keys = ("total_return", "annual_return", "sharpe", "sortino", "calmar", "max_drawdown", "win_rate", "profit_factor",
            "exposure", "costs_pct", "final_equity", "buy_hold_return")
    return {k: MetadataValue.float(float(m[k])) for k in keys if k in m and not math.isnan(float(m[k]))}


def metadata(run: ModelBacktestRun) -> dict:
    result = run.backtest.result
    eq = result.equity
    step = max(1, eq.height // 200)
    curve = eq.gather_every(step).select(pl.col("ts").dt.strftime("%Y-%m-%dT%H:%M"), pl.col("equity").round(2))
    folds = run.backtest.folds
    table = "| fold | tests | bars | return | max drawdown | trades |\n|---|---|---|---|---|---|\n" + "".join(
        f"| {r['fold']} | {r['test_start']:%Y-%m-%d %H:%M} .. {r['test_end']:%Y-%m-%d %H:%M} | {r['bars']} | {r['return']:.2%} "
        f"| {r['max_drawdown']:.2%} | {r['trades']} |\n" for r in folds.iter_rows(named=True))
    return {
        "run_id": run.run_id, "model": f"{run.model_name} v{run.version}", "model_version": run.version,
        "dagster/row_count": eq.height, "trades": int(result.metrics["trades"]), "predictions": run.backtest.predictions,
        **_numbers(result.metrics),
        "folds": MetadataValue.md(table),
        "equity_curve": MetadataValue.json({"ts": curve["ts"].to_list(), "equity": curve["equity"].to_list()}),
        "tearsheet": MetadataValue.path(str(run.tearsheet)),
        "tearsheet_url": MetadataValue.url(run.tearsheet.as_uri()),
        "mlflow_run": MetadataValue.url(run.mlflow_url),
        "mlflow_tearsheet": f"{TEARSHEET_ARTIFACT} in MLflow run {run.mlflow_run_id}",
        "seconds": round(run.seconds, 2),
    }


@asset(
    partitions_def=MODEL_VERSIONS,
    group_name="backtests",
    kinds={"clickhouse", "mlflow", "plotly"},
    deps=[AssetDep("trained_model", partition_mapping=AllPartitionMapping()),
          AssetDep("aggregates", partition_mapping=AllPartitionMapping())],
    check_specs=[
        AssetCheckSpec("fills_after_decisions", asset="model_backtest", description="every fill comes after the bar that decided it"),
        AssetCheckSpec("balance_reconciles", asset="model_backtest", description="cash equals the start plus every trade's net PnL"),
    ],
    description="A registered model version backtested walk-forward on its out-of-sample predictions only (after costs).",
)
def model_backtest(context: AssetExecutionContext, warehouse: WarehouseResource, registry: RegistryResource,
                   bus: BusResource, training: TrainingResource) -> MaterializeResult:
    name, number = split_key(context.partition_key)
    client = registry.get_client()
    events = bus.backtest_events(log)
    try:
        version = resolve_model(client, f"{name}@{number}")
        try:
            specs = training.specs()
        except ValueError as exc:  # a broken specs file: the model's settings are unknown, not the backtest
            context.log.warning(f"{exc}: default backtest settings")
            specs = {}
        run = execute_model_backtest(warehouse, client, events, version, specs, source="dagster", say=_say(context))
    except ValueError as exc:  # in-sample predictions, missing bars: retrying reads the same
        raise Failure(description=str(exc), allow_retries=False) from exc
    finally:
        events.close()
    return MaterializeResult(metadata={**metadata(run), "bus_events": events.published},
                             check_results=_checks(run.backtest.result))
