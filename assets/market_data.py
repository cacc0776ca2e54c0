"""Market data assets: vendor ticks -> `market_ticks` (validated, gaps filled from backups)
-> `vendor_candles` (vendor minutes where no ticks exist) -> `aggregates` (M1..W1)."""


import time
from collections.abc import Iterable, Mapping
from datetime import datetime, timedelta

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    AutomationCondition,
    Failure,
    FreshnessPolicy,
    Backoff,
    Jitter,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
    asset,
)

from assets.partitions import DAY_SYMBOL, DaySymbol, require_upstream, same_symbol_days
from models.market.candles import VENDOR_CANDLE_SUFFIX, bars_for_window, carried_bar_opens, vendor_m1_bars, window_lookback_start
from models.market.instruments import instrument
from models.market.quality import inconsistent_ohlc, inside_gaps, stored_violations, trading_gaps, validate_candles, validate_ticks
from models.market.ticks import MalformedTicksError, conform_ticks
from models.market.timeframes import ALL_TIMEFRAMES, bar_open_expr
from resources.conventions import MarketConventionsResource
from resources.market_data import MarketDataResource
from resources.vendors.base import (
    VENDOR_M1_SCHEMA,
    MarketDataVendor,
    VendorPayloadError,
    VendorRequestError,
    VendorUnavailableError,
)
from resources.warehouse import WarehouseResource
from resources.warehouse.market import (
    duplicate_bar_rows,
    read_bars,
    read_ticks,
    read_vendor_candles,
    write_bars,
    write_ticks,
    write_vendor_candles,
)

# Check name -> the validation reasons it covers. Each check reads the stored partition back
# and fails hard if any stored row breaks its rule, and warns if rows had to be quarantined.
TICK_CHECKS: Mapping[str, tuple[str, ...]] = {
    "quotes_not_crossed_or_locked": ("crossed_quote", "locked_quote"),
    "prices_finite_and_positive": ("non_finite_price", "non_positive_price", "no_price", "negative_size"),
    "timestamps_in_partition_and_sorted": ("missing_timestamp", "outside_partition", "wrong_symbol", "unsorted"),
    "no_duplicate_ticks": ("duplicate",),
    "plausible_spreads": ("implausible_spread",),
}
_GAP_CHECK = "no_gaps_in_trading_hours"
# Vendor outages and rate limits pass: retry the partition with exponential backoff.
_VENDOR_RETRY = RetryPolicy(max_retries=3, delay=5, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS)
_MAX_LISTED_GAPS = 20


def _tick_check_specs() -> list[AssetCheckSpec]:
    specs = [
        AssetCheckSpec(name, asset="market_ticks", description=f"stored ticks free of: {', '.join(reasons)}")
        for name, reasons in TICK_CHECKS.items()
    ]
    specs.append(
        AssetCheckSpec(_GAP_CHECK, asset="market_ticks", description="no silence longer than the limit while the market is open")
    )
    return specs


def _time_range_metadata(ts: pl.Series) -> dict[str, MetadataValue]:
    if ts.is_empty():
        return {"first_ts": MetadataValue.text("-"), "last_ts": MetadataValue.text("-")}
    return {"first_ts": MetadataValue.text(ts.min().isoformat()), "last_ts": MetadataValue.text(ts.max().isoformat())}


def _tick_check_results(
    stored: pl.DataFrame, partition: DaySymbol, quarantined: Mapping[str, int], conventions: MarketConventionsResource
) -> Iterable[AssetCheckResult]:
    violations = stored_violations(stored, partition.symbol, partition.start, partition.end, conventions.tick_rules)
    for name, reasons in TICK_CHECKS.items():
        in_store = sum(violations.get(r, 0) for r in reasons)
        in_quarantine = sum(quarantined.get(r, 0) for r in reasons)
        yield AssetCheckResult(
            check_name=name,
            passed=in_store == 0 and in_quarantine == 0,
            severity=AssetCheckSeverity.ERROR if in_store else AssetCheckSeverity.WARN,
            metadata={
                "stored_violations": in_store,
                "quarantined_rows": in_quarantine,
                **{f"quarantined_{r}": quarantined.get(r, 0) for r in reasons if quarantined.get(r, 0)},
            },
        )
    gaps = trading_gaps(
        stored["ts"], partition.start, partition.end, instrument(partition.symbol).asset_class, conventions.tick_rules.max_gap
    )
    listed = gaps.head(_MAX_LISTED_GAPS).with_columns(pl.col("gap_start", "gap_end").dt.to_string("%Y-%m-%d %H:%M:%S"))
    yield AssetCheckResult(
        check_name=_GAP_CHECK,
        passed=gaps.is_empty(),
        severity=AssetCheckSeverity.WARN,
        metadata={
            "gaps": gaps.height,
            "open_minutes_missing": int(gaps["open_minutes"].sum()) if gaps.height else 0,
            "max_gap_minutes": conventions.max_tick_gap_minutes,
            "longest_gaps": MetadataValue.md(_markdown_table(listed)) if gaps.height else MetadataValue.text("none"),
        },
    )


def _markdown_table(frame: pl.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * frame.width + "\n"
    return header + "\n".join("| " + " | ".join(str(v) for v in row) + " |" for row in frame.iter_rows())


@asset(
    partitions_def=DAY_SYMBOL,
    group_name="market_data",
    kinds={"clickhouse", "polars"},
    check_specs=_tick_check_specs(),
    retry_policy=_VENDOR_RETRY,
    # the daily schedule runs at 00:15 UTC: a day without a new partition by 02:00 is late
    freshness_policy=FreshnessPolicy.cron(deadline_cron="0 2 * * *", lower_bound_delta=timedelta(days=1)),
    description="Quotes and trades per symbol and UTC day, validated; bad rows go to market_ticks_quarantine.",
)
def market_ticks(
    context: AssetExecutionContext,
    warehouse: WarehouseResource,
    market_data: MarketDataResource,
    conventions: MarketConventionsResource,
) -> MaterializeResult:
    started = time.perf_counter()
    partition = DaySymbol.of(context)
    vendors = _vendors_or_fail(market_data, partition)
    primary, backups = vendors[0], vendors[1:]
    raw = _fetch(primary, partition)
    checked = validate_ticks(raw, partition.symbol, partition.start, partition.end, conventions.tick_rules)
    filled: dict[str, int] = {}
    backup_errors: dict[str, str] = {}
    for backup in backups:
        gaps = _gaps(checked.clean["ts"], partition, conventions)
        if gaps.is_empty():
            break
        try:
            extra = inside_gaps(_fetch(backup, partition, gaps["gap_start"].min(), gaps["gap_end"].max()), gaps)
        except VendorUnavailableError as exc:  # keep the primary's rows; the gap check shows the hole
            backup_errors[backup.source] = str(exc)
            context.log.warning(f"{partition.symbol} {partition.day}: backup {backup.source} unavailable: {exc}")
            continue
        filled[backup.source] = extra.height
        raw = pl.concat([raw, extra])
        checked = validate_ticks(raw, partition.symbol, partition.start, partition.end, conventions.tick_rules)
    fetched = time.perf_counter()
    with warehouse.session() as session:
        write_ticks(session, partition.symbol, partition.start, partition.end, checked.clean, checked.quarantine)
        stored = read_ticks(session, partition.symbol, partition.start, partition.end)
    per_source = dict(stored.group_by("source").len().iter_rows())
    context.log.info(
        f"{partition.symbol} {partition.day}: {raw.height:,} received, {stored.height:,} stored {per_source}, "
        f"{checked.quarantine.height:,} quarantined {checked.reason_counts or ''}"
    )
    return MaterializeResult(
        metadata={
            "dagster/row_count": stored.height,
            "received_rows": raw.height,
            "rows_per_source": MetadataValue.json(per_source),
            "primary": primary.source,
            "backup_rows_filled": MetadataValue.json(filled),
            **({"backup_errors": MetadataValue.json(backup_errors)} if backup_errors else {}),
            "quarantined_rows": checked.quarantine.height,
            "quarantine_reasons": MetadataValue.json(checked.reason_counts),
            "out_of_order_rows": checked.out_of_order,
            **_time_range_metadata(stored["ts"]),
            "fetch_seconds": round(fetched - started, 3),
            "duration_seconds": round(time.perf_counter() - started, 3),
            "warehouse": warehouse.describe(),
        },
        check_results=list(_tick_check_results(stored, partition, checked.reason_counts, conventions)),
    )


def _vendors_or_fail(market_data: MarketDataResource, partition: DaySymbol) -> list[MarketDataVendor]:
    try:
        return market_data.route(partition.symbol)
    except VendorRequestError as exc:
        raise Failure(description=str(exc), allow_retries=False) from exc


def _fetch(
    vendor: MarketDataVendor, partition: DaySymbol, start: datetime | None = None, end: datetime | None = None
) -> pl.DataFrame:
    """Ticks of one vendor, conformed. A payload that is not ticks, or a refused request,
    would be just as broken on a retry: fail once, clearly. Transient errors propagate to
    the RetryPolicy."""
    what = f"{partition.symbol} {partition.day} from {vendor.source}"
    try:
        return conform_ticks(vendor.fetch_ticks(partition.symbol, start or partition.start, end or partition.end))
    except (MalformedTicksError, VendorPayloadError, VendorRequestError) as exc:
        raise Failure(description=f"{what}: {exc}", allow_retries=False) from exc


def _gaps(ts: pl.Series, partition: DaySymbol, conventions: MarketConventionsResource) -> pl.DataFrame:
    return trading_gaps(ts, partition.start, partition.end, instrument(partition.symbol).asset_class, conventions.tick_rules.max_gap)


@asset(
    partitions_def=DAY_SYMBOL,
    group_name="market_data",
    kinds={"clickhouse", "polars"},
    deps=[AssetDep("market_ticks")],
    automation_condition=AutomationCondition.eager(),
    retry_policy=_VENDOR_RETRY,
    check_specs=[AssetCheckSpec("candles_consistent", asset="vendor_candles",
                                description="stored candles possible (finite, positive, low <= open, close <= high), one per minute, "
                                "none where ticks exist; warns when candles had to be quarantined")],
    description="Vendor one-minute candles for the open-market minutes the day's ticks leave empty (primary first, then "
                "backups); impossible candles go to vendor_candles_quarantine with their reason.",
)
def vendor_candles(
    context: AssetExecutionContext,
    warehouse: WarehouseResource,
    market_data: MarketDataResource,
    conventions: MarketConventionsResource,
) -> MaterializeResult:
    started = time.perf_counter()
    partition = DaySymbol.of(context)
    require_upstream(context, "market_ticks", partition)
    ticks = read_ticks(warehouse, partition.symbol, partition.start, partition.end)
    tick_minutes = ticks["ts"].dt.truncate("1m").unique().implode()
    frames, rejected, per_source = [], [], {}
    for vendor in _vendors_or_fail(market_data, partition):
        gaps = _gaps(pl.concat([ticks["ts"], *(f["ts"] for f in frames)]), partition, conventions)
        if gaps.is_empty():
            break
        try:
            candles = vendor.fetch_m1_bars(partition.symbol, partition.start, partition.end)
        except (VendorPayloadError, VendorRequestError) as exc:
            raise Failure(description=f"{partition.symbol} {partition.day} candles from {vendor.source}: {exc}", allow_retries=False) from exc
        if candles is None:
            continue
        # Impossible candles go to quarantine and fill nothing: a later vendor may cover the minute.
        source = pl.lit(vendor.source + VENDOR_CANDLE_SUFFIX).alias("source")
        checked = validate_candles(candles, partition.start, partition.end)
        rejected.append(checked.quarantine.with_columns(source))
        taken = pl.concat(f["ts"] for f in frames) if frames else pl.Series("ts", [], dtype=candles.schema["ts"])
        fresh = checked.clean.filter(~pl.col("ts").is_in(tick_minutes) & ~pl.col("ts").is_in(taken.implode()))
        per_source[vendor.source] = fresh.height
        frames.append(fresh.with_columns(source))
    rows = pl.concat(frames).sort("ts") if frames else pl.DataFrame(schema={**VENDOR_M1_SCHEMA, "source": pl.String()})
    quarantine = pl.concat(rejected) if rejected else pl.DataFrame(schema={**VENDOR_M1_SCHEMA, "reason": pl.String(), "source": pl.String()})
    with warehouse.session() as session:
        write_vendor_candles(session, partition.symbol, partition.start, partition.end, rows, quarantine)
        stored = read_vendor_candles(session, partition.symbol, partition.start, partition.end)
    in_store = validate_candles(stored.drop("symbol", "source"), partition.start, partition.end).reason_counts
    overlap = stored.filter(pl.col("ts").is_in(tick_minutes)).height
    reasons = dict(quarantine.group_by("reason").len().iter_rows())
    context.log.info(f"{partition.symbol} {partition.day}: {stored.height:,} vendor candles {per_source}, "
                     f"{quarantine.height:,} quarantined {reasons or ''}")
    return MaterializeResult(
        metadata={"dagster/row_count": stored.height, "candles_per_source": MetadataValue.json(per_source),
                  "quarantined_rows": quarantine.height, "quarantine_reasons": MetadataValue.json(reasons),
                  "duration_seconds": round(time.perf_counter() - started, 3)},
        check_results=[AssetCheckResult(
            check_name="candles_consistent",
            passed=not in_store and overlap == 0 and quarantine.is_empty(),
            severity=AssetCheckSeverity.ERROR if in_store or overlap else AssetCheckSeverity.WARN,
            metadata={"stored_violations": MetadataValue.json(in_store), "minutes_also_in_ticks": overlap,
                      "quarantined_rows": quarantine.height},
        )],
    )


# A W1 bar (and an H4/D1 bar under the 17:00 New York boundary) opens up to 7 days before
# the day it overlaps, so each day's candles read that many days of ticks back.
_TICKS_LOOKBACK = same_symbol_days(start_offset=-7)


def _bar_check_results(
    bars: pl.DataFrame,
    duplicates: int,
    ticks_in_day: int,
    partition: DaySymbol,
    conventions: MarketConventionsResource,
) -> Iterable[AssetCheckResult]:
    price_ok = (
        ~inconsistent_ohlc()
        & (pl.col("low") > 0)
        & (pl.col("tick_count") > 0)
        & (pl.col("spread_mean").fill_null(0) >= 0)
        & (pl.col("bid_close").fill_null(0) <= pl.col("ask_close").fill_null(float("inf")))
    )
    broken = bars.filter(~price_ok)
    yield AssetCheckResult(
        check_name="ohlc_consistent",
        passed=broken.is_empty(),
        metadata={"inconsistent_bars": broken.height, "bars": bars.height},
    )
    misaligned = sum(
        bars.filter(
            (pl.col("timeframe") == tf.value) & (bar_open_expr(pl.col("ts"), tf, conventions.day_boundary) != pl.col("ts"))
        ).height
        for tf in ALL_TIMEFRAMES
    )
    yield AssetCheckResult(
        check_name="bars_unique_and_aligned",
        passed=misaligned == 0 and duplicates == 0,
        metadata={"misaligned_bars": misaligned, "duplicate_bars": duplicates},
    )
    in_day = bars.filter(pl.col("ts") >= partition.start)
    counted = {tf.value: int(in_day.filter(pl.col("timeframe") == tf.value)["tick_count"].sum()) for tf in ALL_TIMEFRAMES[:5]}
    yield AssetCheckResult(
        check_name="every_tick_in_a_bar",
        passed=all(n == ticks_in_day for n in counted.values()),
        description="intraday bars (M1..H1) of the day count exactly the day's stored ticks",
        metadata={"ticks": ticks_in_day, **{f"ticks_in_{tf}": n for tf, n in counted.items()}},
    )


@asset(
    partitions_def=DAY_SYMBOL,
    group_name="market_data",
    kinds={"clickhouse", "polars"},
    deps=[AssetDep("market_ticks", partition_mapping=_TICKS_LOOKBACK), AssetDep("vendor_candles", partition_mapping=_TICKS_LOOKBACK)],
    automation_condition=AutomationCondition.eager(),
    check_specs=[
        AssetCheckSpec("ohlc_consistent", asset="aggregates", description="low <= open, close <= high; no empty bars"),
        AssetCheckSpec("bars_unique_and_aligned", asset="aggregates", description="one bar per key, on its boundary"),
        AssetCheckSpec("every_tick_in_a_bar", asset="aggregates", description="bars count every stored tick"),
    ],
    description="OHLCV candles M1..W1 of every bar overlapping the day, from market_ticks and, for minutes without ticks, vendor_candles.",
)
def aggregates(
    context: AssetExecutionContext, warehouse: WarehouseResource, conventions: MarketConventionsResource
) -> MaterializeResult:
    started = time.perf_counter()
    partition = DaySymbol.of(context)
    require_upstream(context, "market_ticks", partition)
    boundary = conventions.day_boundary
    lookback = window_lookback_start(partition.start, ALL_TIMEFRAMES, boundary)
    with warehouse.session() as session:
        ticks = read_ticks(session, partition.symbol, lookback, partition.end)
        candles = read_vendor_candles(session, partition.symbol, lookback, partition.end)
    vendor_m1 = vendor_m1_bars(candles, partition.symbol)
    bars = bars_for_window(ticks.drop("seq"), partition.start, ALL_TIMEFRAMES, boundary, vendor_m1)
    with warehouse.session() as session:
        write_bars(session, partition.symbol, bars, partition.start, partition.end,
                   carried_bar_opens(partition.start, ALL_TIMEFRAMES, boundary))
        stored = read_bars(session, partition.symbol, start=lookback, end=partition.end).filter(
            pl.col("covered_until") == partition.end
        )
        duplicates = duplicate_bar_rows(session, partition.symbol, partition.end)
    # vendor candles count the ticks the vendor says made them
    tick_minutes = ticks["ts"].dt.truncate("1m").unique().implode()
    used_candles = vendor_m1.filter((pl.col("ts") >= partition.start) & ~pl.col("ts").is_in(tick_minutes))
    ticks_in_day = ticks.filter(pl.col("ts") >= partition.start).height + int(used_candles["tick_count"].sum())
    per_timeframe = dict(stored.group_by("timeframe").len().iter_rows())
    context.log.info(f"{partition.symbol} {partition.day}: {stored.height:,} bars from {ticks_in_day:,} ticks")
    return MaterializeResult(
        metadata={
            "dagster/row_count": stored.height,
            **{f"bars_{tf.value}": per_timeframe.get(tf.value, 0) for tf in ALL_TIMEFRAMES},
            "ticks_read": ticks.height,
            "vendor_candles_used": used_candles.height,
            "day_boundary": boundary.value,
            **_time_range_metadata(stored["ts"]),
            "duration_seconds": round(time.perf_counter() - started, 3),
        },
        check_results=list(_bar_check_results(stored, duplicates, ticks_in_day, partition, conventions)),
    )
