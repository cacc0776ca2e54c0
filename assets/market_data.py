"""Market data assets: vendor ticks -> `market_ticks` (validated, gaps filled from backups)
-> `vendor_candles` (vendor bars where no ticks exist, at their own timeframe) -> `aggregates`
(M1..W1).

A run covers one day or a range of days (the single-run backfill policy: a year is one run),
processed in chunks of days so memory stays flat, each chunk replacing its day partitions
all or nothing. Every row a vendor sent is stored or quarantined with a reason, and the
metadata says so: ``received_rows = dagster/row_count + quarantined_rows``.
"""

import time
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from datetime import date, datetime, timedelta

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    AutomationCondition,
    Backoff,
    Failure,
    FreshnessPolicy,
    Jitter,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
    asset,
)

from assets.partitions import DAY_SYMBOL, RANGE_AS_ONE_RUN, chunks, day_start, days_by_symbol, require_upstream
from assets.progress import Progress
from models.market.candles import bars_for_window, vendor_bars, vendor_source, window_lookback_start
from models.market.instruments import instrument
from models.market.quality import (
    bar_coverage,
    inconsistent_ohlc,
    inside_gaps,
    stored_violations,
    trading_gaps,
    validate_candles,
    validate_ticks,
)
from models.market.ticks import TS, MalformedTicksError, conform_ticks
from models.market.timeframes import ALL_TIMEFRAMES, Timeframe, bar_close_expr, bar_open_expr
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
    bar_writes,
    read_filed_bars,
    read_tick_count,
    read_tick_minutes,
    read_ticks,
    read_vendor_candles,
    ticks_writes,
    vendor_candle_writes,
)

# Check name -> the validation reasons it covers. Each check reads the stored partitions back
# and fails hard if any stored row breaks its rule, and warns if rows had to be quarantined.
TICK_CHECKS: Mapping[str, tuple[str, ...]] = {
    "quotes_not_crossed_or_locked": ("crossed_quote", "locked_quote"),
    "prices_finite_and_positive": ("non_finite_price", "non_positive_price", "implausible_price", "no_price", "negative_size"),
    "timestamps_in_partition_and_sorted": ("missing_timestamp", "outside_partition", "wrong_symbol", "unsorted"),
    "no_duplicate_ticks": ("duplicate",),
    "plausible_spreads": ("implausible_spread",),
}
# Rows a better source already covers: quarantined so every row read is accounted for, but no fault.
COVERED_BY_PRIMARY = "covered_by_primary"
COVERED_BY_TICKS = "covered_by_ticks"
COVERED_BY_EARLIER_VENDOR = "covered_by_earlier_vendor"
_SUPERSEDED = (COVERED_BY_PRIMARY, COVERED_BY_TICKS, COVERED_BY_EARLIER_VENDOR)
_GAP_CHECK = "no_gaps_in_trading_hours"
# Vendor outages and rate limits pass: retry the run with exponential backoff.
_VENDOR_RETRY = RetryPolicy(max_retries=3, delay=5, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS)
_MAX_LISTED_GAPS = 20
_TICKS_PER_CHUNK = 3_000_000  # candles from this many ticks at a time (plus the week before): memory stays flat


def _tick_check_specs() -> list[AssetCheckSpec]:
    specs = [
        AssetCheckSpec(name, asset="market_ticks", description=f"stored ticks free of: {', '.join(reasons)}")
        for name, reasons in TICK_CHECKS.items()
    ]
    specs.append(AssetCheckSpec(_GAP_CHECK, asset="market_ticks", description=(
        "no tick silence longer than the limit while the market is open (passes for a route that serves bars only)")))
    return specs


def _time_range_metadata(first: datetime | None, last: datetime | None) -> dict[str, MetadataValue]:
    return {"first_ts": MetadataValue.text(first.isoformat() if first else "-"),
            "last_ts": MetadataValue.text(last.isoformat() if last else "-")}


def _markdown_table(frame: pl.DataFrame) -> str:
    header = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * frame.width + "\n"
    return header + "\n".join("| " + " | ".join(str(v) for v in row) + " |" for row in frame.iter_rows())


def _gap_result(name: str, gaps: list[pl.DataFrame], max_gap_minutes: float, applicable: bool, note: str = "") -> AssetCheckResult:
    found = pl.concat(gaps) if gaps else pl.DataFrame(schema={"symbol": pl.String(), "gap_start": TS, "gap_end": TS,
                                                             "open_minutes": pl.Int64()})
    listed = found.sort("open_minutes", descending=True).head(_MAX_LISTED_GAPS).with_columns(
        pl.col("gap_start", "gap_end").dt.to_string("%Y-%m-%d %H:%M:%S"))
    metadata = {
        "gaps": found.height,
        "open_minutes_missing": int(found["open_minutes"].sum()) if found.height else 0,
        "max_gap_minutes": max_gap_minutes,
        "longest_gaps": MetadataValue.md(_markdown_table(listed)) if found.height else MetadataValue.text("none"),
    }
    if not applicable:
        metadata["not_applicable"] = MetadataValue.text(note)
    return AssetCheckResult(check_name=name, passed=found.is_empty(), severity=AssetCheckSeverity.WARN, metadata=metadata)


def _vendors_or_fail(market_data: MarketDataResource, symbol: str) -> list[MarketDataVendor]:
    try:
        return market_data.route(symbol)
    except VendorRequestError as exc:
        raise Failure(description=str(exc), allow_retries=False) from exc


def _fetch(vendor: MarketDataVendor, symbol: str, start: datetime, end: datetime) -> pl.DataFrame:
    """Ticks of one vendor, conformed. A payload that is not ticks, or a refused request,
    would be just as broken on a retry: fail once, clearly. Transient errors propagate to
    the RetryPolicy."""
    what = f"{symbol} {start:%Y-%m-%d %H:%M}..{end:%Y-%m-%d %H:%M} from {vendor.source}"
    try:
        return conform_ticks(vendor.fetch_ticks(symbol, start, end))
    except (MalformedTicksError, VendorPayloadError, VendorRequestError) as exc:
        raise Failure(description=f"{what}: {exc}", allow_retries=False) from exc


def _filed_by_day(rows: pl.DataFrame, days: Sequence[date]) -> pl.DataFrame:
    """``day``: the partition a row is filed under, its own UTC day, or the range's first day
    for a row without a time or outside the range (quarantined there as outside_partition)."""
    first, last = days[0], days[-1]
    own = pl.col("ts").dt.date()
    return rows.with_columns(pl.when(own.is_between(first, last)).then(own).otherwise(pl.lit(first)).alias("day"))


def _days_of(raw: pl.DataFrame, chunk: Sequence[date], every_day: bool):
    """(day, its rows) for the days to validate: every day where ticks are expected (its
    silences may need a backup), only days with rows for a bars-only route."""
    days = chunk if every_day or raw.height else []
    if raw.height and not every_day:
        days = sorted(set(raw["day"].to_list()))
    for day in days:
        yield day, raw.filter(pl.col("day") == day).drop("day")
    if not days:  # an empty chunk still writes (and commits) its days: nothing, validated as nothing
        yield chunk[0], raw.drop("day")


def _ticks_of_day(
    symbol: str,
    day: date,
    rows: pl.DataFrame,
    backups: Sequence[MarketDataVendor],
    conventions: MarketConventionsResource,
    band: tuple[float, float],
    context: AssetExecutionContext,
    tally: Counter,
    backup_errors: dict[str, str],
) -> tuple[pl.DataFrame, pl.DataFrame, int]:
    """One day's clean ticks (with ``seq``), its quarantine (``reason``) and out-of-order
    count, the primary's silences filled from the backups, each gap fetched on its own so a
    backup row is either used or accounted for as covered by the primary."""
    start = day_start(day)
    end = start + timedelta(days=1)
    rules, asset_class = conventions.tick_rules, instrument(symbol).asset_class
    checked = validate_ticks(rows, symbol, start, end, rules, band)
    superseded: list[pl.DataFrame] = []
    for backup in backups:
        gaps = trading_gaps(checked.clean["ts"], start, end, asset_class, rules.max_gap)
        if gaps.is_empty():
            break
        added = []
        for gap in gaps.iter_slices(1):
            try:
                fetched = _fetch(backup, symbol, gap["gap_start"][0], gap["gap_end"][0])
            except VendorUnavailableError as exc:  # keep what is there; the gap check shows the hole
                backup_errors[backup.source] = str(exc)
                context.log.warning(f"{symbol} {day}: backup {backup.source} unavailable: {exc}")
                break
            tally["received"] += fetched.height
            inside = inside_gaps(fetched, gap)
            added.append(inside)
            outside = fetched.filter(~pl.col("ts").is_in(inside["ts"].implode()))
            superseded.append(outside.with_columns(pl.lit(COVERED_BY_PRIMARY).alias("reason")))
        if added:
            extra = pl.concat(added)
            tally[f"filled:{backup.source}"] += extra.height
            rows = pl.concat([rows, extra])
            checked = validate_ticks(rows, symbol, start, end, rules, band)
    quarantine = pl.concat([checked.quarantine, *superseded], how="diagonal_relaxed") if superseded else checked.quarantine
    return checked.clean, quarantine.with_columns(pl.lit(day).alias("day")), checked.out_of_order


@asset(
    partitions_def=DAY_SYMBOL,
    backfill_policy=RANGE_AS_ONE_RUN,
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
    started, fetch_seconds = time.perf_counter(), 0.0
    partitions = days_by_symbol(context)
    progress = Progress(context, "market_ticks", sum(len(d) for d in partitions.values()))
    tally: Counter = Counter()
    reasons: Counter = Counter()
    in_store: Counter = Counter()
    per_source: Counter = Counter()
    backup_errors: dict[str, str] = {}
    gaps: list[pl.DataFrame] = []
    no_tick_routes: list[str] = []
    first_ts = last_ts = None
    primaries = set()
    for symbol, days in partitions.items():
        vendors = _vendors_or_fail(market_data, symbol)
        primaries.add(vendors[0].source)
        band = conventions.band(symbol)
        serves_ticks = any(vendor.serves_ticks(symbol) for vendor in vendors)
        if not serves_ticks:
            no_tick_routes.append(symbol)
        first_batch = 0
        for chunk in chunks(days, vendors[0].fetch_days(symbol)):
            t0 = time.perf_counter()
            raw = _filed_by_day(_fetch(vendors[0], symbol, day_start(chunk[0]), day_start(chunk[-1]) + timedelta(days=1)), chunk)
            tally["received"] += raw.height
            clean, rejected = [], []
            for day, rows in _days_of(raw, chunk, serves_ticks or bool(vendors[1:])):
                kept, quarantined, out_of_order = _ticks_of_day(
                    symbol, day, rows, vendors[1:], conventions, band, context, tally, backup_errors)
                clean.append(kept)
                rejected.append(quarantined)
                tally["out_of_order"] += out_of_order
            fetch_seconds += time.perf_counter() - t0
            clean_rows = pl.concat(clean)
            quarantine = pl.concat(rejected, how="diagonal_relaxed")
            with warehouse.session() as session:
                batch = session.replace(*ticks_writes(symbol, chunk, clean_rows, quarantine), cleanup=False)
                first_batch = first_batch or batch
                stored = read_ticks(session, symbol, day_start(chunk[0]), day_start(chunk[-1]) + timedelta(days=1))
            tally["stored"] += stored.height
            tally["quarantined"] += quarantine.height
            reasons.update(dict(quarantine.group_by("reason").len().iter_rows()))
            per_source.update(dict(stored.group_by("source").len().iter_rows()))
            for day in chunk if stored.height or serves_ticks else []:  # a bars-only route stores no tick to check
                start = day_start(day)
                of_day = stored.filter(pl.col("ts").dt.date() == day)
                in_store.update(stored_violations(of_day, symbol, start, start + timedelta(days=1), conventions.tick_rules, band))
                if serves_ticks:
                    found = trading_gaps(of_day["ts"], start, start + timedelta(days=1), instrument(symbol).asset_class,
                                         conventions.tick_rules.max_gap)
                    if found.height:
                        gaps.append(found.select(pl.lit(symbol).alias("symbol"), pl.all()))
            if stored.height:
                first_ts = min(filter(None, [first_ts, stored["ts"].min()]))
                last_ts = max(filter(None, [last_ts, stored["ts"].max()]))
            progress.advance(symbol, chunk, f"{stored.height:,} ticks, {quarantine.height:,} quarantined")
        with warehouse.session() as session:  # what earlier runs stored for these days: one delete per run
            session.remove_superseded(*ticks_writes(symbol, days, clean_rows.clear(), quarantine.clear()), before=first_batch)
    if tally["received"] != tally["stored"] + tally["quarantined"]:
        raise Failure(description=f"rows unaccounted for: received {tally['received']:,}, stored {tally['stored']:,}, "
                                  f"quarantined {tally['quarantined']:,}", allow_retries=False)
    bad_reasons = {r: n for r, n in reasons.items() if r not in _SUPERSEDED}
    checks = [
        AssetCheckResult(
            check_name=name,
            passed=sum(in_store.get(r, 0) for r in covered) == 0 and sum(bad_reasons.get(r, 0) for r in covered) == 0,
            severity=AssetCheckSeverity.ERROR if sum(in_store.get(r, 0) for r in covered) else AssetCheckSeverity.WARN,
            metadata={
                "stored_violations": sum(in_store.get(r, 0) for r in covered),
                "quarantined_rows": sum(bad_reasons.get(r, 0) for r in covered),
                **{f"quarantined_{r}": bad_reasons[r] for r in covered if bad_reasons.get(r)},
            },
        )
        for name, covered in TICK_CHECKS.items()
    ]
    checks.append(_gap_result(_GAP_CHECK, gaps, conventions.max_tick_gap_minutes, not no_tick_routes,
                              f"the route of {', '.join(no_tick_routes)} serves bars only: their gaps are checked on "
                              "vendor_candles at the bars' resolution"))
    context.log.info(f"{progress.describe()}: {tally['received']:,} received = {tally['stored']:,} stored "
                     f"+ {tally['quarantined']:,} quarantined {dict(reasons) or ''}")
    return MaterializeResult(
        metadata={
            "dagster/row_count": tally["stored"],
            "received_rows": tally["received"],
            "rows_per_source": MetadataValue.json(dict(per_source)),
            "primary": ", ".join(sorted(primaries)),
            "backup_rows_filled": MetadataValue.json({k.split(":", 1)[1]: v for k, v in tally.items() if k.startswith("filled:")}),
            **({"backup_errors": MetadataValue.json(backup_errors)} if backup_errors else {}),
            "quarantined_rows": tally["quarantined"],
            "quarantine_reasons": MetadataValue.json(dict(reasons)),
            "out_of_order_rows": tally["out_of_order"],
            "days": progress.total,
            **_time_range_metadata(first_ts, last_ts),
            "fetch_seconds": round(fetch_seconds, 3),
            "duration_seconds": round(time.perf_counter() - started, 3),
            "warehouse": warehouse.describe(),
        },
        check_results=checks,
    )


_CANDLE_QUARANTINE_SCHEMA = {"timeframe": pl.String(), **VENDOR_M1_SCHEMA, "reason": pl.String(), "source": pl.String(),
                             "day": pl.Date()}


@asset(
    partitions_def=DAY_SYMBOL,
    backfill_policy=RANGE_AS_ONE_RUN,
    group_name="market_data",
    kinds={"clickhouse", "polars"},
    deps=[AssetDep("market_ticks")],
    automation_condition=AutomationCondition.eager(),
    retry_policy=_VENDOR_RETRY,
    check_specs=[
        AssetCheckSpec("candles_consistent", asset="vendor_candles",
                       description="stored bars possible (finite, positive, plausible, low <= open, close <= high), one per "
                       "interval, none where ticks exist; warns when bars had to be quarantined as impossible"),
        AssetCheckSpec(_GAP_CHECK, asset="vendor_candles",
                       description="no silence longer than the limit while the market is open, ticks and bars together, "
                       "at the data's resolution (a missing H1 bar is a 60-minute silence)"),
    ],
    description="Vendor bars, at the timeframe the vendor serves (M1 from Polygon and Dukascopy, whatever a file holds), "
                "for the open-market intervals the day's ticks leave empty (primary first, then backups); impossible "
                "bars go to vendor_candles_quarantine with their reason.",
)
def vendor_candles(
    context: AssetExecutionContext,
    warehouse: WarehouseResource,
    market_data: MarketDataResource,
    conventions: MarketConventionsResource,
) -> MaterializeResult:
    started = time.perf_counter()
    partitions = days_by_symbol(context)
    progress = Progress(context, "vendor_candles", sum(len(d) for d in partitions.values()))
    tally: Counter = Counter()
    reasons: Counter = Counter()
    per_source: Counter = Counter()
    in_store: Counter = Counter()
    gaps: list[pl.DataFrame] = []
    overlap = 0
    for symbol, days in partitions.items():
        require_upstream(context, "market_ticks", symbol, days)
        vendors = _vendors_or_fail(market_data, symbol)
        band, asset_class = conventions.band(symbol), instrument(symbol).asset_class
        first_batch = 0
        for chunk in chunks(days, max(v.fetch_days(symbol) for v in vendors)):
            start, end = day_start(chunk[0]), day_start(chunk[-1]) + timedelta(days=1)
            tick_minutes = read_tick_minutes(warehouse, symbol, start, end)
            taken = tick_minutes  # minute starts some source covers
            coverage = bar_coverage(tick_minutes, "M1")
            used, rejected = [], []
            for vendor in vendors:
                if trading_gaps(coverage.sort(), start, end, asset_class, conventions.tick_rules.max_gap).is_empty():
                    break
                try:
                    served = vendor.fetch_bars(symbol, start, end)
                except (VendorPayloadError, VendorRequestError) as exc:
                    raise Failure(description=f"{symbol} {chunk[0]}..{chunk[-1]} bars from {vendor.source}: {exc}",
                                  allow_retries=False) from exc
                if served is None:
                    continue
                served = served.with_columns(vendor_source(vendor.source, pl.col("timeframe")).alias("source"))
                tally["received"] += served.height
                checked = validate_candles(served, start, end, band, conventions.day_boundary)
                rejected.append(checked.quarantine)
                overlaps_ticks = _overlaps(checked.clean, tick_minutes)
                overlaps_taken = _overlaps(checked.clean, taken) & ~overlaps_ticks
                fresh = checked.clean.filter(~overlaps_ticks & ~overlaps_taken)
                rejected.append(checked.clean.filter(overlaps_ticks).with_columns(pl.lit(COVERED_BY_TICKS).alias("reason")))
                rejected.append(checked.clean.filter(overlaps_taken).with_columns(pl.lit(COVERED_BY_EARLIER_VENDOR).alias("reason")))
                per_source[vendor.source] += fresh.height
                used.append(fresh)
                taken = pl.concat([taken, bar_coverage(fresh["ts"], fresh["timeframe"], with_end=False)]).unique().sort()
                coverage = pl.concat([coverage, bar_coverage(fresh["ts"], fresh["timeframe"])])
            rows = pl.concat(used).sort("ts") if used else pl.DataFrame(schema={"timeframe": pl.String(), **VENDOR_M1_SCHEMA,
                                                                                 "source": pl.String()})
            quarantine = _filed_by_day(pl.concat(rejected, how="diagonal_relaxed"), chunk) if rejected else \
                pl.DataFrame(schema=_CANDLE_QUARANTINE_SCHEMA)
            with warehouse.session() as session:
                batch = session.replace(*vendor_candle_writes(symbol, chunk, rows, quarantine), cleanup=False)
                first_batch = first_batch or batch
                stored = read_vendor_candles(session, symbol, start, end)
            tally["stored"] += stored.height
            tally["quarantined"] += quarantine.height
            reasons.update(dict(quarantine.group_by("reason").len().iter_rows()))
            in_store.update(validate_candles(stored.drop("symbol"), start, end, band, conventions.day_boundary).reason_counts)
            overlap += int(_overlaps(stored, tick_minutes).sum())
            coverage = pl.concat([bar_coverage(tick_minutes, "M1"), bar_coverage(stored["ts"], stored["timeframe"])]).sort()
            for day in chunk:
                day_from = day_start(day)
                found = trading_gaps(coverage.filter(coverage.dt.date() == day), day_from, day_from + timedelta(days=1),
                                     asset_class, conventions.tick_rules.max_gap)
                if found.height:
                    gaps.append(found.select(pl.lit(symbol).alias("symbol"), pl.all()))
            progress.advance(symbol, chunk, f"{stored.height:,} bars used, {quarantine.height:,} quarantined")
        with warehouse.session() as session:
            session.remove_superseded(*vendor_candle_writes(symbol, days, rows.clear(), quarantine.clear()), before=first_batch)
    if tally["received"] != tally["stored"] + tally["quarantined"]:
        raise Failure(description=f"bars unaccounted for: received {tally['received']:,}, stored {tally['stored']:,}, "
                                  f"quarantined {tally['quarantined']:,}", allow_retries=False)
    impossible = {r: n for r, n in reasons.items() if r not in _SUPERSEDED}
    context.log.info(f"{progress.describe()}: {tally['received']:,} bars received = {tally['stored']:,} used "
                     f"+ {tally['quarantined']:,} quarantined {dict(reasons) or ''}")
    return MaterializeResult(
        metadata={"dagster/row_count": tally["stored"], "received_rows": tally["received"],
                  "candles_per_source": MetadataValue.json(dict(per_source)),
                  "quarantined_rows": tally["quarantined"], "quarantine_reasons": MetadataValue.json(dict(reasons)),
                  "days": progress.total, "duration_seconds": round(time.perf_counter() - started, 3)},
        check_results=[
            AssetCheckResult(
                check_name="candles_consistent",
                passed=not in_store and overlap == 0 and not impossible,
                severity=AssetCheckSeverity.ERROR if in_store or overlap else AssetCheckSeverity.WARN,
                metadata={"stored_violations": MetadataValue.json(dict(in_store)), "minutes_also_in_ticks": overlap,
                          "quarantined_impossible": MetadataValue.json(impossible)},
            ),
            _gap_result(_GAP_CHECK, gaps, conventions.max_tick_gap_minutes, True),
        ],
    )


def _overlaps(bars: pl.DataFrame, minutes: pl.Series) -> pl.Series:
    """Per bar, whether any of ``minutes`` (sorted minute starts) falls inside its interval."""
    if bars.is_empty() or minutes.is_empty():
        return pl.Series([False] * bars.height, dtype=pl.Boolean)
    import numpy as np

    opens = bars["ts"].cast(TS).dt.epoch("ms").to_numpy()
    lengths = bars["timeframe"].replace_strict({tf.value: tf.minutes * 60_000 for tf in Timeframe}, return_dtype=pl.Int64).to_numpy()
    points = np.unique(minutes.cast(TS).dt.epoch("ms").to_numpy())
    first_inside = np.searchsorted(points, opens, side="left")
    return pl.Series(first_inside < np.searchsorted(points, opens + lengths, side="left"))


def _bar_faults(bars: pl.DataFrame, boundary) -> Counter:
    """Stored bars that break a rule, counted per chunk (only the counts are kept: a run of
    ten years holds one chunk of bars in memory at a time)."""
    price_ok = (
        ~inconsistent_ohlc()
        & (pl.col("low") > 0)
        & (pl.col("tick_count") > 0)
        & (pl.col("spread_mean").fill_null(0) >= 0)
        & (pl.col("bid_close").fill_null(0) <= pl.col("ask_close").fill_null(float("inf")))
    )
    misaligned = sum(
        bars.filter((pl.col("timeframe") == tf.value) & (bar_open_expr(pl.col("ts"), tf, boundary) != pl.col("ts"))).height
        for tf in ALL_TIMEFRAMES
    )
    return Counter({"bars": bars.height, "inconsistent": bars.filter(~price_ok).height, "misaligned": misaligned,
                    "duplicates": bars.height - bars.unique(["timeframe", "ts"]).height})


def _bar_check_results(faults: Counter, expected: Mapping[str, int], counted: Mapping[str, int]) -> Iterable[AssetCheckResult]:
    yield AssetCheckResult(
        check_name="ohlc_consistent",
        passed=faults["inconsistent"] == 0,
        metadata={"inconsistent_bars": faults["inconsistent"], "bars": faults["bars"]},
    )
    yield AssetCheckResult(
        check_name="bars_unique_and_aligned",
        passed=faults["misaligned"] == 0 and faults["duplicates"] == 0,
        metadata={"misaligned_bars": faults["misaligned"], "duplicate_bars": faults["duplicates"]},
    )
    yield AssetCheckResult(
        check_name="every_tick_in_a_bar",
        passed=all(counted.get(tf, 0) == n for tf, n in expected.items()),
        description="intraday bars (M1..H1) of each day count exactly its stored ticks and the vendor bars' ticks "
                    "(vendor bars only at their own timeframe and above)",
        metadata={**{f"expected_{tf}": n for tf, n in expected.items()}, **{f"ticks_in_{tf}": n for tf, n in counted.items()}},
    )


_INTRADAY = ALL_TIMEFRAMES[:5]  # M1..H1: inside a UTC day under either boundary


@asset(
    partitions_def=DAY_SYMBOL,
    backfill_policy=RANGE_AS_ONE_RUN,
    group_name="market_data",
    kinds={"clickhouse", "polars"},
    deps=[AssetDep("market_ticks"), AssetDep("vendor_candles")],
    automation_condition=AutomationCondition.eager(),
    check_specs=[
        AssetCheckSpec("ohlc_consistent", asset="aggregates", blocking=True,
                       description="low <= open, close <= high; no empty bars"),
        AssetCheckSpec("bars_unique_and_aligned", asset="aggregates", blocking=True,
                       description="one bar per key, on its boundary"),
        AssetCheckSpec("every_tick_in_a_bar", asset="aggregates", blocking=True, description="bars count every stored tick"),
    ],
    description="OHLCV candles M1..W1 of every bar overlapping the days, from market_ticks and, for intervals without "
                "ticks, vendor_candles at their own timeframe and above; multi-day bars read the week's earlier ticks "
                "from the warehouse. ERROR checks block ml_features.",
)
def aggregates(
    context: AssetExecutionContext, warehouse: WarehouseResource, conventions: MarketConventionsResource
) -> MaterializeResult:
    started = time.perf_counter()
    boundary = conventions.day_boundary
    partitions = days_by_symbol(context)
    progress = Progress(context, "aggregates", sum(len(d) for d in partitions.values()))
    per_timeframe: Counter = Counter()
    expected: Counter = Counter()
    counted: Counter = Counter()
    ticks_read = vendor_used = 0
    faults: Counter = Counter()
    first_ts = last_ts = None
    for symbol, days in partitions.items():
        require_upstream(context, "market_ticks", symbol, days)
        first_batch = 0
        for chunk in chunks(days, _bar_chunk_days(warehouse, symbol, days)):
            start, end = day_start(chunk[0]), day_start(chunk[-1]) + timedelta(days=1)
            lookback = window_lookback_start(start, ALL_TIMEFRAMES, boundary)
            with warehouse.session() as session:
                ticks = read_ticks(session, symbol, lookback, end)
                candles = read_vendor_candles(session, symbol, lookback, end)
            served = vendor_bars(candles, symbol)
            bars = bars_for_window(ticks.drop("seq"), start, ALL_TIMEFRAMES, boundary, served)
            # each bar is filed under the last day of data in it: its own day, or the chunk's last
            bars = bars.with_columns(_close_of(bars, boundary).alias("closes")).with_columns(
                (pl.min_horizontal(pl.col("closes"), pl.lit(end).cast(TS)).dt.offset_by("-1ms").dt.truncate("1d")
                 .dt.offset_by("1d")).alias("covered_until")).drop("closes")
            with warehouse.session() as session:
                batch = session.replace(bar_writes(symbol, chunk, bars), cleanup=False)
                first_batch = first_batch or batch
                stored = read_filed_bars(session, symbol, start, end)
            # what the day's intraday bars must count: its ticks, and the ticks behind vendor
            # bars of each timeframe up to the bar's own (a vendor's H1 is in H1, not in M1)
            in_range = pl.col("ts") >= start
            ticks_in_range = ticks.filter(in_range).height
            ticks_read += ticks.height
            used = served.filter(in_range).join(
                stored.select("timeframe", "ts", "source"), on=["timeframe", "ts", "source"], how="semi")
            vendor_used += used.height
            for position, tf in enumerate(_INTRADAY):
                finer = [t.value for t in _INTRADAY[: position + 1]]
                expected[tf.value] += ticks_in_range + int(used.filter(pl.col("timeframe").is_in(finer))["tick_count"].sum())
                counted[tf.value] += int(stored.filter((pl.col("timeframe") == tf.value) & in_range)["tick_count"].sum())
            per_timeframe.update(dict(stored.group_by("timeframe").len().iter_rows()))
            faults.update(_bar_faults(stored, boundary))
            if stored.height:
                first_ts = min(filter(None, [first_ts, stored["ts"].min()]))
                last_ts = max(filter(None, [last_ts, stored["ts"].max()]))
            progress.advance(symbol, chunk, f"{stored.height:,} bars from {ticks_in_range:,} ticks and {used.height:,} vendor bars")
        with warehouse.session() as session:
            session.remove_superseded(bar_writes(symbol, days, bars.clear()), before=first_batch)
    context.log.info(f"{progress.describe()}: {faults['bars']:,} bars {dict(per_timeframe)}")
    return MaterializeResult(
        metadata={
            "dagster/row_count": faults["bars"],
            **{f"bars_{tf.value}": per_timeframe.get(tf.value, 0) for tf in ALL_TIMEFRAMES},
            "ticks_read": ticks_read,
            "vendor_bars_used": vendor_used,
            "day_boundary": boundary.value,
            "days": progress.total,
            **_time_range_metadata(first_ts, last_ts),
            "duration_seconds": round(time.perf_counter() - started, 3),
        },
        check_results=list(_bar_check_results(faults, expected, counted)),
    )


def _bar_chunk_days(warehouse: WarehouseResource, symbol: str, days: Sequence[date]) -> int:
    """Days per chunk for the candles: a month of busy ticks, up to a year of bars-only days."""
    ticks = read_tick_count(warehouse, symbol, day_start(days[0]), day_start(days[-1]) + timedelta(days=1))
    per_day = ticks / len(days)
    return int(min(366, max(7, _TICKS_PER_CHUNK // max(per_day, 1))))


def _close_of(bars: pl.DataFrame, boundary) -> pl.Expr:
    """Each bar's exclusive end, by its own timeframe."""
    expr = pl.lit(None, dtype=TS)
    for tf in ALL_TIMEFRAMES:
        expr = pl.when(pl.col("timeframe") == tf.value).then(bar_close_expr(pl.col("ts"), tf, boundary)).otherwise(expr)
    return expr
