"""The warm-up: the runner's one read of the warehouse, at start.

The feature window needs :data:`~models.features.registry.WARMUP_BARS` bars before the first
live bar, and the external data known by then. Both are read once when the runner starts,
through the plain warehouse client (no Dagster), and never again while it trades: the embedded
warehouse serves one process at a time, so the runner must not stall Dagster runs, nor they
the runner. Bars newer than the warehouse come from the bar stream, newer external data from
``market.external.update`` (see the runner and :mod:`resources.bus.external`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import polars as pl

from models.features.external import ExternalData
from models.features.registry import WARMUP_BARS
from models.market.candles import BAR_SCHEMA
from models.market.timeframes import Timeframe
from resources.warehouse.commits import visible
from resources.warehouse.connection import Warehouse, WarehouseConnection
from resources.warehouse.features import read_external
from resources.warehouse.market import read_bars


@dataclass
class WarmUp:
    bars: dict[str, pl.DataFrame]  # symbol -> the newest bars before the cut, oldest first (BAR_SCHEMA)
    external: dict[str, ExternalData]
    seconds: float = 0.0

    def last_ts(self, symbol: str) -> int:
        """Open (UTC ms) of the newest warm-up bar of ``symbol``; -1 without any."""
        frame = self.bars.get(symbol)
        if frame is None or frame.is_empty():
            return -1
        return int(frame["ts"][-1].timestamp() * 1000)


def newest_bar(warehouse: Warehouse, symbol: str, tf: Timeframe, before: datetime | None) -> datetime | None:
    """Open of the newest stored bar of ``symbol`` opening before ``before`` (None: no bar)."""
    clauses, params = [visible("aggregates"), "symbol = {symbol:String}", "timeframe = {tf:String}"], {"symbol": symbol, "tf": tf.value}
    if before is not None:
        clauses.append("ts < {end:DateTime('UTC')}")
        params["end"] = before
    frame = warehouse.query_frame(f"SELECT count() AS n, toUnixTimestamp(max(ts)) AS newest FROM aggregates "
                                  f"WHERE {' AND '.join(clauses)}", params)
    if frame.is_empty() or not frame["n"][0]:
        return None
    return datetime.fromtimestamp(int(frame["newest"][0]), UTC)


def read_history(warehouse: Warehouse, symbol: str, tf: Timeframe, before: datetime | None, bars: int = WARMUP_BARS) -> pl.DataFrame:
    """The newest ``bars`` bars of ``symbol`` opening before ``before`` (all history: None).
    Reads a window of three times the bars' span (weekends, holidays) back from the newest
    stored bar (which may be far from today), widened while short."""
    frame = pl.DataFrame(schema=BAR_SCHEMA)
    newest = newest_bar(warehouse, symbol, tf, before)
    if newest is None:
        return frame
    end = newest + timedelta(minutes=tf.minutes)
    span = timedelta(minutes=tf.minutes * bars * 3)
    for _ in range(4):
        frame = read_bars(warehouse, symbol, tf, end - span, end)
        if frame.height >= bars:
            break
        span *= 4
    return frame.select(list(BAR_SCHEMA)).tail(bars)


def warm_up(warehouse: WarehouseConnection, symbols: tuple[str, ...], tf: Timeframe, before: dict[str, datetime | None],
            now: datetime | None = None, bars: int = WARMUP_BARS) -> WarmUp:
    """Bars and external data for every symbol, in one pass over the warehouse."""
    import time

    started = time.perf_counter()
    now = now or datetime.now(UTC)
    out_bars, external = {}, {}
    with warehouse.session() as session:  # one open of the engine for the whole warm-up
        for symbol in symbols:
            frame = read_history(session, symbol, tf, before.get(symbol), bars)
            out_bars[symbol] = frame
            first = frame["ts"][0] if frame.height else now
            external[symbol] = read_external(session, symbol, first, now)
    return WarmUp(out_bars, external, time.perf_counter() - started)
