"""`ml_features`: ~150 features and the labels per symbol, timeframe and bar."""

import random
import time
from collections.abc import Iterable
from datetime import timedelta

import polars as pl
from dagster import (
    AllPartitionMapping,
    AssetCheckResult,
    AssetSelection,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    AutomationCondition,
    MaterializeResult,
    MetadataValue,
    asset,
)

from assets.partitions import DAY_SYMBOL, DaySymbol, require_upstream, same_symbol_days
from models.features.compute import EXTERNAL_FEATURES, compute_features
from models.features.external import ExternalData
from models.features.labels import HORIZONS, LABEL_NAMES, compute_labels
from models.features.lookahead import lookahead_violations
from models.features.registry import FEATURE_NAMES, WARMUP_BARS, feature_set_version
from resources.conventions import MarketConventionsResource
from resources.warehouse import WarehouseResource
from resources.warehouse.features import bars_around, data_horizon, read_external, write_features

# Warm-up reads WARMUP_BARS bars back (62 days of H1); labels look up to a day ahead.
_DAYS_AHEAD = 1
assert max(HORIZONS.values()) <= timedelta(days=_DAYS_AHEAD), "the label horizons outgrew the days read ahead"
_BARS_WINDOW = same_symbol_days(start_offset=-63, end_offset=_DAYS_AHEAD)
_NON_EXTERNAL = [name for name in FEATURE_NAMES if name not in EXTERNAL_FEATURES]
_LOOKAHEAD_CUTS = 8
# Each bar joins, as of its close, everything the external tables knew: all their partitions.
_EXTERNAL = ("external_fred_indicators", "external_commodity_prices", "external_economic_calendar")
_EXTERNAL_DEPS = [AssetDep(name, partition_mapping=AllPartitionMapping()) for name in _EXTERNAL]
# Eager on new candles. Missing history does not block (the warm-up is best effort: rows say
# whether they are warm, and the day's own candles are required by the asset itself), and the
# optional, slow-moving external data neither triggers nor blocks. The window spans the days
# the labels look ahead, so a materialized day runs again when the next day's candles land and
# its labels fill in; an earlier day that never ran is left alone (its candles may not exist).
_FOLLOW_CANDLES = (
    (
        AutomationCondition.eager()
        .replace("in_latest_time_window", AutomationCondition.in_latest_time_window(timedelta(days=1 + _DAYS_AHEAD)))
        .without(~AutomationCondition.any_deps_missing())
        .ignore(AssetSelection.assets(*_EXTERNAL))
    )
    & (AutomationCondition.in_latest_time_window() | ~AutomationCondition.missing())
).with_label("eager on candles, labels refilled")


def _check_results(
    rows: pl.DataFrame, bars_by_tf: dict, partition: DaySymbol, conventions: MarketConventionsResource, horizon,
    external: ExternalData,
) -> Iterable[AssetCheckResult]:
    warm = rows.filter(pl.col("warm") == 1)
    missing = (
        warm.select((pl.col(_NON_EXTERNAL).is_null() | pl.col(_NON_EXTERNAL).is_infinite()).sum()).row(0, named=True)
        if warm.height
        else {}
    )
    bad = {name: n for name, n in missing.items() if n}
    yield AssetCheckResult(
        check_name="no_nan_after_warmup",
        passed=not bad,
        metadata={"warm_rows": warm.height, "features_with_gaps": MetadataValue.json(bad)},
    )
    rng = random.Random(str(partition.key))
    offenders: dict[str, float] = {}
    cuts_done = 0
    for tf, (bars, features, in_day) in bars_by_tf.items():
        cuts = sorted(rng.sample(in_day, min(_LOOKAHEAD_CUTS, len(in_day))))
        cuts_done += len(cuts)
        # The reference saw the label look-ahead bars too: a stricter comparison, for free.
        for name, diff in lookahead_violations(bars, tf, cuts, conventions.day_boundary, full=features, external=external).items():
            offenders[f"{tf.value}:{name}"] = diff
    yield AssetCheckResult(
        check_name="no_lookahead",
        passed=not offenders,
        description="features recomputed on history cut at random bars equal the full-history values",
        metadata={"cuts": cuts_done, "offending_features": MetadataValue.json(offenders)},
    )
    coverage = {name: float(rows[name].is_not_null().mean()) if rows.height else 0.0 for name in LABEL_NAMES}
    # A return label may be null only when its horizon runs past the data in the warehouse.
    horizon_ms = int(horizon.timestamp() * 1000) if horizon else 0
    unexpected = 0
    for name, length in HORIZONS.items():
        due = rows.filter(pl.col("close_ts").dt.epoch("ms") + int(length.total_seconds() * 1000) <= horizon_ms)
        unexpected += due[f"fwd_ret_{name}"].null_count()
    yield AssetCheckResult(
        check_name="label_coverage",
        passed=unexpected == 0,
        metadata={"labels_missing_though_due": unexpected, "coverage": MetadataValue.json(coverage),
                  "data_until": horizon.isoformat() if horizon else "-"},
    )


@asset(
    partitions_def=DAY_SYMBOL,
    group_name="features",
    kinds={"clickhouse", "polars"},
    deps=[AssetDep("aggregates", partition_mapping=_BARS_WINDOW), *_EXTERNAL_DEPS],
    automation_condition=_FOLLOW_CANDLES,
    check_specs=[
        AssetCheckSpec("no_nan_after_warmup", asset="ml_features", description="no null/NaN/inf feature on warm rows (external data excepted)"),
        AssetCheckSpec("no_lookahead", asset="ml_features", description="truncated-history recomputation matches"),
        AssetCheckSpec("label_coverage", asset="ml_features", description="labels present wherever their horizon is in the data"),
    ],
    description="Features (registry in models/features) and labels per bar of each feature timeframe.",
)
def ml_features(
    context: AssetExecutionContext, warehouse: WarehouseResource, conventions: MarketConventionsResource
) -> MaterializeResult:
    started = time.perf_counter()
    partition = DaySymbol.of(context)
    require_upstream(context, "aggregates", partition)
    version = feature_set_version()
    boundary = conventions.day_boundary
    label_end = partition.end + max(HORIZONS.values())
    frames, bars_by_tf = [], {}
    with warehouse.session() as session:
        horizon = data_horizon(session, partition.symbol)
        loaded = {tf: bars_around(session, partition.symbol, tf, partition.start, label_end, WARMUP_BARS) for tf in conventions.timeframes}
        first_bar = min((bars["ts"].min() for bars, _ in loaded.values() if bars.height), default=partition.start)
        external = read_external(session, partition.symbol, first_bar, partition.end)
    for tf, (bars, history) in loaded.items():
        features = compute_features(bars, tf, boundary, external)
        labels = compute_labels(bars, features["close_ts"], horizon or partition.start)
        rows = pl.concat([features, labels], how="horizontal").with_columns(
            pl.lit(version).alias("feature_set"),
            (pl.int_range(pl.len()) >= WARMUP_BARS - 1).cast(pl.UInt8).alias("warm"),
        ).filter(pl.col("ts") < partition.end).slice(history)
        bars_by_tf[tf] = (bars, features, range(history, history + rows.height))
        frames.append((tf, rows))
    with warehouse.session() as session:
        for tf, rows in frames:
            write_features(session, partition.symbol, tf, partition.start, partition.end, rows)
    all_rows = pl.concat([rows for _, rows in frames]) if frames else pl.DataFrame()
    nan_ratio = {name: round(float(all_rows[name].is_null().mean()), 4) for name in FEATURE_NAMES} if all_rows.height else {}
    worst = dict(sorted(nan_ratio.items(), key=lambda kv: -kv[1])[:15])
    context.log.info(f"{partition.symbol} {partition.day}: {all_rows.height:,} feature rows, feature set {version}")
    return MaterializeResult(
        metadata={
            "dagster/row_count": all_rows.height,
            "feature_set": version,
            "features": len(FEATURE_NAMES),
            **{f"rows_{tf.value}": rows.height for tf, rows in frames},
            "warm_rows": int(all_rows["warm"].sum()) if all_rows.height else 0,
            "null_ratio_top": MetadataValue.json(worst),
            "external_rows": external.values.height if external.values is not None else 0,
            "calendar_events": external.events.height if external.events is not None else 0,
            "duration_seconds": round(time.perf_counter() - started, 3),
        },
        check_results=list(_check_results(all_rows, bars_by_tf, partition, conventions, horizon, external)),
    )
