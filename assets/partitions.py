"""Partitions of the market-data assets: UTC day x symbol.

Days start at ``TRADEFORGE_FIRST_DAY`` (default 2000-01-01, early enough for the free
archives: Dukascopy and HistData go back to the early 2000s). Symbols are a dynamic
dimension: add one in the Dagster UI, with `tradeforge symbols add`, or through the instance
API, without touching code.

Each market asset depends on the same day of its input only. What a day also reads around it
(the week a W1 bar spans, the warm-up history of the features, the day ahead the labels look
at) is read from the warehouse as it stands: declaring it as partition dependencies made a
backfill of a few days expand into every day those windows touch (7 days after, 63 days after,
a day before), and fail there. Ranges run as one run (the assets' single-run backfill policy)
and process their days in chunks, so a year is one run, not 365.
"""

from __future__ import annotations

import os
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from dagster import (
    AssetExecutionContext,
    AssetKey,
    BackfillPolicy,
    DailyPartitionsDefinition,
    DynamicPartitionsDefinition,
    Failure,
    MultiPartitionKey,
    MultiPartitionsDefinition,
)

DEFAULT_FIRST_DAY = "2000-01-01"
FIRST_DAY_SETTING = "TRADEFORGE_FIRST_DAY"


def _first_day() -> str:
    text = os.environ.get(FIRST_DAY_SETTING, "").strip() or DEFAULT_FIRST_DAY
    try:
        return date.fromisoformat(text).isoformat()
    except ValueError:
        raise ValueError(f"{FIRST_DAY_SETTING}={text!r} is not a date (YYYY-MM-DD)") from None


FIRST_DAY = _first_day()
DAYS = DailyPartitionsDefinition(start_date=FIRST_DAY, timezone="UTC")
SYMBOLS = DynamicPartitionsDefinition(name="symbols")
DAY_SYMBOL = MultiPartitionsDefinition({"day": DAYS, "symbol": SYMBOLS})
RANGE_AS_ONE_RUN = BackfillPolicy.single_run()


class OutsidePartitionsError(ValueError):
    """A day before the first partition day or after yesterday."""


def check_days(first: date, last: date, today: date | None = None) -> None:
    """One clear line when ``first..last`` leaves the partition range: it names the range
    and the setting that moves its start."""
    start, end = date.fromisoformat(FIRST_DAY), (today or datetime.now(UTC).date())
    if first < start:
        raise OutsidePartitionsError(
            f"{first} is before the first partition day {start}: days run from {start} to {end - timedelta(days=1)}; "
            f"set {FIRST_DAY_SETTING}=YYYY-MM-DD to start earlier"
        )
    if last >= end:
        raise OutsidePartitionsError(
            f"{last} is not a past day: days run from {start} to {end - timedelta(days=1)} (a day is partitioned once it is over)"
        )


@dataclass(frozen=True, slots=True)
class DaySymbol:
    """One partition: a symbol over the UTC day ``[start, end)``."""

    symbol: str
    day: date

    @property
    def start(self) -> datetime:
        return day_start(self.day)

    @property
    def end(self) -> datetime:
        return self.start + timedelta(days=1)

    @property
    def key(self) -> MultiPartitionKey:
        return day_symbol_key(self.day, self.symbol)


def day_start(day: date) -> datetime:
    return datetime(day.year, day.month, day.day, tzinfo=UTC)


def day_symbol_key(day: date, symbol: str) -> MultiPartitionKey:
    return MultiPartitionKey({"day": day.isoformat(), "symbol": symbol})


def parse_key(key: str | MultiPartitionKey) -> DaySymbol:
    keys = key.keys_by_dimension if isinstance(key, MultiPartitionKey) else DAY_SYMBOL.get_partition_key_from_str(key).keys_by_dimension
    return DaySymbol(symbol=keys["symbol"], day=date.fromisoformat(keys["day"]))


def days_by_symbol(context: AssetExecutionContext) -> dict[str, list[date]]:
    """The run's partitions (one, or a range run's rectangle) as sorted days per symbol."""
    found: dict[str, list[date]] = defaultdict(list)
    for key in context.partition_keys:
        partition = parse_key(key)
        found[partition.symbol].append(partition.day)
    return {symbol: sorted(days) for symbol, days in sorted(found.items())}


def chunks(days: Sequence[date], size: int) -> Iterator[list[date]]:
    """Consecutive runs of at most ``size`` days, split where the days are not contiguous."""
    current: list[date] = []
    for day in days:
        if current and (len(current) >= size or day != current[-1] + timedelta(days=1)):
            yield current
            current = []
        current.append(day)
    if current:
        yield current


def require_upstream(context: AssetExecutionContext, upstream: str, symbol: str, days: Sequence[date]) -> None:
    """Fail clearly when ``upstream`` was never materialized for some of these partitions:
    computing on their absence would silently give an empty result that looks like a quiet
    market. One query for the whole range."""
    done = context.instance.get_materialized_partitions(AssetKey(upstream))
    missing = [day for day in days if str(day_symbol_key(day, symbol)) not in done]
    if missing:
        shown = ", ".join(str(d) for d in missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise Failure(
            description=(
                f"{upstream} has no materialization for {symbol} {shown}: "
                f"materialize {upstream} for those days first (or together with this asset)"
            ),
            allow_retries=False,
        )
