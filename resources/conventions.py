"""Market conventions shared by every asset: the trading-day boundary and tick limits."""

from __future__ import annotations

from datetime import timedelta

from dagster import ConfigurableResource
from pydantic import Field, field_validator

from models.market.instruments import instrument
from models.market.quality import TickRules
from models.market.timeframes import DayBoundary, Timeframe


class MarketConventionsResource(ConfigurableResource):
    """Changing ``day_boundary`` changes which H4/D1/W1 bars exist: rebuild `aggregates`."""

    day_boundary: DayBoundary = Field(
        default=DayBoundary.UTC, description="'utc' (midnight UTC) or 'new_york_17' (FX day, 17:00 New York)"
    )
    max_tick_gap_minutes: float = Field(default=5.0, gt=0, description="longest silence while the market is open")
    max_spread_ratio: float = Field(default=50.0, gt=1, description="quarantine spreads wider than this x median")
    max_relative_spread: float = Field(default=0.05, gt=0, description="quarantine spreads wider than this x mid")
    feature_timeframes: list[str] = Field(default=["M5", "H1"], description="timeframes that get ml_features rows")
    price_bands: dict[str, list[float]] = Field(
        default={}, description="per symbol, the plausible [low, high] price range, where the instrument's default "
        "(a multiple of its usual level) does not fit its history, e.g. {'USDTRY': [1, 100]}")

    @field_validator("price_bands")
    @classmethod
    def _bands(cls, values: dict[str, list[float]]) -> dict[str, list[float]]:
        for symbol, band in values.items():
            if len(band) != 2 or not 0 < band[0] < band[1]:
                raise ValueError(f"price band of {symbol} must be [low, high] with 0 < low < high, got {band}")
        return {symbol.upper(): band for symbol, band in values.items()}

    def band(self, symbol: str) -> tuple[float, float]:
        """Prices of ``symbol`` outside this range are quarantined as ``implausible_price``."""
        if symbol in self.price_bands:
            low, high = self.price_bands[symbol]
            return low, high
        return instrument(symbol).plausible_prices()

    @field_validator("feature_timeframes")
    @classmethod
    def _known_timeframes(cls, values: list[str]) -> list[str]:
        unknown = [v for v in values if v not in Timeframe.__members__]
        if unknown:
            raise ValueError(f"unknown timeframe(s) {unknown}; use {list(Timeframe.__members__)}")
        return values

    @property
    def timeframes(self) -> list[Timeframe]:
        return [Timeframe(v) for v in self.feature_timeframes]

    @property
    def tick_rules(self) -> TickRules:
        return TickRules(
            max_spread_ratio=self.max_spread_ratio,
            max_relative_spread=self.max_relative_spread,
            max_gap=timedelta(minutes=self.max_tick_gap_minutes),
        )
