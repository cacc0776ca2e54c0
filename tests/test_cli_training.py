"""`tradeforge train` and friends as a user meets them: progress lines, a summary beside
the baselines, and every failure as one line with a non-zero exit."""

from __future__ import annotations

import uuid
from datetime import date
from pathlib import Path

import pytest
import yaml

from models.learning.synthetic import planted_features
from orchestration.cli import main
from resources.warehouse.features import store_feature_rows
from resources.warehouse import WarehouseResource
from resources.warehouse.features import FEATURE_COLUMNS
from tests.natsserver import dead_url, fresh_mlflow_store

FEATURES = ["rsi_14", "macd", "bb_position_20", "ret_1"]


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory) -> str:
    """One tracking store for the module."""
    return fresh_mlflow_store(tmp_path_factory.mktemp("mlflow"))


@pytest.fixture(scope="module")
def dagster_home(tmp_path_factory) -> str:
    """One Dagster home for the module: its SQLite storages cost seconds to create."""
    return str(tmp_path_factory.mktemp("dagster"))


@pytest.fixture
def user(tmp_path, warehouse_dir, mlflow_db, dagster_home, monkeypatch):
    """A user's environment: their own state, MLflow store and Dagster home; the session's
    embedded warehouse (one chDB directory per process), a fresh database in it."""
    database = f"cli_{uuid.uuid4().hex[:10]}"
    for name, value in {
        "TRADEFORGE_HOME": str(tmp_path / "state"), "DAGSTER_HOME": dagster_home,
        "TRADEFORGE_WAREHOUSE_PATH": str(warehouse_dir), "CLICKHOUSE_DATABASE": database,
        "MLFLOW_TRACKING_URI": mlflow_db, "NATS_URL": dead_url(),
        "TRADEFORGE_MODEL_SPECS": str(tmp_path / "specs.yaml"), "TRADEFORGE_TRAIN_THREADS": "1",
    }.items():
        monkeypatch.setenv(name, value)
    specs = [{"name": "noise", "family": "lightgbm", "target": "direction_1h", "symbols": ["EURUSD", "BTCUSD"],
              "universe": "cli", "feature_set": "planted", "features": FEATURES, "folds": {"n_folds": 3}}]
    (tmp_path / "specs.yaml").write_text(yaml.safe_dump({"specs": specs}))
    return WarehouseResource(embedded_path=str(warehouse_dir), database=database)


def test_train_prints_progress_and_says_when_a_model_does_not_beat_the_baseline(user, mlflow_db, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # where a stray ./mlruns would appear
    store_feature_rows(user, planted_features(["EURUSD", "BTCUSD"], date(2024, 3, 4), 4, feature_set="planted",
                                                      signal=0.0).select(FEATURE_COLUMNS))
    assert main(["train", "noise"]) == 0
    out = capsys.readouterr().out
    assert "training noise: lightgbm on direction_1h, M5 BTCUSD, EURUSD -> registered model direction_1h.M5.cli" in out
    assert "lightgbm fold 3/3: log_loss" in out and "baseline majority: log_loss" in out
    # LightGBM with defaults is the baseline itself: it cannot beat it, and pure noise beats no naive baseline.
    assert "lightgbm does not beat the baseline (LightGBM with defaults)" in out
    assert "gate: refused: does not beat the majority baseline" in out
    assert "registered: direction_1h.M5.cli v1" in out and "champion: unchanged" in out
    store = Path(mlflow_db.removeprefix("sqlite:///")).parent
    assert (store / "artifacts" / "direction_1h.M5.cli").is_dir() and not (tmp_path / "mlruns").exists()
    for candidate in ("model", "lightgbm_default", "majority", "previous_direction"):
        assert f"\n  {candidate:<20}" in out


def test_every_failure_is_one_line_and_a_non_zero_exit(user, tmp_path, capsys):
    cases = [
        (["train", "nosuch"], "tradeforge: no model spec named 'nosuch'"),
        (["train"], "tradeforge: name a model spec"),
        (["train", "noise"], "tradeforge: training noise failed: no warm M5 rows with a direction_1h label for BTCUSD, EURUSD "
                             "in feature set planted; ml_features holds nothing for them"),
    ]
    (tmp_path / "broken.yaml").write_text("specs: [1")
    cases.append((["train", "x", "--specs", str(tmp_path / "broken.yaml")], "is not valid YAML"))
    (tmp_path / "wrong.yaml").write_text(yaml.safe_dump({"specs": [{"name": "x", "family": "sklearn", "target": "direction_1h", "symbols": ["EURUSD"]}]}))
    cases.append((["train", "x", "--specs", str(tmp_path / "wrong.yaml")], "tradeforge: model spec x: family: unknown family 'sklearn'"))
    for argv, expected in cases:
        assert main(argv) == 1, argv
        captured = capsys.readouterr()
        lines = captured.err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (argv, captured.err)
        assert "Traceback" not in captured.out + captured.err
