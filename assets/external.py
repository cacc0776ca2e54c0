"""External data assets, point-in-time: FRED/ALFRED vintages, commodity prices, calendar.

Each row stores ``known_at``: the moment a point-in-time join may first use it. Range
backfills run as one run per range (one request per series or ticker for the whole range,
not one per day), and a partition that failed half-way simply reruns: writes replace.
"""

import time
from datetime import UTC, date, datetime, timedelta
from zoneinfo import ZoneInfo

import polars as pl
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AutomationCondition,
    BackfillPolicy,
    Backoff,
    DailyPartitionsDefinition,
    Failure,
    FreshnessPolicy,
    Jitter,
    MaterializeResult,
    MetadataValue,
    RetryPolicy,
    WeeklyPartitionsDefinition,
    asset,
)

from assets.partitions import FIRST_DAY
from resources.bus.external import SUBJECT, ExternalUpdate
from resources.bus.client import BusError
from resources.bus.resource import BusResource
from resources.bus.streams import EXTERNAL_STREAM
from resources.external.calendar import EconomicCalendarResource
from resources.external.fred import FredResource
from resources.external.yahoo import YahooFinanceResource
from resources.vendors.base import VendorPayloadError, VendorRequestError
from resources.warehouse import WarehouseResource
from resources.warehouse.external import latest_fred_values, write_calendar_day, write_commodity_day, write_fred_week
from resources.warehouse.features import read_external_update

WEEKS = WeeklyPartitionsDefinition(start_date=FIRST_DAY, timezone="UTC")  # Sunday to Sunday
EXTERNAL_DAYS = DailyPartitionsDefinition(start_date=FIRST_DAY, timezone="UTC")
CALENDAR_DAYS = DailyPartitionsDefinition(start_date=FIRST_DAY, timezone="UTC", end_offset=7)  # the coming week is scheduled
_NEW_YORK = ZoneInfo("America/New_York")
VENDOR_RETRY = RetryPolicy(max_retries=3, delay=30, backoff=Backoff.EXPONENTIAL, jitter=Jitter.PLUS_MINUS)
BUS_RETRY = RetryPolicy(max_retries=4, delay=5, backoff=Backoff.EXPONENTIAL)  # after 5, 15, 35, 75 s: a NATS restart


def _window(context: AssetExecutionContext) -> tuple[datetime, datetime]:
    window = context.partition_time_window
    return window.start.astimezone(UTC), window.end.astimezone(UTC)


def _refused(what: str, exc: Exception) -> Failure:
    """A payload or request error reads the same on a retry: fail once, with the reason."""
    return Failure(description=f"{what}: {exc}", allow_retries=False)


def fred_known_at(realtime_start: pl.Expr) -> pl.Expr:
    """ALFRED gives the publication day, not the hour: a value counts as known from the end
    of that day in New York, never earlier than it was (releases come out 08:30-16:15 ET)."""
    next_day = (realtime_start.cast(pl.Datetime("ms")) + pl.duration(days=1)).dt.replace_time_zone(_NEW_YORK.key)
    return next_day.dt.convert_time_zone("UTC")


@asset(
    partitions_def=WEEKS,
    group_name="external",
    kinds={"clickhouse", "polars"},
    retry_policy=VENDOR_RETRY,
    backfill_policy=BackfillPolicy.single_run(),
    freshness_policy=FreshnessPolicy.cron(deadline_cron="0 12 * * 1", lower_bound_delta=timedelta(days=7)),
    check_specs=[AssetCheckSpec("series_fresh", asset="external_fred_indicators",
                                description="each series published recently enough for its frequency")],
    description="FRED series with every ALFRED vintage, by publication week; known_at = end of the publication day (New York).",
)
def external_fred_indicators(context: AssetExecutionContext, warehouse: WarehouseResource, fred: FredResource) -> MaterializeResult:
    started = time.perf_counter()
    start, end = _window(context)
    first_partition = start.date().isoformat() == WEEKS.get_first_partition_key()
    # ALFRED clips each row's real-time period to the request: a value published before this
    # window comes back dated at its start. Such a row repeats what earlier weeks stored; only
    # new observations and changed values are news.
    known = latest_fred_values(warehouse, list(fred.series), start.date())
    frames, per_series, stale = [], {}, {}
    for series_id in fred.series:
        try:
            vintages = fred.vintages(series_id, start.date(), (end - timedelta(days=1)).date())
        except (VendorPayloadError, VendorRequestError) as exc:
            raise _refused(f"FRED {series_id}", exc) from exc
        # A week holds what was published in it; the first week also the state before it.
        published = vintages.filter(
            (pl.col("realtime_start") < end.date()) & ((pl.col("realtime_start") >= start.date()) | pl.lit(first_partition))
        )
        before = known.filter(pl.col("series_id") == series_id)
        published = published.join(before.select("series_id", "observation_date", "value"),
                                   on=["series_id", "observation_date", "value"], how="anti")
        published_on = pl.max_horizontal(pl.col("realtime_start"), pl.lit(start.date()))
        week = ((published_on + pl.duration(days=1)).dt.truncate("1w") - pl.duration(days=1)).alias("week")  # Sunday
        frames.append(published.with_columns(fred_known_at(pl.col("realtime_start")).alias("known_at"), week, pl.lit("fred").alias("source")))
        per_series[series_id] = published.height
        spacing = vintages["observation_date"].unique().sort().diff().dt.total_days().median() if vintages.height > 2 else None
        newest = max(filter(None, [published["realtime_start"].max(), before["published"].max()]), default=None)
        limit = max(14, 2 * int(spacing or 0) + 7)
        age = (end.date() - newest).days if newest else None
        if age is None or age > limit:
            stale[series_id] = {"days_since_publication": age, "limit_days": limit}
    rows = pl.concat(frames, how="vertical_relaxed") if frames else pl.DataFrame()
    with warehouse.session() as session:
        for key in context.partition_keys:
            week_start = date.fromisoformat(key)
            write_fred_week(session, week_start, rows.filter(pl.col("week") == week_start) if rows.height else rows)
    context.log.info(f"FRED {start.date()}..{end.date()}: {rows.height:,} vintage rows of {len(per_series)} series")
    return MaterializeResult(
        metadata={
            "dagster/row_count": rows.height,
            "rows_per_series": MetadataValue.json(per_series),
            "weeks": len(context.partition_keys),
            "duration_seconds": round(time.perf_counter() - started, 3),
        },
        check_results=[AssetCheckResult(
            check_name="series_fresh", passed=not stale, severity=AssetCheckSeverity.WARN,
            metadata={"stale_series": MetadataValue.json(stale), "series": len(fred.series)},
        )],
    )


@asset(
    partitions_def=EXTERNAL_DAYS,
    group_name="external",
    kinds={"clickhouse", "polars"},
    retry_policy=VENDOR_RETRY,
    backfill_policy=BackfillPolicy.single_run(),
    freshness_policy=FreshnessPolicy.cron(deadline_cron="0 12 * * *", lower_bound_delta=timedelta(days=1)),
    check_specs=[AssetCheckSpec("no_missing_weekdays", asset="external_commodity_prices",
                                description="every ticker has a close on every weekday of the range (holidays warn)")],
    description="Daily OHLCV of commodities and indices from Yahoo Finance; known_at = the next midnight at the exchange.",
)
def external_commodity_prices(
    context: AssetExecutionContext, warehouse: WarehouseResource, yahoo: YahooFinanceResource
) -> MaterializeResult:
    started = time.perf_counter()
    start, end = _window(context)
    frames = []
    for name in yahoo.tickers:
        try:
            frames.append(yahoo.daily(name, start.date(), end.date()))
        except (VendorPayloadError, VendorRequestError) as exc:
            raise _refused(f"Yahoo {name}", exc) from exc
    rows = pl.concat(frames).with_columns(pl.lit("yahoo").alias("source"))
    with warehouse.session() as session:
        for key in context.partition_keys:
            day = date.fromisoformat(key)
            write_commodity_day(session, day, rows.filter(pl.col("date") == day))
    weekdays = pl.date_range(start.date(), end.date(), "1d", closed="left", eager=True).filter(
        pl.date_range(start.date(), end.date(), "1d", closed="left", eager=True).dt.weekday() <= 5
    )
    missing = {
        name: [d.isoformat() for d in weekdays.filter(~weekdays.is_in(rows.filter(pl.col("name") == name)["date"].implode()))][:10]
        for name in yahoo.tickers
    }
    missing = {name: days for name, days in missing.items() if days}
    context.log.info(f"commodities {start.date()}..{end.date()}: {rows.height:,} daily rows")
    return MaterializeResult(
        metadata={
            "dagster/row_count": rows.height,
            "rows_per_name": MetadataValue.json(dict(rows.group_by("name").len().iter_rows())),
            "days": len(context.partition_keys),
            "duration_seconds": round(time.perf_counter() - started, 3),
        },
        check_results=[AssetCheckResult(
            check_name="no_missing_weekdays", passed=not missing, severity=AssetCheckSeverity.WARN,
            metadata={"missing_weekdays": MetadataValue.json(missing)},
        )],
    )


@asset(
    partitions_def=CALENDAR_DAYS,
    group_name="external",
    kinds={"clickhouse", "polars"},
    retry_policy=VENDOR_RETRY,
    backfill_policy=BackfillPolicy.single_run(),
    freshness_policy=FreshnessPolicy.time_window(fail_window=timedelta(days=2), warn_window=timedelta(hours=26)),
    check_specs=[AssetCheckSpec("events_well_formed", asset="external_economic_calendar",
                                description="three-letter currency and a known impact level")],
    description="Economic calendar events by scheduled day, from the weekly feed and calendar files; the earliest known_at is kept.",
)
def external_economic_calendar(
    context: AssetExecutionContext, warehouse: WarehouseResource, calendar: EconomicCalendarResource
) -> MaterializeResult:
    started = time.perf_counter()
    start, end = _window(context)
    try:
        feed = calendar.feed(fetched_at=datetime.now(UTC))
        files = calendar.from_files(start, end)
    except (VendorPayloadError, VendorRequestError) as exc:
        raise _refused("economic calendar", exc) from exc
    events = pl.concat([files, feed.filter((pl.col("ts") >= start) & (pl.col("ts") < end))])
    with warehouse.session() as session:
        written = write_calendar_day(session, start, end, events)
    odd = written.filter(
        (pl.col("currency").str.len_chars() != 3) | ~pl.col("impact").is_in(["high", "medium", "low", "holiday"])
    )
    context.log.info(f"calendar {start.date()}..{end.date()}: {written.height:,} events")
    return MaterializeResult(
        metadata={
            "dagster/row_count": written.height,
            "high_impact": int((written["impact"] == "high").sum()),
            "feed_events": feed.height,
            "file_events": files.height,
            "with_actual": int(written["actual"].is_not_null().sum()),
            "duration_seconds": round(time.perf_counter() - started, 3),
        },
        check_results=[AssetCheckResult(
            check_name="events_well_formed", passed=odd.is_empty(), severity=AssetCheckSeverity.WARN,
            metadata={"odd_events": odd.height},
        )],
    )


UPDATE_DAYS = 45  # the window a live runner replaces: later vintages, revised events, the past weeks' commodities


@asset(
    group_name="external",
    kinds={"nats"},
    deps=[external_fred_indicators, external_commodity_prices, external_economic_calendar],
    retry_policy=BUS_RETRY,
    # Requested once no external run is in progress after any of them stored rows: an update that
    # lands while this one runs asks for the next one (the trigger holds until a new request).
    automation_condition=(AutomationCondition.any_deps_updated().since(
        AutomationCondition.newly_requested() | AutomationCondition.initial_evaluation())
        & ~AutomationCondition.any_deps_in_progress() & ~AutomationCondition.in_progress()).with_label("after new external rows"),
    description=f"The last {UPDATE_DAYS} days of FRED, commodity and calendar rows, shaped as the features join them, "
                "published on market.external.update for running live runners (they read the warehouse only at start).",
)
def external_update(context: AssetExecutionContext, warehouse: WarehouseResource, bus: BusResource) -> MaterializeResult:
    now = datetime.now(UTC).replace(microsecond=0)  # whole seconds, as the warehouse compares times
    since = now - timedelta(days=UPDATE_DAYS)
    with warehouse.session() as session:
        values, events, until = read_external_update(session, since, now)
    update = ExternalUpdate(now, since, until, values, events)
    payload = update.encode()
    try:
        outcome = bus.publish_if_running(EXTERNAL_STREAM, SUBJECT, payload, update.msg_id(payload))
    except BusError as exc:  # retried: running runners keep their data until it lands
        raise Failure(description=f"{exc}; running live runners keep the external data they hold until a retry "
                                  "publishes it (or the next external run, or their restart)",
                      metadata={"values": values.height, "events": events.height}) from exc
    except Exception as exc:  # the bus answered and refused it: the same again on a retry
        raise _refused("publishing the external update", exc) from exc
    context.log.info(f"external update since {since:%Y-%m-%d %H:%M}: {values.height:,} values, {events.height:,} events; {outcome}")
    return MaterializeResult(metadata={"values": values.height, "events": events.height, "since": since.isoformat(),
                                       "bytes": len(payload), "bus": outcome})
