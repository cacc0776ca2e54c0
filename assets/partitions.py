"""Partitions of the market-data assets: UTC day x symbol.

Symbols are a dynamic dimension: add one in the Dagster UI, with `tradeforge symbols add`,
or through the instance API, without touching code.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetRecordsFilter,
    BetaWarning,
    DailyPartitionsDefinition,
    DimensionPartitionMapping,
    DynamicPartitionsDefinition,
    Failure,
    IdentityPartitionMapping,
    MultiPartitionKey,
    MultiPartitionMapping,
    MultiPartitionsDefinition,
    TimeWindowPartitionMapping,
)

FIRST_DAY = "2023-01-01"
DAYS = DailyPartitionsDefinition(start_date=FIRST_DAY, timezone="UTC")
SYMBOLS = DynamicPartitionsDefinition(name="symbols")
DAY_SYMBOL = MultiPartitionsDefinition({"day": DAYS, "symbol": SYMBOLS})


@dataclass(frozen=True, slots=True)
class DaySymbol:
    """One partition: a symbol over the UTC day ``[start, end)``."""

    symbol: str
    day: date

    @property
    def start(self) -> datetime:
        return datetime(self.day.year, self.day.month, self.day.day, tzinfo=UTC)

    @property
    def end(self) -> datetime:
        return self.start + timedelta(days=1)

    @property
    def key(self) -> MultiPartitionKey:
        return day_symbol_key(self.day, self.symbol)

    @classmethod
    def of(cls, context: AssetExecutionContext) -> DaySymbol:
        keys = context.partition_key.keys_by_dimension  # type: ignore[attr-defined]
        return cls(symbol=keys["symbol"], day=date.fromisoformat(keys["day"]))


def day_symbol_key(day: date, symbol: str) -> MultiPartitionKey:
    return MultiPartitionKey({"day": day.isoformat(), "symbol": symbol})


def same_symbol_days(start_offset: int, end_offset: int = 0) -> MultiPartitionMapping:
    """Upstream partitions of the same symbol from ``start_offset`` to ``end_offset`` days
    around each day: how a day's computation reads its neighbours (look-back, look-ahead)."""
    with warnings.catch_warnings():  # both classes are beta; using them is deliberate
        warnings.simplefilter("ignore", BetaWarning)
        return MultiPartitionMapping(
            {
                "day": DimensionPartitionMapping(
                    "day",
                    TimeWindowPartitionMapping(
                        start_offset=start_offset, end_offset=end_offset, allow_nonexistent_upstream_partitions=True
                    ),
                ),
                "symbol": DimensionPartitionMapping("symbol", IdentityPartitionMapping()),
            }
        )


def require_upstream(context: AssetExecutionContext, upstream: str, partition: DaySymbol) -> None:
    """Fail clearly when ``upstream`` was never materialized for this partition: computing on
    its absence would silently give an empty result that looks like a quiet market."""
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(upstream), asset_partitions=[str(partition.key)]), limit=1
    )
    if not records.records:
        raise Failure(
            description=(
                f"{upstream} has no materialization for {partition.symbol} {partition.day}: "
                f"materialize {upstream} for that partition first (or together with this asset)"
            ),
            allow_retries=False,
        )
