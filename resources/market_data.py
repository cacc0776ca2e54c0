"""Market data for the `market_ticks` asset: the vendors, and per symbol which one is primary
and which fills the primary's gaps.

The vendors themselves live in :mod:`resources.vendors`; each implements
:class:`~resources.vendors.base.MarketDataVendor`. ``MarketDataResource`` holds the
configured ones and routes a symbol to an ordered list: the first is the primary, the rest
are backups tried in order for whatever the primary left open.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Optional

import polars as pl
from dagster import ConfigurableResource
from pydantic import Field

from models.market.synthetic import SyntheticMarketConfig, generate_ticks
from models.market.ticks import empty_ticks
from resources.vendors.base import MarketDataVendor, VendorRequestError
from resources.vendors.dukascopy import DukascopyResource
from resources.vendors.files import FileImportResource
from resources.vendors.polygon import PolygonResource


class SyntheticMarketResource(MarketDataVendor):
    """The deterministic synthetic market: the embedded default, no network, no keys."""

    seed: int = Field(default=7, description="same seed, same ticks")
    tick_rate_scale: float = Field(default=1.0, gt=0, description="multiplies every instrument's tick rate")

    @property
    def source(self) -> str:
        return "synthetic"

    def fetch_ticks(self, symbol: str, start: datetime, end: datetime) -> pl.DataFrame:
        config = SyntheticMarketConfig(seed=self.seed, tick_rate_scale=self.tick_rate_scale)
        day, frames = start.date(), []
        while datetime(day.year, day.month, day.day, tzinfo=start.tzinfo) < end:
            frames.append(generate_ticks(symbol, day, config))
            day += timedelta(days=1)
        ticks = pl.concat(frames) if frames else empty_ticks()
        return ticks.filter((pl.col("ts") >= start) & (pl.col("ts") < end))


class MarketDataResource(ConfigurableResource):
    """The configured vendors and the route of each symbol through them.

    ``routes`` maps a symbol to vendor names, primary first (``{"XAUUSD": ["polygon",
    "dukascopy"]}``); symbols without a route use ``primary`` then ``backups``.
    """

    synthetic: Optional[SyntheticMarketResource] = None
    polygon: Optional[PolygonResource] = None
    dukascopy: Optional[DukascopyResource] = None
    files: Optional[FileImportResource] = None
    primary: str = Field(default="synthetic", description="vendor of symbols without a route")
    backups: list[str] = Field(default=[], description="vendors that fill the primary's gaps, in order")
    routes: dict[str, list[str]] = Field(default={}, description="symbol -> vendor names, primary first")

    def vendors(self) -> dict[str, MarketDataVendor]:
        configured = {"synthetic": self.synthetic, "polygon": self.polygon, "dukascopy": self.dukascopy, "files": self.files}
        return {name: vendor for name, vendor in configured.items() if vendor is not None}

    def route(self, symbol: str) -> list[MarketDataVendor]:
        """The vendors of ``symbol``, primary first; an unconfigured name is a clear error.

        An explicit route wins; a symbol with imported files (``tradeforge import``) reads
        them as its primary (then the backups), so a backfill from the UI finds the history
        the user imported, never the default vendor's (the synthetic market, say); every other
        symbol uses ``primary`` then ``backups``."""
        names = self.routes.get(symbol)
        if not names:
            imported = self.files is not None and self.files.has_files(symbol)
            names = ["files", *self.backups] if imported else [self.primary, *self.backups]
        available = self.vendors()
        unknown = [name for name in names if name not in available]
        if unknown:
            raise VendorRequestError(
                f"{symbol}: vendor(s) {unknown} named in the route {names} are not configured; configured: {sorted(available)}"
            )
        return [available[name] for name in dict.fromkeys(names)]
