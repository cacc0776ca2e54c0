"""Market-data vendors behind one interface: ticks of one symbol over a UTC window.

Every vendor returns a frame with the columns of :data:`models.ticks.TICK_SCHEMA` (optional
ones may be missing) and may return bad rows; conforming, validation and quarantine happen
downstream in the `market_ticks` asset, the same for every vendor.
"""

from __future__ import annotations

from abc import abstractmethod
from datetime import datetime, timedelta

import polars as pl
from dagster import ConfigurableResource
from pydantic import Field

from models.synthetic import SyntheticMarketConfig, generate_ticks
from models.ticks import empty_ticks


class TickVendorResource(ConfigurableResource):
    """A source of ticks. Subclasses talk to one vendor."""

    @abstractmethod
    def fetch_ticks(self, symbol: str, start: datetime, end: datetime) -> pl.DataFrame:
        """Ticks of ``symbol`` with ``start <= ts < end`` as the vendor sent them."""


class SyntheticMarketResource(TickVendorResource):
    """The deterministic synthetic market: the embedded default, no network, no keys."""

    seed: int = Field(default=7, description="same seed, same ticks")
    tick_rate_scale: float = Field(default=1.0, gt=0, description="multiplies every instrument's tick rate")

    def fetch_ticks(self, symbol: str, start: datetime, end: datetime) -> pl.DataFrame:
        config = SyntheticMarketConfig(seed=self.seed, tick_rate_scale=self.tick_rate_scale)
        day, frames = start.date(), []
        while datetime(day.year, day.month, day.day, tzinfo=start.tzinfo) < end:
            frames.append(generate_ticks(symbol, day, config))
            day += timedelta(days=1)
        ticks = pl.concat(frames) if frames else empty_ticks()
        return ticks.filter((pl.col("ts") >= start) & (pl.col("ts") < end))
