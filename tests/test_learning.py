"""models/learning: datasets, purged walk-forward folds (against independent
implementations), estimators, metrics, search and the gate. Pure: no engines."""

from __future__ import annotations

import math
from datetime import date, timedelta

import numpy as np
import optuna
import polars as pl
import pytest
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import brier_score_loss, log_loss, roc_auc_score
from sklearn.model_selection import TimeSeriesSplit

from models.learning.datasets import Task, build_dataset, target
from models.learning.estimators import FAMILIES, LearnerSettings, make_estimator, signed_prediction
from models.learning.evaluation import cross_validate
from models.learning.folds import FoldConfig, Scheme, purge_violations, walk_forward
from models.learning.gate import decide
from models.learning.metrics import classification_metrics, is_better, regression_metrics
from models.learning.search import finished_trials, new_sampler_and_pruner, run_search
from models.learning.specs import parse_duration, parse_specs
from models.learning.synthetic import SIGNAL_FEATURES, planted_features

FEATURES = [*SIGNAL_FEATURES, "ret_1", "adx_14", "cci_20"]
QUICK = {"lightgbm": {"n_estimators": 30, "num_leaves": 8}, "xgboost": {"n_estimators": 30, "max_depth": 3},
         "catboost": {"iterations": 30, "depth": 4}}


@pytest.fixture(scope="module")
def frame() -> pl.DataFrame:
    """EURUSD closes for the weekend of 2024-03-09/10; BTCUSD trades through it."""
    return planted_features(["EURUSD", "BTCUSD", "XAUUSD"], date(2024, 3, 6), 6, seed=3)


def _brute_force(close: np.ndarray, h_ms: int, embargo_ms: int, bounds: list[tuple[int, int]], window_ms: int | None):
    """Fold membership row by row, straight from the definitions."""
    folds = []
    for start, until in bounds:
        test = [i for i, c in enumerate(close) if start <= c < until]
        train = [i for i, c in enumerate(close) if c + h_ms + embargo_ms < start and (window_ms is None or c >= start - window_ms)]
        folds.append((train, test))
    return folds


@pytest.mark.parametrize("target_name", ["direction_1h", "barrier_4h", "fwd_ret_1d"])
@pytest.mark.parametrize("scheme", [Scheme.EXPANDING, Scheme.SLIDING])
def test_folds_equal_an_independent_implementation_and_never_overlap_labels(frame, target_name, scheme):
    dataset = build_dataset(frame, target_name, "planted")
    horizon = dataset.target.horizon
    config = FoldConfig(n_folds=3, scheme=scheme, embargo=timedelta(minutes=30),
                        train_window=timedelta(days=2) if scheme is Scheme.SLIDING else None, min_train_rows=10)
    folds = walk_forward(dataset.close_ms, horizon, config)
    close = dataset.close_ms
    # The test blocks are scikit-learn's TimeSeriesSplit on the distinct close times.
    times = np.unique(close)
    expected_blocks = [(int(times[test[0]]), int(times[test[-1] + 1]) if test[-1] + 1 < len(times) else int(times[-1]) + 1000)
                       for _, test in TimeSeriesSplit(n_splits=3).split(times)]
    assert [(f.test_from_ms, f.test_until_ms) for f in folds] == expected_blocks
    h_ms, e_ms = int(horizon.total_seconds() * 1000), 30 * 60_000
    brute = _brute_force(close.tolist(), h_ms, e_ms, expected_blocks, 2 * 86_400_000 if scheme is Scheme.SLIDING else None)
    for fold, (train, test) in zip(folds, brute, strict=True):
        assert list(range(fold.train_start, fold.train_stop)) == train
        assert list(range(fold.test_start, fold.test_stop)) == test
        # Pairwise: every training label window [c, c + h] ends before every test close, by the embargo.
        tr, te = close[fold.train], close[fold.test]
        assert ((tr[:, None] + h_ms + e_ms) < te[None, :]).all()
        assert fold.purged > 0 and fold.train_rows > 0
    # Several symbols share the folds (cut by time: one fold falls on the weekend, crypto only).
    symbols = dataset.keys["symbol"].to_numpy()
    assert max(len(set(symbols[f.test])) for f in folds) == 3
    assert purge_violations(close, folds, horizon, config.embargo) == []


def test_folds_across_a_weekend_purge_by_time_not_by_rows(frame):
    """With EURUSD closed for the weekend the 1-day labels of Friday's bars still reach into
    a Monday test fold by the clock, and are purged; BTCUSD rows of the weekend likewise."""
    dataset = build_dataset(frame, "direction_1d", "planted")
    config = FoldConfig(n_folds=1, test_window=timedelta(days=1, hours=12), min_train_rows=10)
    (fold,) = walk_forward(dataset.close_ms, dataset.target.horizon, config)
    day = 86_400_000
    purged = dataset.keys.slice(fold.train_stop, fold.test_start - fold.train_stop)
    assert purged.height == fold.purged
    assert set(purged["symbol"]) >= {"BTCUSD"}
    assert (purged["close_ts"].dt.epoch("ms") + day >= fold.test_from_ms).all()
    assert (dataset.close_ms[fold.train] + day < fold.test_from_ms).all()


def test_test_window_folds_and_a_leak_is_caught(frame):
    dataset = build_dataset(frame, "direction_1h", "planted")
    config = FoldConfig(n_folds=4, test_window=timedelta(hours=12), embargo=timedelta(hours=1), min_train_rows=10)
    folds = walk_forward(dataset.close_ms, dataset.target.horizon, config)
    widths = {f.test_until_ms - f.test_from_ms for f in folds}
    assert widths == {12 * 3_600_000} and folds[-1].test_until_ms == dataset.close_ms[-1] + 1000
    assert purge_violations(dataset.close_ms, folds, dataset.target.horizon, config.embargo) == []
    # A fold that trains one row too far (a label reaching the test fold) is reported.
    from dataclasses import replace

    leaking = [replace(folds[0], train_stop=folds[0].train_stop + folds[0].embargoed + 1)]
    assert purge_violations(dataset.close_ms, leaking, dataset.target.horizon, config.embargo)


def test_fold_settings_that_cannot_work_are_refused(frame):
    dataset = build_dataset(frame, "direction_1h", "planted")
    with pytest.raises(ValueError, match="training rows after purging"):
        walk_forward(dataset.close_ms, dataset.target.horizon, FoldConfig(n_folds=3, min_train_rows=100_000))
    with pytest.raises(ValueError, match="do not fit"):
        walk_forward(dataset.close_ms, dataset.target.horizon, FoldConfig(n_folds=3, test_window=timedelta(days=30)))


def test_dataset_keeps_warm_labelled_rows_in_time_order_with_a_fingerprint(frame):
    dataset = build_dataset(frame, "direction_1h", "planted", features=FEATURES)
    usable = frame.filter((pl.col("warm") == 1) & pl.col("direction_1h").is_not_null())
    assert dataset.n_rows == usable.height < frame.height
    assert np.all(np.diff(dataset.close_ms) >= 0)
    assert dataset.X.dtype == np.float32 and dataset.X.shape == (usable.height, len(FEATURES))
    assert set(np.unique(dataset.y)) == {0, 1}
    assert np.array_equal(dataset.y, (dataset.label > 0).astype(int))
    again = build_dataset(frame.sample(fraction=1.0, shuffle=True, seed=1), "direction_1h", "planted", features=FEATURES)
    assert again.fingerprint == dataset.fingerprint  # the same rows in any order
    changed = frame.with_columns(pl.when(pl.int_range(pl.len()) == 500).then(0.123).otherwise(pl.col("rsi_14")).alias("rsi_14"))
    assert build_dataset(changed, "direction_1h", "planted", features=FEATURES).fingerprint != dataset.fingerprint
    assert build_dataset(frame, "direction_1h", "planted", features=FEATURES[:-1]).fingerprint != dataset.fingerprint
    barrier = build_dataset(frame, "barrier_4h", "planted")
    assert barrier.target.task is Task.MULTICLASS and set(np.unique(barrier.y)) == {0, 1, 2}
    with pytest.raises(ValueError, match="mixed into"):
        build_dataset(frame.with_columns(pl.lit("other").alias("feature_set")).vstack(frame), "direction_1h", "planted")
    with pytest.raises(ValueError, match="labels cannot be features"):
        build_dataset(frame, "direction_1h", "planted", features=["fwd_ret_1h"])
    with pytest.raises(ValueError, match="unknown target"):
        build_dataset(frame, "direction_2h", "planted")


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("target_name", ["direction_1h", "barrier_4h", "fwd_ret_1h"])
def test_each_family_learns_the_planted_signal_and_repeats_itself_exactly(frame, family, target_name):
    dataset = build_dataset(frame, target_name, "planted", features=FEATURES)
    folds = walk_forward(dataset.close_ms, dataset.target.horizon, FoldConfig(n_folds=2, embargo=timedelta(hours=1)))
    settings = LearnerSettings(seed=11, n_jobs=1)
    task, k = dataset.target.task, dataset.target.n_classes

    def make():
        return make_estimator(family, task, QUICK[family], settings, k)

    first = cross_validate(family, dataset, folds, make)
    second = cross_validate(family, dataset, folds, make)
    assert np.array_equal(first.raw, second.raw) and first.mean == second.mean
    naive = cross_validate("majority", dataset, folds, lambda: make_estimator("majority", task, n_classes=k))
    metric = "ic" if task is Task.REGRESSION else "log_loss"
    assert is_better(metric, first.mean[metric], naive.mean[metric], margin=0.01), (first.mean, naive.mean)
    if task is not Task.REGRESSION:
        assert first.raw.shape == (len(first.index), k) and np.allclose(first.raw.sum(axis=1), 1)
        assert first.mean["auc"] > 0.6
    assert first.importance is not None
    top = np.argsort(first.importance)[::-1][:3]
    assert {dataset.feature_names[i] for i in top} & set(SIGNAL_FEATURES)


def test_a_different_seed_gives_a_different_model():
    frame = planted_features(["BTCUSD"], date(2024, 3, 4), 3, seed=5)
    dataset = build_dataset(frame, "direction_1h", "planted", features=FEATURES)
    folds = walk_forward(dataset.close_ms, dataset.target.horizon, FoldConfig(n_folds=2))
    params = {"n_estimators": 20, "subsample": 0.7, "subsample_freq": 1, "colsample_bytree": 0.5}

    def run(seed):
        return cross_validate("m", dataset, folds, lambda: make_estimator("lightgbm", Task.BINARY, params, LearnerSettings(seed)))

    assert not np.array_equal(run(1).raw, run(2).raw)
    assert np.array_equal(run(1).raw, run(1).raw)


def test_baselines_score_what_they_claim():
    y = np.array([1, 1, 1, 0, 1, 0, 1, 1])
    previous = np.array([0.1, -0.2, 0.3, 0.4, -0.1, 0.2, 0.3, -0.5])
    majority = make_estimator("majority", Task.BINARY).fit(np.zeros((8, 1)), y)
    assert np.allclose(majority.predict(np.zeros((2, 1))), [[3 / 10, 7 / 10]] * 2)  # Laplace-smoothed rates
    persistence = make_estimator("previous_direction", Task.BINARY).fit(previous[:, None], y)
    up_after_up = (np.sum(y[previous > 0]) + 1) / (np.sum(previous > 0) + 2)
    assert math.isclose(persistence.predict(np.array([[0.5]]))[0, 1], up_after_up)
    assert list(signed_prediction(persistence.predict(np.array([[0.5], [-0.5]])), Task.BINARY)) == [1.0, 1.0]


def test_metrics_equal_reference_implementations():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 500)
    p = np.clip(0.5 + 0.2 * (y - 0.5) + rng.normal(0, 0.2, 500), 0.01, 0.99)
    got = classification_metrics(y, np.column_stack([1 - p, p]))
    assert math.isclose(got["auc"], roc_auc_score(y, p))
    assert math.isclose(got["log_loss"], log_loss(y, p), rel_tol=1e-9)
    assert math.isclose(got["brier"], brier_score_loss(y, p))
    assert math.isclose(got["accuracy"], float(np.mean((p >= 0.5) == y)))
    ret = rng.normal(0, 1, 600)
    pred = 0.3 * ret + rng.normal(0, 1, 600)
    pred[::7] = pred[0]  # ties, so the rank correlation must average them
    days = np.repeat(np.arange(6), 100)
    r = regression_metrics(ret, pred, days)
    assert math.isclose(r["ic"], pearsonr(pred, ret)[0], rel_tol=1e-9)
    assert math.isclose(r["rank_ic"], spearmanr(pred, ret)[0], rel_tol=1e-9)
    daily = np.array([pearsonr(pred[days == d], ret[days == d])[0] for d in range(6)])
    assert math.isclose(r["icir"], daily.mean() / daily.std(), rel_tol=1e-9)
    assert regression_metrics(ret, np.full(600, 0.1), days)["ic"] == 0.0  # a constant forecast has no skill
    assert math.isnan(regression_metrics(ret[:300], pred[:300], days[:300])["icir"])  # 3 days: too few


def test_gate_decisions_and_their_reasons():
    baselines = {"majority": 0.6930, "previous_direction": 0.6931}
    first = decide("log_loss", 0.6800, baselines)
    assert first.passed and "no champion yet" in first.reason
    better = decide("log_loss", 0.6800, baselines, champion=0.6850, champion_version="3", margin=0.001)
    assert better.passed and "beats champion v3" in better.reason
    close = decide("log_loss", 0.6845, baselines, champion=0.6850, champion_version="3", margin=0.001)
    assert not close.passed and "does not beat champion v3 by the margin 0.001" in close.reason
    naive = decide("log_loss", 0.6935, baselines)
    assert not naive.passed and "does not beat the majority baseline" in naive.reason
    leak = decide("log_loss", 0.60, baselines, blockers=["purge check failed: fold 1"])
    assert not leak.passed and leak.reasons[0].startswith("purge check failed")
    assert decide("ic", 0.05, {"majority": 0.0}, champion=0.04, champion_version="1", margin=0.005).passed
    assert not decide("ic", 0.044, {"majority": 0.0}, champion=0.04, champion_version="1", margin=0.005).passed


def test_search_prunes_resumes_from_its_storage_and_stays_in_budget(tmp_path):
    frame = planted_features(["BTCUSD", "EURUSD"], date(2024, 3, 4), 4, seed=2)
    dataset = build_dataset(frame, "direction_1h", "planted", features=FEATURES)
    folds = walk_forward(dataset.close_ms, dataset.target.horizon, FoldConfig(n_folds=3))
    storage = f"sqlite:///{tmp_path / 'optuna.db'}"
    bounds = {"n_estimators": [5, 20], "num_leaves": [4, 8]}

    def study():
        sampler, pruner = new_sampler_and_pruner(7)
        return optuna.create_study(study_name="s", storage=storage, sampler=sampler, pruner=pruner, load_if_exists=True)

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    seen = []
    first = run_search(study(), dataset, folds, "lightgbm", "log_loss", LearnerSettings(), n_trials=3, bounds=bounds,
                       on_trial=lambda t, s, n: seen.append(t.number))
    assert first.ran == 3 and seen == [0, 1, 2]
    resumed = run_search(study(), dataset, folds, "lightgbm", "log_loss", LearnerSettings(), n_trials=8, bounds=bounds)
    assert resumed.ran == 5 and finished_trials(study()) == 8  # the stopped search went on, to its budget
    assert run_search(study(), dataset, folds, "lightgbm", "log_loss", LearnerSettings(), n_trials=8, bounds=bounds).ran == 0
    trials = study().trials
    assert all(len(t.intermediate_values) >= 1 for t in trials)  # each fold reported, so pruning can act
    assert 5 <= resumed.best_params["n_estimators"] <= 20 and resumed.best_params["subsample_freq"] == 1
    best = min(t.value for t in trials if t.value is not None)
    assert resumed.best_value == best
    with pytest.raises(ValueError, match="has no parameter"):
        run_search(study(), dataset, folds, "lightgbm", "log_loss", LearnerSettings(), n_trials=9, bounds={"depth": [1, 2]})


def test_specs_are_data_with_clear_errors():
    specs = parse_specs({
        "universes": {"majors": ["eurusd", "gbpusd"]},
        "defaults": {"folds": {"n_folds": 4, "embargo": "2h"}, "seed": 3},
        "specs": [
            {"name": "a", "family": "xgboost", "target": "direction_4h", "universe": "majors", "folds": {"scheme": "sliding", "train_window": "30d"}},
            {"name": "b", "family": "catboost", "target": "fwd_ret_1h", "symbols": ["BTCUSD"], "search": {"n_trials": 5, "timeout": "10m"}},
        ],
    })
    a, b = specs["a"], specs["b"]
    assert a.symbols == ["EURUSD", "GBPUSD"] and a.registered_model_name == "direction_4h.M5.majors"
    assert a.folds.config() == FoldConfig(n_folds=4, scheme=Scheme.SLIDING, train_window=timedelta(days=30), embargo=timedelta(hours=2))
    assert a.seed == 3 and a.metric == "log_loss" and b.metric == "ic" and b.universe == "BTCUSD"
    assert b.search.timeout_seconds == 600 and target(b.target).task is Task.REGRESSION
    assert parse_duration("90d") == timedelta(days=90) and parse_duration("0") == timedelta(0)
    for bad, message in [
        ({"name": "x", "family": "sklearn", "target": "direction_1h", "symbols": ["EURUSD"]}, "unknown family 'sklearn'"),
        ({"name": "x", "family": "lightgbm", "target": "up", "symbols": ["EURUSD"]}, "unknown target 'up'"),
        ({"name": "x", "family": "lightgbm", "target": "direction_1h", "universe": "none"}, "universe 'none'"),
        ({"name": "x", "family": "lightgbm", "target": "direction_1h", "symbols": ["EURUSD"], "folds": {"embargo": "1 hour"}}, "not a duration"),
        ({"name": "x", "family": "lightgbm", "target": "direction_1h", "symbols": ["EURUSD"], "gate": {"metric": "ic"}}, "does not apply"),
        ({"name": "x y", "family": "lightgbm", "target": "direction_1h", "symbols": ["EURUSD"]}, "letters, digits"),
        ({"name": "x", "family": "lightgbm", "target": "direction_1h", "symbols": ["EURUSD"], "colour": 1}, "colour"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_specs({"specs": [bad]})
