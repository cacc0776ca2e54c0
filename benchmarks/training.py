"""Training: a 5-fold purged walk-forward of each family on about a year of M5 bars of three
symbols, and 50 Optuna trials of LightGBM (on the year's last quarter).

The rows have the shape of `ml_features` (every registered feature and the labels), computed
by the real feature engine on random-walk bars. Figures: wall time of the whole path (frame ->
dataset -> folds -> purge check -> fits -> out-of-sample frame) and the share of it spent
outside the learners' fit/predict (goal: under 15%), beside the same folds fitted by calling
LightGBM directly (the peer: what the learner costs without our code around it). The read of
the rows from the embedded warehouse is timed apart: it happens once per training.
"""

from __future__ import annotations

import os
import tempfile
import time
from datetime import UTC, datetime, timedelta

import optuna
import polars as pl

from benchmarks.features import synthetic_bars
from models.features import compute as engine
from models.features.labels import compute_labels
from models.learning.datasets import build_dataset
from models.learning.estimators import LearnerSettings, make_estimator, probabilities_by_side, signed_prediction
from models.learning.evaluation import cross_validate
from models.learning.folds import FoldConfig, purge_violations, walk_forward
from models.learning.search import new_sampler_and_pruner, run_search
from models.market.ticks import TS
from models.market.timeframes import Timeframe

SYMBOLS = ("EURUSD", "XAUUSD", "BTCUSD")
PARAMS = {
    "lightgbm": {"n_estimators": 200, "learning_rate": 0.05, "num_leaves": 31},
    "xgboost": {"n_estimators": 200, "learning_rate": 0.05, "max_depth": 6},
    "catboost": {"iterations": 200, "learning_rate": 0.05, "depth": 6},
}
SEARCH_BOUNDS = {"n_estimators": [50, 200]}  # keeps 50 trials within minutes on two cores


def feature_rows(bars_per_symbol: int) -> pl.DataFrame:
    """`ml_features`-shaped rows of three symbols: features and labels from the engine."""
    frames = []
    start = int(datetime(2023, 1, 1, tzinfo=UTC).timestamp() * 1000)
    for seed, symbol in enumerate(SYMBOLS, start=1):
        bars = synthetic_bars(bars_per_symbol, seed=seed).with_columns(
            pl.lit(symbol).alias("symbol"), pl.lit("M5").alias("timeframe"),
            (pl.int_range(pl.len(), dtype=pl.Int64) * 300_000 + start).cast(pl.Datetime("ms")).dt.replace_time_zone("UTC").cast(TS).alias("ts"),
        )
        features = engine.compute_features(bars, Timeframe.M5)
        labels = compute_labels(bars, features["close_ts"], features["close_ts"][-1])
        frames.append(pl.concat([features, labels], how="horizontal").with_columns(
            pl.lit("bench").alias("feature_set"), (pl.int_range(pl.len()) >= 1500).cast(pl.UInt8).alias("warm")))
    return pl.concat(frames)


def training_path(rows: pl.DataFrame, family: str, config: FoldConfig, threads: int) -> dict[str, float]:
    """Everything a training does between the rows and the out-of-sample predictions."""
    started = time.perf_counter()
    dataset = build_dataset(rows, "direction_1h", "bench")
    built = time.perf_counter()
    folds = walk_forward(dataset.close_ms, dataset.target.horizon, config)
    assert not purge_violations(dataset.close_ms, folds, dataset.target.horizon, config.embargo)
    settings = LearnerSettings(seed=7, n_jobs=threads)
    result = cross_validate(family, dataset, folds, lambda: make_estimator(family, dataset.target.task, PARAMS[family], settings))
    keys = dataset.keys[result.index]
    predictions = keys.with_columns(
        pl.Series("prediction", signed_prediction(result.raw, dataset.target.task)),
        *[pl.Series(k, v) for k, v in probabilities_by_side(result.raw, dataset.target.task).items() if v is not None],
        pl.Series("fold", result.fold_of),
    )
    wall = time.perf_counter() - started
    return {"rows": dataset.n_rows, "features": len(dataset.feature_names), "predictions": predictions.height,
            "wall_s": wall, "learner_s": result.learner_seconds, "dataset_s": built - started,
            "outside_share": (wall - result.learner_seconds) / wall, "log_loss": result.mean["log_loss"],
            "auc": result.mean["auc"]}


def peer_comparison(rows: pl.DataFrame, config: FoldConfig, threads: int, repeat: int = 3) -> tuple[float, float]:
    """Our path against LightGBM called directly on the same fold slices (the peer: the
    learner without our code around it); best of ``repeat`` each, alternating, on the rows
    given. Returns (ours, direct) seconds."""
    import lightgbm as lgb

    def direct() -> None:
        dataset = build_dataset(rows, "direction_1h", "bench")
        folds = walk_forward(dataset.close_ms, dataset.target.horizon, config)
        for fold in folds:
            model = lgb.LGBMClassifier(**PARAMS["lightgbm"], random_state=7, n_jobs=threads, deterministic=True,
                                       force_col_wise=True, verbose=-1)
            model.fit(dataset.X[fold.train], dataset.y[fold.train])
            model.predict_proba(dataset.X[fold.test])

    ours, theirs = [], []
    for _ in range(repeat):
        ours.append(training_path(rows, "lightgbm", config, threads)["wall_s"])
        started = time.perf_counter()
        direct()
        theirs.append(time.perf_counter() - started)
    return min(ours), min(theirs)


def warehouse_read(rows: pl.DataFrame) -> dict[str, float]:
    """Rows into the embedded warehouse's `ml_features`, then read back as a training does."""
    from resources.warehouse import WarehouseResource
    from resources.warehouse.features import FEATURE_COLUMNS
    from resources.warehouse.learning import read_training_rows

    with tempfile.TemporaryDirectory() as tmp:
        warehouse = WarehouseResource(embedded_path=tmp, database="bench")
        warehouse.insert_frame("ml_features", rows.select(FEATURE_COLUMNS))
        started = time.perf_counter()
        read = read_training_rows(warehouse, list(SYMBOLS), "M5", "bench", "direction_1h")
        seconds = time.perf_counter() - started
    return {"rows": read.height, "seconds": seconds, "rows_per_s": read.height / seconds}


def bench_training(quick: bool = False) -> dict:
    # One thread by default: on a shared two-core host two OpenMP threads collapse under
    # contention (DEPENDENCIES.md); TRADEFORGE_BENCH_THREADS=N on a quiet machine.
    threads = int(os.environ.get("TRADEFORGE_BENCH_THREADS", "1"))
    bars = 10_000 if quick else 105_120  # a year of round-the-clock M5 bars per symbol
    t0 = time.perf_counter()
    rows = feature_rows(bars)
    print(f"training: {rows.height:,} ml_features rows ({len(SYMBOLS)} symbols x {bars:,} M5 bars) built in "
          f"{time.perf_counter() - t0:.1f}s; {threads} threads")
    config = FoldConfig(n_folds=5, embargo=timedelta(hours=1))
    read = warehouse_read(rows)
    print(f"  read from the embedded warehouse  {read['seconds']:7.2f} s  ({read['rows_per_s'] / 1e3:,.0f} k rows/s)")
    results: dict = {"rows": rows.height, "threads": threads, "warehouse_read": read, "families": {}}
    for family in ("lightgbm", "xgboost", "catboost"):
        r = training_path(rows, family, config, threads)
        results["families"][family] = r
        print(f"  {family:<9} 5 folds  wall {r['wall_s']:7.1f} s  learners {r['learner_s']:7.1f} s  outside {r['outside_share']:6.1%}"
              f"  (log_loss {r['log_loss']:.4f}, auc {r['auc']:.3f})")
    last_quarter = rows.filter(pl.col("ts") >= rows["ts"].max() - timedelta(days=91))
    ours, peer = peer_comparison(last_quarter, config, threads)
    results["peer"] = {"rows": last_quarter.height, "ours_s": ours, "lightgbm_direct_s": peer, "ratio": ours / peer}
    print(f"  the same path against LightGBM called directly (last quarter, best of 3, both from the frame): "
          f"{ours:.1f} s vs {peer:.1f} s = {ours / peer:.2f}x")
    with_read = {f: (r["wall_s"] - r["learner_s"] + read["seconds"]) / (r["wall_s"] + read["seconds"])
                 for f, r in results["families"].items()}
    results["outside_share_with_read"] = with_read
    print("  outside the learners, the warehouse read included: "
          + ", ".join(f"{f} {s:.1%}" for f, s in with_read.items()))

    trials = 5 if quick else 50
    # The search runs on the last quarter of the year: 50 trials of 5 folds on the whole year
    # would take the better part of an hour on two cores.
    dataset = build_dataset(last_quarter, "direction_1h", "bench")
    folds = walk_forward(dataset.close_ms, dataset.target.horizon, config)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        sampler, pruner = new_sampler_and_pruner(7)
        study = optuna.create_study(storage=f"sqlite:///{tmp}/optuna.db", sampler=sampler, pruner=pruner, direction="minimize")
        started = time.perf_counter()
        search = run_search(study, dataset, folds, "lightgbm", "log_loss", LearnerSettings(7, threads), trials, bounds=SEARCH_BOUNDS)
        wall = time.perf_counter() - started
        in_trials = sum(t.duration.total_seconds() for t in study.trials if t.duration)
    results["optuna"] = {"trials": trials, "rows": dataset.n_rows, "wall_s": wall, "complete": search.complete, "pruned": search.pruned,
                         "best_log_loss": search.best_value, "seconds_per_trial": wall / trials,
                         "optuna_share": (wall - in_trials) / wall}
    print(f"  Optuna, LightGBM {trials} trials on the last quarter ({dataset.n_rows:,} rows, 5 folds, n_estimators 50-200)")
    print(f"                               wall {wall:7.1f} s  ({wall / trials:.1f} s a trial; {search.complete} complete, "
          f"{search.pruned} pruned; best log_loss {search.best_value:.4f}); Optuna's own share (sampler, pruner, "
          f"SQLite storage) {(wall - in_trials) / wall:.1%}")
    return results
