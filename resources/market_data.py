"""Market data for the `market_ticks` asset: the vendors, and per symbol which one is primary
and which fills the primary's gaps.

The vendors themselves live in :mod:`resources.vendors`; each implements
:class:`~resources.vendors.base.MarketDataVendor`. ``MarketDataResource`` holds the
configured ones and routes a symbol to an ordered list: the first is the primary, the rest
are backups tried in order for whatever the primary left open.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from datetime import datetime, timedelta
from typing import Optional

import polars as pl
from dagster import ConfigurableResource
from pydantic import Field, model_validator

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


VENDOR_NAMES = ("synthetic", "polygon", "dukascopy", "files")
"""Every vendor a route may name."""
VENDOR_KEYS = {"polygon": "POLYGON_API_KEY"}
"""The environment variable that configures a vendor, where one does."""
_FIELDS = {"primary": "primary", "backups": "backups", "routes": "routes"}


def check_vendor_names(
    primary: str,
    backups: list[str],
    routes: Mapping[str, list[str]],
    configured: Collection[str],
    settings: Mapping[str, str] = _FIELDS,
) -> str | None:
    """The first vendor name in the routing that names no vendor, or one not configured, as
    one line naming the setting (``settings`` maps the fields to what the user set: the
    environment variables), the name and the vendors there are; ``None`` when all are good."""
    named = [(settings["primary"], primary, None), *((settings["backups"], name, None) for name in backups)]
    named += [(settings["routes"], name, symbol) for symbol, names in routes.items() for name in names]
    for setting, name, symbol in named:
        where = f" (route of {symbol})" if symbol else ""
        if name not in VENDOR_NAMES:
            return f"{setting}: there is no vendor {name!r}{where}; known vendors: {', '.join(VENDOR_NAMES)}"
        if name not in configured:
            how = f": set {VENDOR_KEYS[name]}" if name in VENDOR_KEYS else ""
            return f"{setting}: vendor {name!r}{where} is not configured{how}; configured: {', '.join(sorted(configured))}"
    return None


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

    @model_validator(mode="after")
    def _routes_name_configured_vendors(self) -> MarketDataResource:
        """A misspelt or unconfigured vendor fails when the configuration loads, not mid-run."""
        problem = check_vendor_names(self.primary, self.backups, self.routes, self.vendors())
        if problem:
            raise ValueError(problem)
        return self

    def vendors(self) -> dict[str, MarketDataVendor]:
        """The configured vendors by name; the synthetic market needs no configuration."""
        configured = {"synthetic": self.synthetic or SyntheticMarketResource(), "polygon": self.polygon,
                      "dukascopy": self.dukascopy, "files": self.files}
        return {name: vendor for name, vendor in configured.items() if vendor is not None}

    def route(self, symbol: str) -> list[MarketDataVendor]:
        """The vendors of ``symbol``, primary first (their names were checked at construction).

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
