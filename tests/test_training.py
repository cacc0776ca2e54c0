"""Training end to end on the real engines: Dagster runs of `trained_model` and
`champion_model`, MLflow's SQLite store and registry, the embedded ClickHouse, a real
nats-server. The rows are `ml_features`-shaped with a planted signal (models/learning/
synthetic.py), written to the warehouse's real table."""

from __future__ import annotations

import asyncio
import json
import os
from datetime import UTC, date, datetime
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from dagster import DagsterInstance, build_schedule_context, build_sensor_context, instance_for_test, materialize
from dagster import AssetMaterialization

from assets.training import MODEL_SPECS, champion_model, trained_model
from models.learning.synthetic import SIGNAL_FEATURES, planted_features
from resources.warehouse.features import store_feature_rows
from resources.bus import NatsBus
from resources.bus.resource import BusResource
from resources.registry import CHALLENGER, CHAMPION
from resources.registry.resource import RegistryResource
from resources.training import TrainingResource
from resources.warehouse.features import FEATURE_COLUMNS
from resources.warehouse.learning import read_folds, read_predictions, read_promotions, read_training_runs
from sensors.training import retrain_on_new_features, sync_model_specs, weekly_retrain
from tests.natsserver import dead_url, fresh_mlflow_store, nats_server  # noqa: F401  (fixture)

os.environ.setdefault("OMP_NUM_THREADS", "1")
SYMBOLS = ["EURUSD", "BTCUSD"]
FEATURES = [*SIGNAL_FEATURES, "ret_1", "adx_14", "cci_20"]
FEATURE_SET = "planted"


@pytest.fixture(scope="module")
def mlflow_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("mlflow")
    fresh_mlflow_store(directory)
    return directory


@pytest.fixture(scope="module")
def planted() -> pl.DataFrame:
    """Wednesday to Monday: EURUSD closes for the weekend, BTCUSD trades through it."""
    return planted_features(SYMBOLS, date(2024, 3, 6), 6, feature_set=FEATURE_SET, seed=4).select(FEATURE_COLUMNS)


@pytest.fixture
def loaded(warehouse, planted):
    store_feature_rows(warehouse, planted)
    return warehouse


def spec(name: str, universe: str, **overrides) -> dict:
    base = {"name": name, "family": "lightgbm", "target": "direction_1h", "symbols": SYMBOLS, "universe": universe,
            "feature_set": FEATURE_SET, "features": FEATURES, "folds": {"n_folds": 3, "embargo": "1h"},
            "params": {"n_estimators": 40, "num_leaves": 8}, "threads": 1, "seed": 5}
    return base | overrides


def setup(tmp_path: Path, warehouse, mlflow_dir: Path, specs: list[dict], bus_url: str):
    path = tmp_path / "specs.yaml"
    path.write_text(yaml.safe_dump({"specs": specs}))
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(MODEL_SPECS.name, [s["name"] for s in specs])
    registry = RegistryResource(tracking_uri=f"sqlite:///{mlflow_dir / 'mlflow.db'}", artifact_root=str(mlflow_dir / "artifacts"))
    resources = {"warehouse": warehouse, "registry": registry, "bus": BusResource(url=bus_url, connect_timeout_s=0.5),
                 "training": TrainingResource(specs_path=str(path), optuna_storage=f"sqlite:///{tmp_path / 'optuna.db'}")}
    return instance, resources, registry.get_client()


def train(instance, resources, name: str):
    result = materialize([trained_model, champion_model], partition_key=name, instance=instance, resources=resources,
                         raise_on_error=False)
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    return result, meta, checks


def training_messages(url: str) -> list[dict]:
    async def fetch():
        bus = NatsBus(url)
        await bus.connect()
        consumer = await bus.js.pull_subscribe("training.>", stream="TRAINING")
        messages = await consumer.fetch(500, timeout=2)
        await bus.close()
        return [(m.subject, json.loads(m.data)) for m in messages]

    return asyncio.run(fetch())


def test_training_tracks_registers_and_stores_out_of_sample_predictions_only(tmp_path, loaded, mlflow_dir, nats_server, planted):
    instance, resources, registry = setup(tmp_path, loaded, mlflow_dir, [spec("good", "oos")], nats_server.url)
    result, meta, checks = train(instance, resources, "good")
    assert result.success, [e.message for e in result.all_events if e.is_failure]
    assert {name: c.passed for name, c in checks.items()} == {"purge_verified": True, "label_balance": True, "promotion_gate": True}
    model = meta["trained_model"]
    name = "direction_1h.M5.oos"
    assert model["registered_model"].value == f"{name} v1" and model["gate"].value == "approved"
    assert model["log_loss"].value < model["baseline_log_loss"].value  # the planted signal beats LightGBM's defaults
    assert registry.alias(name, CHAMPION).version == registry.alias(name, CHALLENGER).version == "1"

    # model_predictions: out-of-sample rows only, each inside its fold's test range and after its training labels.
    predictions = read_predictions(loaded, name, 1)
    folds = read_folds(loaded, name, 1)
    assert folds["fold"].to_list() == [-1, 0, 1, 2]  # -1: the registered model, fitted on every row
    tested = folds.filter(pl.col("fold") >= 0)
    assert predictions.height == tested["test_rows"].sum() == model["dagster/row_count"].value
    joined = predictions.join(tested.select(pl.col("fold").cast(pl.UInt16), "test_start", "test_end", "train_end", "train_label_end"), on="fold")
    assert joined.height == predictions.height
    assert joined.filter((pl.col("close_ts") < pl.col("test_start")) | (pl.col("close_ts") >= pl.col("test_end"))).is_empty()
    assert joined.filter(pl.col("close_ts") <= pl.col("train_label_end")).is_empty()
    assert predictions.select(pl.struct("symbol", "ts").is_unique().all()).item()
    first_test = tested["test_start"].min()
    assert predictions["close_ts"].min() >= first_test  # nothing from the first block, which only trains
    truth = planted.select("symbol", "ts", pl.col("direction_1h").cast(pl.Float64).alias("truth"))
    labels = predictions.join(truth.with_columns(pl.col("ts").cast(predictions["ts"].dtype)), on=["symbol", "ts"])
    assert labels.height == predictions.height and (labels["label"] == labels["truth"]).all()
    assert ((predictions["prob_up"] + predictions["prob_down"] - 1).abs() < 1e-9).all()
    assert np.array_equal(predictions["prediction"].to_numpy(), np.where(predictions["prob_up"].to_numpy() >= 0.5, 1.0, -1.0))

    runs = read_training_runs(loaded, "good")
    assert runs["status"].to_list() == ["completed"] and runs["model_version"][0] == 1
    assert runs["fingerprint"][0] == model["fingerprint"].value and runs["rows"][0] == model["rows"].value
    metrics = loaded.query_frame("SELECT candidate, count() AS n FROM training_metrics GROUP BY candidate ORDER BY candidate")
    assert metrics["candidate"].to_list() == ["lightgbm_default", "majority", "model", "previous_direction"]
    promotions = read_promotions(loaded, name)
    assert promotions["decision"].to_list() == ["approved", "promoted"]

    # MLflow: the run, its artifacts, the model with a signature and explicit requirements.
    run = registry.client.get_run(model["run_id"].value)
    assert run.info.status == "FINISHED"
    assert run.data.params["feature_set"] == FEATURE_SET and run.data.params["model.n_estimators"] == "40"
    assert run.data.tags["tradeforge.fingerprint"] == model["fingerprint"].value
    assert run.data.tags["tradeforge.code_version"]
    assert {"log_loss", "auc", "majority.log_loss", "lightgbm_default.log_loss", "oos_log_loss"} <= set(run.data.metrics)
    assert len(registry.client.get_metric_history(run.info.run_id, "fold_log_loss")) == 3
    artifacts = {a.path for a in registry.client.list_artifacts(run.info.run_id, "plots")}
    assert artifacts == {f"plots/{p}" for p in ("feature_importance.png", "roc.png", "calibration.png", "metrics_per_fold.png")}
    local = Path(registry.client.download_artifacts(run.info.run_id, "model", str(tmp_path)))
    requirements = (local / "requirements.txt").read_text()
    assert "lightgbm==4.7.0" in requirements and "xgboost" not in requirements
    assert "signature" in (local / "MLmodel").read_text()
    native, version = registry.load_model(name, CHAMPION)
    rows = planted.filter(pl.col("warm") == 1).head(5).select(FEATURES).to_pandas()
    assert native.predict_proba(rows).shape == (5, 2) and version.tags["family"] == "lightgbm"

    # The bus heard the training from start to end.
    messages = [(s, m) for s, m in training_messages(nats_server.url) if m["run_id"] == run.info.run_id]
    kinds = [s.split(".")[1] for s, _ in messages]
    assert kinds[0] == "started" and kinds[-1] == "completed" and kinds.count("progress") >= 5
    assert messages[-1][1]["model_version"] == "1" and messages[-1][1]["gate"] == "approved"


def test_the_gate_promotes_a_better_model_refuses_a_worse_one_and_reproduces_exactly(tmp_path, loaded, mlflow_dir, nats_server):
    weak = spec("weak", "gate", features=["rsi_14", "adx_14"])
    strong = spec("strong", "gate", family="xgboost", params={"n_estimators": 40, "max_depth": 3, "learning_rate": 0.2})
    instance, resources, registry = setup(tmp_path, loaded, mlflow_dir, [weak, strong], nats_server.url)
    name = "direction_1h.M5.gate"

    first, meta1, _ = train(instance, resources, "weak")
    assert first.success and registry.alias(name, CHAMPION).version == "1"
    second, meta2, checks2 = train(instance, resources, "strong")
    assert second.success and checks2["promotion_gate"].passed
    assert "beats champion v1" in checks2["promotion_gate"].description
    assert registry.alias(name, CHAMPION).version == "2"
    # v1 refitted on strong's folds scores what v1 scored: the same rows, folds and seed.
    assert checks2["promotion_gate"].metadata["champion"].value == pytest.approx(meta1["trained_model"]["log_loss"].value, abs=1e-12)

    third, meta3, checks3 = train(instance, resources, "weak")
    assert not third.success  # the blocking gate stops the run before champion_model
    assert "champion_model" not in meta3 and not checks3["promotion_gate"].passed
    reason = checks3["promotion_gate"].description
    assert reason.startswith("does not beat champion v2 by the margin 0.001")
    assert registry.alias(name, CHAMPION).version == "2" and registry.alias(name, CHALLENGER).version == "3"
    assert registry.version(name, "3").tags["gate.decision"] == "refused"
    assert registry.version(name, "3").tags["gate.reason"] == reason
    assert registry.client.get_run(meta3["trained_model"]["run_id"].value).data.tags["tradeforge.gate_reason"] == reason
    promotions = read_promotions(loaded, name)
    assert promotions.select("model_version", "decision").rows() == [(1, "approved"), (1, "promoted"), (2, "approved"),
                                                                      (2, "promoted"), (3, "refused")]
    assert promotions["reason"][-1] == reason

    # Same data, spec and seed: the same metrics and the same predictions, bit for bit.
    assert meta3["trained_model"]["fingerprint"].value == meta1["trained_model"]["fingerprint"].value
    again = dict(meta3["trained_model"]["comparison_values"].value)
    assert again.pop("champion")["log_loss"] == meta2["trained_model"]["log_loss"].value  # v2 refitted: the same score
    assert again == meta1["trained_model"]["comparison_values"].value
    columns = ["symbol", "ts", "fold", "prediction", "prob_up", "prob_down"]
    assert read_predictions(loaded, name, 3).select(columns).equals(read_predictions(loaded, name, 1).select(columns))
    rows = loaded.query_frame("SELECT rsi_14, adx_14 FROM ml_features LIMIT 200").to_pandas()
    first_model, _ = registry.load_model(name, version="1")
    again_model, _ = registry.load_model(name, version="3")
    assert np.array_equal(first_model.predict_proba(rows), again_model.predict_proba(rows))  # the same model


def test_an_unreachable_bus_does_not_fail_training_and_a_search_runs_its_budget(tmp_path, loaded, mlflow_dir):
    searched = spec("searched", "nobus", params={}, search={"n_trials": 3, "space": {"n_estimators": [5, 15], "num_leaves": [4, 8]}})
    instance, resources, registry = setup(tmp_path, loaded, mlflow_dir, [searched], dead_url())
    result, meta, _ = train(instance, resources, "searched")
    assert result.success
    model = meta["trained_model"]
    assert model["bus_events"].value == 0 and model["search_trials"].value == 3
    assert 5 <= model["params"].value["n_estimators"] <= 15
    import optuna

    studies = optuna.get_all_study_summaries(f"sqlite:///{tmp_path / 'optuna.db'}")
    assert [s.n_trials for s in studies] == [3] and studies[0].study_name.startswith("searched.")


def test_a_training_without_rows_fails_once_with_its_reason(tmp_path, warehouse, mlflow_dir, nats_server):
    instance, resources, registry = setup(tmp_path, warehouse, mlflow_dir, [spec("empty", "none")], nats_server.url)
    result, meta, _ = train(instance, resources, "empty")
    assert not result.success and not meta
    failure = next(e for e in result.all_events if e.is_step_failure).step_failure_data
    assert failure.user_failure_data.description.startswith("no warm M5 rows with a direction_1h label for BTCUSD, EURUSD")
    runs = read_training_runs(warehouse, "empty")
    assert runs["status"].to_list() == ["failed"] and "no warm M5 rows" in runs["error"][0]
    assert registry.client.get_run(runs["run_id"][0]).info.status == "FAILED"
    kinds = [s.split(".")[1] for s, m in training_messages(nats_server.url) if m["run_id"] == runs["run_id"][0]]
    assert kinds == ["started", "failed"]


def test_new_features_trigger_the_specs_that_use_them(tmp_path, warehouse, mlflow_dir):
    specs = [spec("fx", "a", symbols=["EURUSD"]), spec("crypto", "b", symbols=["BTCUSD"])]
    path = tmp_path / "specs.yaml"
    path.write_text(yaml.safe_dump({"specs": specs}))
    training = TrainingResource(specs_path=str(path))
    with instance_for_test() as instance:  # schedules need a stored instance
        first = retrain_on_new_features(build_sensor_context(instance=instance, resources={"training": training}))
        assert not first.run_requests  # the first tick only remembers where it is
        assert first.dynamic_partitions_requests[0].partition_keys == ["crypto", "fx"]
        instance.add_dynamic_partitions(MODEL_SPECS.name, ["crypto", "fx"])
        instance.report_runless_asset_event(AssetMaterialization("ml_features", partition="2024-03-06|EURUSD"))
        second = retrain_on_new_features(build_sensor_context(instance=instance, cursor=first.cursor, resources={"training": training}))
        assert [r.partition_key for r in second.run_requests] == ["fx"]
        quiet = retrain_on_new_features(build_sensor_context(instance=instance, cursor=second.cursor, resources={"training": training}))
        assert not quiet.run_requests
        path.write_text(yaml.safe_dump({"specs": [*specs, spec("gold", "c", symbols=["XAUUSD"])]}))  # a spec is added: data
        synced = sync_model_specs(build_sensor_context(instance=instance, resources={"training": training}))
        assert synced.dynamic_partitions_requests[0].partition_keys == ["gold"]
        saturday = datetime(2024, 3, 9, 3, tzinfo=UTC)
        with build_schedule_context(instance, scheduled_execution_time=saturday, resources={"training": training}) as context:
            weekly = list(weekly_retrain(context))  # the context closes the instance it opened
        assert [(r.partition_key, r.run_key) for r in weekly] == [("crypto", "2024-03-09|crypto"), ("fx", "2024-03-09|fx")]


@pytest.mark.parametrize(("family", "target_name", "params"), [
    ("catboost", "barrier_4h", {"iterations": 30, "depth": 4}),
    ("lightgbm", "fwd_ret_1h", {"n_estimators": 30, "num_leaves": 8}),
])
def test_three_classes_and_returns_train_register_and_load(tmp_path, loaded, mlflow_dir, nats_server, family, target_name, params):
    instance, resources, registry = setup(
        tmp_path, loaded, mlflow_dir, [spec("other", "targets", family=family, target=target_name, params=params)], nats_server.url)
    result, meta, checks = train(instance, resources, "other")
    assert result.success and checks["promotion_gate"].passed, checks["promotion_gate"].description
    model = meta["trained_model"]
    name = f"{target_name}.M5.targets"
    predictions = read_predictions(loaded, name, int(model["model_version"].value))
    if target_name == "barrier_4h":
        assert model["metric"].value == "log_loss"
        total = predictions["prob_up"] + predictions["prob_down"] + predictions["prob_flat"]
        assert ((total - 1).abs() < 1e-9).all() and set(predictions["prediction"].unique()) <= {-1.0, 0.0, 1.0}
        plots = {"feature_importance.png", "roc.png", "calibration.png", "metrics_per_fold.png"}
    else:
        assert model["metric"].value == "ic" and model["ic"].value > 0.2
        assert predictions["prob_up"].null_count() == predictions.height
        plots = {"feature_importance.png", "return_deciles.png", "metrics_per_fold.png"}
    run_id = model["run_id"].value
    assert {a.path.removeprefix("plots/") for a in registry.client.list_artifacts(run_id, "plots")} == plots
    native, version = registry.load_model(name, CHAMPION)
    assert version.tags["family"] == family and version.tags["target"] == target_name
    out = native.predict(loaded.query_frame(f"SELECT {', '.join(FEATURES)} FROM ml_features LIMIT 3").to_pandas())
    assert len(out) == 3
