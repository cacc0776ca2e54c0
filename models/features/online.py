"""The live path: the feature vector of the newest bar from a rolling window of bars.

It calls the batch engine on the last :data:`WARMUP_BARS` bars, so live and batch share
every line of feature code; the parity test holds them equal bar for bar.
"""

from __future__ import annotations

import polars as pl

from models.candles import BAR_SCHEMA
from models.features.compute import compute_features
from models.features.external import ExternalData
from models.features.registry import WARMUP_BARS
from models.timeframes import DayBoundary, Timeframe


class RollingFeatures:
    """Feed closed bars in order with :meth:`update`; get each bar's feature row back."""

    def __init__(self, tf: Timeframe, boundary: DayBoundary = DayBoundary.UTC, window: int = WARMUP_BARS) -> None:
        self.tf, self.boundary, self.window = tf, boundary, window
        self._bars = pl.DataFrame(schema=BAR_SCHEMA)

    def seed(self, bars: pl.DataFrame) -> None:
        """Start from history (the newest bars from the warehouse, say) without computing."""
        self._bars = bars.select(list(BAR_SCHEMA)).cast(BAR_SCHEMA).tail(self.window).rechunk()

    def update(self, bar: pl.DataFrame, external: ExternalData | None = None) -> dict[str, object]:
        """Append one closed bar (a one-row frame in BAR_SCHEMA); returns its feature row.

        Bars must arrive in time order; a bar at or before the newest one is refused.
        """
        if bar.height != 1:
            raise ValueError(f"update takes exactly one bar, got {bar.height}")
        if self._bars.height and bar["ts"][0] <= self._bars["ts"][-1]:
            raise ValueError(f"bar at {bar['ts'][0]} is not after the newest bar {self._bars['ts'][-1]}")
        new = bar.select(list(BAR_SCHEMA)).cast(BAR_SCHEMA)
        self._bars = pl.concat([self._bars.tail(self.window - 1), new]).rechunk()
        return compute_features(self._bars, self.tf, self.boundary, external, tail=1).row(0, named=True)

    @property
    def warm(self) -> bool:
        """True once the window is full: from then on every feature equals the batch value."""
        return self._bars.height >= self.window
