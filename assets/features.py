"""`ml_features`: ~150 features and the labels per symbol, timeframe and bar.

A run covers a day or a range of days (one run for a year), in chunks of days, every feature
timeframe of a day written together, all or nothing, keyed by the feature set. The warm-up
history (`WARMUP_BARS` before each chunk) and the day ahead the labels look at are read from
the warehouse as it stands; when the next day's candles land later, the
`labels_follow_candles` sensor reruns the day so its last labels fill in.
"""

import random
import time
from collections import Counter
from datetime import datetime, timedelta

import polars as pl
from dagster import (
    AllPartitionMapping,
    AssetCheckResult,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    AssetSelection,
    AutomationCondition,
    MaterializeResult,
    MetadataValue,
    asset,
)

from assets.partitions import DAY_SYMBOL, RANGE_AS_ONE_RUN, chunks, day_start, days_by_symbol, require_upstream
from assets.progress import Progress
from models.features.compute import EXTERNAL_FEATURES, compute_features
from models.features.labels import HORIZONS, LABEL_NAMES, compute_labels
from models.features.lookahead import lookahead_violations
from models.features.registry import FEATURE_NAMES, FEATURES, QUOTE_FEATURES, WARMUP_BARS, feature_set_version
from resources.conventions import MarketConventionsResource
from resources.warehouse import WarehouseResource
from resources.warehouse.features import bars_around, data_horizon, feature_writes, read_external

_LABEL_REACH = max(HORIZONS.values())
_ROWS_PER_CHUNK = 100_000  # bars of the finest feature timeframe computed at once (plus the warm-up)
_LOOKAHEAD_CUTS = 8
_ALWAYS_CHECKED = [name for name in FEATURE_NAMES if name not in EXTERNAL_FEATURES and name not in QUOTE_FEATURES]
_QUOTE_LOOKBACK = {spec.name: spec.lookback for spec in FEATURES if spec.name in QUOTE_FEATURES}
# Each bar joins, as of its close, everything the external tables knew: all their partitions.
_EXTERNAL = ("external_fred_indicators", "external_commodity_prices", "external_economic_calendar")
_EXTERNAL_DEPS = [AssetDep(name, partition_mapping=AllPartitionMapping()) for name in _EXTERNAL]
# Eager on the day's candles; the optional, slow-moving external data neither triggers nor blocks.
_FOLLOW_CANDLES = AutomationCondition.eager().ignore(AssetSelection.assets(*_EXTERNAL)).with_label("eager on candles")


def _missing_on_warm_rows(rows: pl.DataFrame, bars: pl.DataFrame) -> dict[str, int]:
    """Warm rows with a null/NaN/inf feature, per feature. External features are optional;
    a quote feature counts only where every bar of its look-back had quotes (bars imported
    from files have none, and then the feature is rightly null)."""
    warm = rows.with_row_index("_i").filter(pl.col("warm") == 1)
    if warm.is_empty():
        return {}
    bad = (pl.col(_ALWAYS_CHECKED).is_null() | pl.col(_ALWAYS_CHECKED).is_infinite()).sum()
    counts = dict(warm.select(bad).row(0, named=True))
    has_quotes = bars["spread_mean"].is_not_null().cast(pl.Int32)
    offset = bars.height - rows.height  # rows are the last bars (the warm-up bars come first)
    for name, lookback in _QUOTE_LOOKBACK.items():
        quoted = (has_quotes.rolling_min(max(lookback, 1)) == 1).fill_null(False).slice(offset)
        column = warm.select((pl.col(name).is_null() | pl.col(name).is_infinite()) & quoted.gather(warm["_i"]))
        counts[name] = int(column.to_series().sum())
    return {name: n for name, n in counts.items() if n}


@asset(
    partitions_def=DAY_SYMBOL,
    backfill_policy=RANGE_AS_ONE_RUN,
    group_name="features",
    kinds={"clickhouse", "polars"},
    deps=[AssetDep("aggregates"), *_EXTERNAL_DEPS],
    automation_condition=_FOLLOW_CANDLES,
    check_specs=[
        AssetCheckSpec("no_nan_after_warmup", asset="ml_features",
                       description="no null/NaN/inf feature on warm rows (external data excepted; quote features only where "
                       "the bars had quotes)"),
        AssetCheckSpec("no_lookahead", asset="ml_features", description="truncated-history recomputation matches"),
        AssetCheckSpec("label_coverage", asset="ml_features", description="labels present wherever their horizon is in the data"),
    ],
    description="Features (registry in models/features) and labels per bar of each feature timeframe that has bars.",
)
def ml_features(
    context: AssetExecutionContext, warehouse: WarehouseResource, conventions: MarketConventionsResource
) -> MaterializeResult:
    started = time.perf_counter()
    version = feature_set_version()
    boundary = conventions.day_boundary
    partitions = days_by_symbol(context)
    progress = Progress(context, "ml_features", sum(len(d) for d in partitions.values()))
    finest = min(conventions.timeframes, key=lambda tf: tf.minutes)
    days_per_chunk = max(1, _ROWS_PER_CHUNK // (1440 // finest.minutes))
    rows_per_tf: Counter = Counter()
    warm_rows = external_rows = events = 0
    gaps: Counter = Counter()
    offenders: dict[str, float] = {}
    cuts_done = labels_missing = 0
    coverage = {name: [0, 0] for name in LABEL_NAMES}  # present, rows
    null_counts: Counter = Counter()
    no_bars: set[str] = set()
    horizon_seen: datetime | None = None
    for symbol, days in partitions.items():
        require_upstream(context, "aggregates", symbol, days)
        parts = list(chunks(days, days_per_chunk))
        cuts_per_chunk = -(-_LOOKAHEAD_CUTS // len(parts))
        first_batch = 0
        for chunk in parts:
            start, end = day_start(chunk[0]), day_start(chunk[-1]) + timedelta(days=1)
            with warehouse.session() as session:
                horizon = data_horizon(session, symbol)
                loaded = {tf: bars_around(session, symbol, tf, start, end + _LABEL_REACH, WARMUP_BARS)
                          for tf in conventions.timeframes}
                first_bar = min((bars["ts"].min() for bars, _ in loaded.values() if bars.height), default=start)
                external = read_external(session, symbol, first_bar, end)
            horizon_seen = max(filter(None, [horizon_seen, horizon]), default=None)
            frames = []
            for tf, (bars, history) in loaded.items():
                in_chunk = bars.filter((pl.col("ts") >= start) & (pl.col("ts") < end)).height
                if not in_chunk:
                    no_bars.add(tf.value)
                    continue
                features = compute_features(bars, tf, boundary, external)
                labels = compute_labels(bars, features["close_ts"], horizon or start)
                every = pl.concat([features, labels], how="horizontal").with_columns(
                    pl.lit(version).alias("feature_set"),
                    (pl.int_range(pl.len()) >= WARMUP_BARS - 1).cast(pl.UInt8).alias("warm"),
                )
                rows = every.slice(history, in_chunk)
                frames.append(rows)
                rows_per_tf[tf.value] += rows.height
                warm_rows += int(rows["warm"].sum())
                gaps.update(_missing_on_warm_rows(rows, bars.head(history + in_chunk)))
                null_counts.update({n: rows[n].null_count() for n in FEATURE_NAMES})
                labels_missing += _labels_missing(rows, horizon, coverage)
                rng = random.Random(f"{symbol}|{tf.value}|{chunk[0]}")  # the same cuts when a day reruns
                cuts = sorted(rng.sample(range(history, history + in_chunk), min(cuts_per_chunk, in_chunk)))
                cuts_done += len(cuts)
                for name, diff in lookahead_violations(bars, tf, cuts, boundary, full=features, external=external).items():
                    offenders[f"{tf.value}:{name}"] = max(diff, offenders.get(f"{tf.value}:{name}", 0.0))
            written = pl.concat(frames) if frames else None
            with warehouse.session() as session:
                batch = session.replace(feature_writes(symbol, version, chunk, written if written is not None else _empty_rows()),
                                        cleanup=False)
                first_batch = first_batch or batch
            external_rows += external.values.height if external.values is not None else 0
            events += external.events.height if external.events is not None else 0
            progress.advance(symbol, chunk, f"{0 if written is None else written.height:,} feature rows")
        with warehouse.session() as session:  # what earlier runs stored for these days: one delete per run
            session.remove_superseded(feature_writes(symbol, version, days, _empty_rows()), before=first_batch)
    total = sum(rows_per_tf.values())
    nan_ratio = {name: round(n / total, 4) for name, n in null_counts.items()} if total else {}
    worst = dict(sorted(nan_ratio.items(), key=lambda kv: -kv[1])[:15])
    context.log.info(f"{progress.describe()}: {total:,} feature rows {dict(rows_per_tf)}, feature set {version}")
    return MaterializeResult(
        metadata={
            "dagster/row_count": total,
            "feature_set": version,
            "features": len(FEATURE_NAMES),
            **{f"rows_{tf.value}": rows_per_tf.get(tf.value, 0) for tf in conventions.timeframes},
            **({"timeframes_without_bars": MetadataValue.json(sorted(no_bars - set(rows_per_tf)))}
               if no_bars - set(rows_per_tf) else {}),
            "warm_rows": warm_rows,
            "null_ratio_top": MetadataValue.json(worst),
            "external_rows": external_rows,
            "calendar_events": events,
            "days": progress.total,
            "duration_seconds": round(time.perf_counter() - started, 3),
        },
        check_results=[
            AssetCheckResult(check_name="no_nan_after_warmup", passed=not gaps,
                             metadata={"warm_rows": warm_rows, "features_with_gaps": MetadataValue.json(dict(gaps))}),
            AssetCheckResult(check_name="no_lookahead", passed=not offenders,
                             description="features recomputed on history cut at random bars equal the full-history values",
                             metadata={"cuts": cuts_done, "offending_features": MetadataValue.json(offenders)}),
            AssetCheckResult(check_name="label_coverage", passed=labels_missing == 0,
                             metadata={"labels_missing_though_due": labels_missing,
                                       "coverage": MetadataValue.json({n: round(p / r, 4) if r else 0.0
                                                                       for n, (p, r) in coverage.items()}),
                                       "data_until": horizon_seen.isoformat() if horizon_seen else "-"}),
        ],
    )


def _labels_missing(rows: pl.DataFrame, horizon: datetime | None, coverage: dict[str, list[int]]) -> int:
    """Return labels null although their horizon is inside the data; counts coverage."""
    for name in LABEL_NAMES:
        coverage[name][0] += rows.height - rows[name].null_count()
        coverage[name][1] += rows.height
    horizon_ms = int(horizon.timestamp() * 1000) if horizon else 0
    missing = 0
    for name, length in HORIZONS.items():
        due = rows.filter(pl.col("close_ts").dt.epoch("ms") + int(length.total_seconds() * 1000) <= horizon_ms)
        missing += due[f"fwd_ret_{name}"].null_count()
    return missing


def _empty_rows() -> pl.DataFrame:
    from resources.warehouse.features import FEATURE_COLUMNS

    return pl.DataFrame(schema={c: pl.Float64() for c in FEATURE_COLUMNS})

