"""Model backtests on the real engines: a tiny LightGBM trained by the training code on planted
features (embedded ClickHouse, MLflow's SQLite store, a real nats-server, Dagster runs), bars
whose moves follow the planted labels, then the walk-forward backtest of its out-of-sample
predictions: the gate with a backtest requirement passing and refusing, the `model_backtest`
asset (tables, MLflow, bus, sensor), the refusal of in-sample predictions, and
`tradeforge backtest --model`."""

from __future__ import annotations

import asyncio
import json
import os
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from dagster import DagsterInstance, build_sensor_context, materialize

from assets.model_backtest_run import execute_model_backtest, parse_model_ref
from assets.model_backtests import MODEL_VERSIONS, model_backtest
from assets.training import MODEL_SPECS, champion_model, trained_model
from models.backtest.model import InSamplePredictions, check_out_of_sample
from models.learning.gate import backtest_requirement
from models.learning.synthetic import SIGNAL_FEATURES, planted_features
from models.market.candles import BAR_SCHEMA
from orchestration.cli import main
from resources.bus import NatsBus
from resources.bus.resource import BusResource
from resources.registry import CHALLENGER, CHAMPION
from resources.registry.resource import RegistryResource
from resources.registry.tracking import VersionInfo
from resources.training import TrainingResource
from resources.warehouse import WarehouseResource
from resources.warehouse.backtests import read_equity, read_runs, read_trades
from resources.warehouse.client import TableWrite
from resources.warehouse.commits import PARTITIONED
from resources.warehouse.features import FEATURE_COLUMNS, store_feature_rows
from resources.warehouse.learning import PREDICTION_COLUMNS, read_folds, read_predictions, read_promotions
from resources.warehouse.market import write_bars
from sensors.backtests import backtest_new_challengers
from tests.natsserver import fresh_mlflow_store, nats_server  # noqa: F401  (fixture)

os.environ.setdefault("OMP_NUM_THREADS", "1")
SYMBOLS = ["BTCUSD", "EURUSD"]
FEATURES = [*SIGNAL_FEATURES, "ret_1", "adx_14"]
PRICES = {"EURUSD": 1.09, "BTCUSD": 42_000.0}
HALF_SPREAD = {"EURUSD": 0.00001, "BTCUSD": 2.0}
CHEAP = {"risk": {"sizing": "equity_fraction", "equity_fraction": 0.5, "stop_atr": None}, "fill": {"commission_rate": 0.0}}
COSTLY = {**CHEAP, "fill": {"commission_rate": 0.002}}  # 0.2% a side: more than the edge of a bar or two
GOOD, COSTLY_MODEL = "direction_1h.M5.cheap", "direction_1h.M5.costly"


def bars_following(planted: pl.DataFrame) -> pl.DataFrame:
    """M5 bars whose every move is the planted 1h return of the bar before (scaled), so a model
    that reads the planted signal makes money on the next bar, and one that does not, does not."""
    frames = []
    for symbol, part in planted.sort("symbol", "ts").partition_by("symbol", as_dict=True).items():
        symbol = symbol[0]
        ret = part["fwd_ret_1h"].fill_null(0.0).to_numpy() * 0.5
        moves = np.r_[0.0, ret[:-1]]
        close = PRICES[symbol] * np.cumprod(1.0 + moves)
        open_ = np.r_[PRICES[symbol], close[:-1]]
        wick = np.abs(moves) * 0.3 + 1e-5
        half = HALF_SPREAD[symbol]
        frames.append(pl.DataFrame({
            "symbol": symbol, "timeframe": "M5", "ts": part["ts"].cast(pl.Datetime("ms", "UTC")), "open": open_,
            "high": np.maximum(open_, close) * (1 + wick), "low": np.minimum(open_, close) * (1 - wick), "close": close,
            "bid_close": close - half, "ask_close": close + half, "volume": 0.0, "tick_count": 50, "quote_count": 50,
            "spread_mean": 2 * half, "spread_max": 4 * half, "vwap": close, "source": "test",
        }).cast(BAR_SCHEMA))  # type: ignore[arg-type]
    return pl.concat(frames)


def spec(name: str, universe: str, backtest: dict, min_sharpe: float = 1.0) -> dict:
    return {"name": name, "family": "lightgbm", "target": "direction_1h", "symbols": SYMBOLS, "universe": universe,
            "feature_set": "planted", "features": FEATURES, "folds": {"n_folds": 3, "embargo": "1h"},
            "params": {"n_estimators": 30, "num_leaves": 8}, "threads": 1, "seed": 5, "backtest": backtest,
            "gate": {"backtest": {"min_sharpe": min_sharpe, "min_return": 0.0}}}


@pytest.fixture(scope="module")
def world(tmp_path_factory, warehouse_dir, nats_server):  # noqa: F811
    """Features and bars in a warehouse of its own, two specs trained (one passes its gate,
    one is refused for its costs), MLflow and the bus: shared by the tests of this module."""
    tmp = tmp_path_factory.mktemp("model_backtest")
    home = tmp / "home"
    previous = os.environ.get("TRADEFORGE_HOME")
    os.environ["TRADEFORGE_HOME"] = str(home)  # tearsheets under it (restored at the end)
    warehouse = WarehouseResource(embedded_path=str(warehouse_dir), database=f"t_{uuid.uuid4().hex[:12]}", lock_timeout_s=60)
    planted = planted_features(SYMBOLS, date(2024, 3, 6), 6, feature_set="planted", seed=4).select(FEATURE_COLUMNS)
    store_feature_rows(warehouse, planted)
    bars = bars_following(planted)
    for symbol in SYMBOLS:
        part = bars.filter(pl.col("symbol") == symbol)
        days = sorted(set(part["ts"].dt.date().to_list()))
        write_bars(warehouse, symbol, days, part.with_columns((pl.col("ts").dt.truncate("1d") + timedelta(days=1)).alias("covered_until")))
    mlflow_dir = tmp / "mlflow"
    fresh_mlflow_store(mlflow_dir)
    specs_path = tmp / "specs.yaml"
    specs_path.write_text(yaml.safe_dump({"specs": [spec("cheap", "cheap", CHEAP), spec("costly", "costly", COSTLY)]}))
    registry = RegistryResource(tracking_uri=f"sqlite:///{mlflow_dir / 'mlflow.db'}", artifact_root=str(mlflow_dir / "artifacts"))
    resources = {"warehouse": warehouse, "registry": registry, "bus": BusResource(url=nats_server.url, connect_timeout_s=0.5),
                 "training": TrainingResource(specs_path=str(specs_path), optuna_storage=f"sqlite:///{tmp / 'optuna.db'}")}
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(MODEL_SPECS.name, ["cheap", "costly"])
    trained = {}
    for name in ("cheap", "costly"):
        result = materialize([trained_model, champion_model], partition_key=name, instance=instance, resources=resources,
                             raise_on_error=False)
        trained[name] = ({e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()},
                         {e.check_name: e for e in result.get_asset_check_evaluations()})
    yield {"warehouse": warehouse, "resources": resources, "instance": instance, "registry": registry.get_client(),
           "trained": trained, "bars": bars, "nats": nats_server, "mlflow_uri": f"sqlite:///{mlflow_dir / 'mlflow.db'}",
           "specs_path": specs_path, "home": home}
    if previous is None:
        os.environ.pop("TRADEFORGE_HOME", None)
    else:
        os.environ["TRADEFORGE_HOME"] = previous


def bus_messages(url: str) -> list[tuple[str, dict]]:
    async def fetch():
        bus = NatsBus(url)
        await bus.connect()
        consumer = await bus.js.pull_subscribe("backtest.>", stream="BACKTESTS")
        messages = await consumer.fetch(500, timeout=2)
        await bus.close()
        return [(m.subject, json.loads(m.data)) for m in messages]

    return asyncio.run(fetch())


def test_gate_with_a_backtest_requirement_passes_and_refuses_after_costs(world):
    registry, warehouse = world["registry"], world["warehouse"]
    meta, checks = world["trained"]["cheap"]
    gate = checks["promotion_gate"]
    assert gate.passed, gate.description
    assert "out-of-sample backtest after costs meets Sharpe >= 1, return >= 0.00%" in gate.description
    cheap = gate.metadata["backtest"].value
    assert cheap["sharpe"] > 1.0 and cheap["total_return"] > 0 and cheap["trades"] >= 20
    assert registry.alias(GOOD, CHAMPION).version == "1"
    assert "out-of-sample backtest after costs meets" in registry.version(GOOD, "1").tags["gate.reason"]

    # The same model (same data, seed, folds) with costs that eat its edge: refused, the reason recorded.
    meta, checks = world["trained"]["costly"]
    gate = checks["promotion_gate"]
    assert not gate.passed
    assert "out-of-sample backtest after costs fails: " in gate.description and "below the minimum" in gate.description
    costly = gate.metadata["backtest"].value
    assert costly["trades"] == cheap["trades"]  # the same trades (sizing does not depend on costs here)...
    assert costly["total_return"] < 0 < cheap["total_return"] and costly["costs_pct"] > cheap["costs_pct"]  # ...after costs
    assert "champion_model" not in meta and registry.alias(COSTLY_MODEL, CHAMPION) is None
    assert registry.alias(COSTLY_MODEL, CHALLENGER).version == "1"
    refused = read_promotions(warehouse, COSTLY_MODEL)
    assert refused["decision"].to_list() == ["refused"] and "backtest after costs fails" in refused["reason"][0]
    run = registry.client.get_run(meta["trained_model"]["run_id"].value)
    assert run.data.metrics["gate_backtest_total_return"] == pytest.approx(costly["total_return"])

    # The rule itself, both ways and at its edges.
    assert backtest_requirement({"sharpe": 1.5, "total_return": 0.01, "trades": 3}, min_sharpe=1.5)[0]
    assert not backtest_requirement({"sharpe": 1.49, "total_return": 0.01, "trades": 3}, min_sharpe=1.5)[0]
    assert not backtest_requirement({"sharpe": float("nan"), "total_return": 0.0, "trades": 3}, min_sharpe=0.0)[0]
    ok, reason = backtest_requirement({"sharpe": 3.0, "total_return": 0.2, "trades": 0}, min_return=0.0, min_trades=1)
    assert not ok and "0 closed trades, fewer than 1" in reason


def test_model_backtest_asset_on_out_of_sample_folds(world):
    warehouse, registry, instance = world["warehouse"], world["registry"], world["instance"]
    resources = world["resources"]
    # The registry sensor: both challengers are new partitions and runs.
    tick = backtest_new_challengers(build_sensor_context(instance=instance, resources=resources))
    keys = sorted(r.partition_key for r in tick.run_requests)
    assert keys == [f"{GOOD}@1", f"{COSTLY_MODEL}@1"]
    assert sorted(tick.dynamic_partitions_requests[0].partition_keys) == keys
    instance.add_dynamic_partitions(MODEL_VERSIONS.name, keys)

    result = materialize([model_backtest], partition_key=f"{GOOD}@1", instance=instance, resources=resources, raise_on_error=False)
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    assert {c.check_name: c.passed for c in result.get_asset_check_evaluations()} == {
        "fills_after_decisions": True, "balance_reconciles": True}
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    gate = world["trained"]["cheap"][1]["promotion_gate"].metadata["backtest"].value
    # The asset, from the stored predictions, gets the gate's numbers to the bit: one code path.
    assert meta["sharpe"].value == gate["sharpe"] and meta["total_return"].value == gate["total_return"]
    assert meta["trades"].value == gate["trades"]

    # Only out-of-sample bars: the results start at the first tested bar, after the first fold's training block.
    predictions, folds = read_predictions(warehouse, GOOD, 1), read_folds(warehouse, GOOD, 1)
    run_id = meta["run_id"].value
    runs = read_runs(warehouse)
    row = runs.filter(pl.col("run_id") == run_id).row(0, named=True)
    assert (row["model_name"], row["model_version"], row["source"]) == (GOOD, 1, "dagster")
    assert row["start"] == predictions["ts"].min().timestamp() and row["trades"] == meta["trades"].value  # epoch seconds
    equity, trades = read_equity(warehouse, run_id), read_trades(warehouse, run_id)
    assert equity["ts"].min() == predictions["ts"].min() and equity.height == meta["dagster/row_count"].value
    first_test = folds.filter(pl.col("fold") >= 0)["test_start"].min()
    # the first fill is at the open after the first out-of-sample decision, never before the first tested bar's close
    assert trades["entry_ts"].min() >= predictions["close_ts"].min() >= first_test
    assert equity["equity"][-1] == pytest.approx(row["final_equity"])
    assert "| 0 |" in meta["folds"].value and "| 2 |" in meta["folds"].value
    assert len(meta["equity_curve"].value["equity"]) > 50

    # MLflow: a run of its own, nested under the training run, with the tearsheet; the version tagged.
    version = registry.version(GOOD, "1")
    mlflow_run = registry.client.get_run(row["mlflow_run_id"])
    assert mlflow_run.data.tags["mlflow.parentRunId"] == version.run_id
    assert mlflow_run.data.metrics["sharpe"] == pytest.approx(gate["sharpe"])
    assert {a.path for a in registry.client.list_artifacts(row["mlflow_run_id"], "backtest")} == {
        "backtest/tearsheet.html", "backtest/folds.json"}
    assert version.tags["backtest.run_id"] == run_id and float(version.tags["backtest.sharpe"]) == pytest.approx(gate["sharpe"], abs=1e-6)
    page = Path(meta["tearsheet"].value).read_text()
    assert "Out-of-sample folds" in page and GOOD in page

    # The bus: started, progress, completed on backtest.*.{run_id}.
    subjects = [s for s, _ in bus_messages(world["nats"].url)]
    assert subjects[0] == f"backtest.started.{run_id}" and subjects[-1] == f"backtest.completed.{run_id}"
    assert f"backtest.progress.{run_id}" in subjects

    # The next tick: the backtested version is left alone, the other one still asked for.
    again = backtest_new_challengers(build_sensor_context(instance=instance, resources=resources))
    assert [r.partition_key for r in again.run_requests] == [f"{COSTLY_MODEL}@1"]


def test_in_sample_predictions_refuse_the_backtest(world):
    warehouse, registry = world["warehouse"], world["registry"]
    predictions, folds = read_predictions(warehouse, GOOD, 1), read_folds(warehouse, GOOD, 1)
    assert check_out_of_sample(predictions, folds, "m") == dict(predictions.group_by(pl.col("fold").cast(pl.Int64)).len().rows())
    test_start = folds.filter(pl.col("fold") == 0)["test_start"][0]
    row = predictions.row(0, named=True)
    early = {**row, "ts": test_start - timedelta(hours=2), "close_ts": test_start - timedelta(hours=2) + timedelta(minutes=5)}
    for tampered, message in (
        (pl.concat([predictions, pl.DataFrame([early], schema=predictions.schema)]),
         "fold 0 tests bars closing in ["),
        (predictions.with_columns(pl.when(pl.int_range(pl.len()) == 5).then(-1).otherwise(pl.col("fold").cast(pl.Int64)).alias("fold")),
         "fold -1 is the registered model refitted on every row: in-sample everywhere"),
        (predictions.with_columns(pl.when(pl.int_range(pl.len()) == 5).then(9).otherwise(pl.col("fold")).alias("fold")),
         "model_folds has no test range for fold 9"),
    ):
        with pytest.raises(InSamplePredictions, match="lie outside their fold's test range") as caught:
            check_out_of_sample(tampered, folds, "m")
        assert message in str(caught.value) and "1 of " in str(caught.value)

    # Through the warehouse: a version whose stored predictions include a training bar is refused whole.
    stored = pl.concat([predictions, pl.DataFrame([early], schema=predictions.schema)]).with_columns(
        pl.lit("tampered").alias("model_name"))
    key = "model_name = {name:String} AND model_version = {version:UInt32}"
    scope = [PARTITIONED["model_predictions"].scope("tampered", 1)]
    warehouse.replace(
        TableWrite("model_predictions", key, {"name": "tampered", "version": 1}, stored.select(PREDICTION_COLUMNS), scope),
        TableWrite("model_folds", key, {"name": "tampered", "version": 1},
                   folds.with_columns(pl.lit("tampered").alias("model_name")).select(folds.columns), scope),
    )
    version = VersionInfo("tampered", "1", registry.version(GOOD, "1").run_id, {"spec": "cheap"})
    events = world["resources"]["bus"].backtest_events()
    with pytest.raises(InSamplePredictions, match=r"tampered v1: 1 of [\d,]+ predictions lie outside their fold's test range"):
        execute_model_backtest(warehouse, registry, events, version, world["resources"]["training"].specs())
    events.close()
    assert events.published == 0  # refused before anything started
    assert read_runs(warehouse).filter(pl.col("model_name") == "tampered").is_empty()


def test_the_command_backtests_a_registered_model(world, monkeypatch, capsys):
    warehouse = world["warehouse"]
    monkeypatch.setenv("TRADEFORGE_WAREHOUSE_PATH", warehouse.embedded_path)
    monkeypatch.setenv("CLICKHOUSE_DATABASE", warehouse.database)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", world["mlflow_uri"])
    monkeypatch.setenv("NATS_URL", world["nats"].url)
    monkeypatch.setenv("TRADEFORGE_MODEL_SPECS", str(world["specs_path"]))
    assert parse_model_ref("direction_1h.M5.demo@v3") == ("direction_1h.M5.demo", "v3")
    code = main(["backtest", "--model", f"{GOOD}@champion", "--symbols", "eurusd", "--start", "2024-03-08", "--end", "2024-03-13"])
    out = capsys.readouterr()
    assert code == 0, out.err
    for line in (f"tradeforge backtest {GOOD}@champion -> v1", "EURUSD", "engine: ", "100%", "Sharpe", "max drawdown",
                 "out-of-sample folds:", "tearsheet:", "MLflow run:"):
        assert line in out.out, line
    runs = read_runs(warehouse).filter(pl.col("source") == "cli")
    assert runs.height == 1 and runs["symbols"][0].to_list() == ["EURUSD"] and runs["model_version"][0] == 1
    assert runs["start"][0] >= datetime(2024, 3, 8, tzinfo=UTC).timestamp()

    for argv, message in (
        (["backtest", "--model", GOOD], "is not NAME@alias or NAME@VERSION"),
        (["backtest", "--model", "direction_1h.M5.nothere@champion"], "no registered model direction_1h.M5.nothere"),
        (["backtest", "--model", f"{GOOD}@nosuch"], f"registered model {GOOD} has no version with alias 'nosuch'"),
        (["backtest", "--model", f"{GOOD}@7"], f"registered model {GOOD} has no version 7"),
        (["backtest", "--model", f"{GOOD}@champion", "--symbols", "XAUUSD"], "has no predictions for XAUUSD; it predicts BTCUSD, EURUSD"),
        (["backtest", "--model", f"{GOOD}@champion", "--start", "2025-01-01", "--end", "2025-01-02"],
         "has no out-of-sample predictions between 2025-01-01"),
        (["backtest", "--model", f"{GOOD}@champion", "--strategy", "sma_cross"], "either --strategy or --model, not both"),
        (["backtest", "--symbols", "EURUSD"], "name what to backtest: --strategy NAME or --model NAME@alias"),
        (["backtest", "--model", f"{GOOD}@champion", "--param", "fast=3"], "--param and --timeframe apply to --strategy"),
    ):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
