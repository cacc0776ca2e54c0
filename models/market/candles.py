"""Ticks -> OHLCV candles at every timeframe: pure and vectorised.

A bar is a reduction over a contiguous run of time-sorted rows, and a tick is just a bar of
one row. So one kernel, :func:`_reduce_runs`, builds M1 bars from ticks and every longer
timeframe from the one below it (M1 -> M5 -> ... -> W1; every boundary of a timeframe is a
boundary of the finer ones, under either day boundary). The kernel carries sums, not means,
so nothing is averaged twice; :func:`rollup_bars` rebuilds those sums from stored bars, so
bars already in the warehouse (or a vendor's M1 candles) roll up the same way.

Runs are found by binary search on sorted times and reduced with ``numpy.ufunc.reduceat``:
no hashing, one pass per statistic, sums in time order.

Columns: OHLC of the reference price (quote mid, or trade price for trades), the last bid and
ask, traded ``volume`` (0 for quote-only data), ``tick_count`` (all ticks), ``quote_count``
(ticks with a two-sided quote), spread mean/max over quotes, ``vwap`` (volume-weighted over
trades; the tick-weighted mean price where nothing traded, as for FX quotes) and ``source``.
Input ticks are expected clean (see :mod:`models.market.quality`): null marks a missing side.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

import numpy as np
import polars as pl

from models.market.ticks import TS
from models.market.timeframes import ALL_TIMEFRAMES, DayBoundary, Timeframe, bar_open_at, bar_open_expr

BAR_SCHEMA: dict[str, pl.DataType] = {
    "symbol": pl.String(),
    "timeframe": pl.String(),
    "ts": TS,
    "open": pl.Float64(),
    "high": pl.Float64(),
    "low": pl.Float64(),
    "close": pl.Float64(),
    "bid_close": pl.Float64(),
    "ask_close": pl.Float64(),
    "volume": pl.Float64(),
    "tick_count": pl.UInt32(),
    "quote_count": pl.UInt32(),
    "spread_mean": pl.Float64(),
    "spread_max": pl.Float64(),
    "vwap": pl.Float64(),
    "source": pl.String(),
}

_MINUTE_MS = 60_000
_SUMS = ("volume", "spread_sum", "pv_sum", "ref_sum")  # None: nothing to add (zero)
_COUNTS = ("tick_count", "quote_count")  # None: every row counts one


class _Runs:
    """Rows of one symbol as arrays (NaN for missing; -inf for 'no spread'), plus source."""

    def __init__(self, symbol: str, ts_ms: np.ndarray, columns: dict[str, np.ndarray | None], source: pl.Series):
        self.symbol, self.ts_ms, self.columns, self.source = symbol, ts_ms, columns, source

    def reduce(self, starts: np.ndarray, opens_ms: np.ndarray) -> _Runs:
        """One row per run beginning at ``starts``, stamped with ``opens_ms``."""
        c, n = self.columns, len(self.ts_ms)
        ends = np.r_[starts[1:], n]
        out: dict[str, np.ndarray | None] = {
            "open": c["open"][starts],
            "high": np.maximum.reduceat(c["high"], starts),
            "low": np.minimum.reduceat(c["low"], starts),
            "close": c["close"][ends - 1],
            "bid_close": _last_valid(c["bid_close"], starts, ends),
            "ask_close": _last_valid(c["ask_close"], starts, ends),
            "spread_max": np.maximum.reduceat(c["spread_max"], starts),
        }
        for name in _SUMS:
            out[name] = np.zeros(len(starts)) if c[name] is None else np.add.reduceat(c[name], starts)
        for name in _COUNTS:
            out[name] = ends - starts if c[name] is None else np.add.reduceat(c[name], starts, dtype=np.int64)
        return _Runs(self.symbol, opens_ms, out, _sources_per_run(self.source, starts))

    def finish(self, tf: Timeframe) -> pl.DataFrame:
        c = self.columns
        frame = pl.DataFrame({"ts": self.ts_ms, **c, "source": self.source}).with_columns(
            pl.col("bid_close", "ask_close").fill_nan(None),
        )
        return frame.select(
            pl.lit(self.symbol).alias("symbol"),
            pl.lit(tf.value).alias("timeframe"),
            pl.col("ts").cast(pl.Int64).cast(TS),
            "open",
            "high",
            "low",
            "close",
            "bid_close",
            "ask_close",
            "volume",
            pl.col("tick_count").cast(pl.UInt32),
            pl.col("quote_count").cast(pl.UInt32),
            pl.when(pl.col("quote_count") > 0).then(pl.col("spread_sum") / pl.col("quote_count")).alias("spread_mean"),
            pl.when(pl.col("quote_count") > 0).then(pl.col("spread_max")).alias("spread_max"),
            pl.when(pl.col("volume") > 0)
            .then(pl.col("pv_sum") / pl.col("volume"))
            .otherwise(pl.col("ref_sum") / pl.col("tick_count"))
            .alias("vwap"),
            pl.col("source").cast(pl.String),
        )

    def rollup(self, tf: Timeframe, boundary: DayBoundary) -> _Runs:
        opens = pl.Series(self.ts_ms).cast(pl.Int64).cast(TS).to_frame("ts").select(bar_open_expr(pl.col("ts"), tf, boundary))
        opens_ms = _epoch_ms(opens.to_series())
        starts = np.flatnonzero(np.r_[True, opens_ms[1:] != opens_ms[:-1]])
        return self.reduce(starts, opens_ms[starts])


def _last_valid(values: np.ndarray, starts: np.ndarray, ends: np.ndarray) -> np.ndarray:
    missing = np.isnan(values)
    if not missing.any():
        return values[ends - 1]
    last = np.maximum.reduceat(np.where(missing, -1, np.arange(len(values))), starts)
    return np.where(last >= starts, values[last], np.nan)


def _sources_per_run(source: pl.Series, starts: np.ndarray) -> pl.Series:
    """The source of each run; several sources join as 'a+b' (sorted, unique)."""
    if source.null_count() == 0 and source.min() == source.max():
        return pl.repeat(source[0], len(starts), eager=True, dtype=pl.String)
    run = np.zeros(source.len(), dtype=np.int64)
    run[starts[1:]] = 1
    frame = pl.DataFrame({"run": np.cumsum(run), "source": source})
    return frame.group_by("run", maintain_order=True).agg(
        pl.col("source").str.split("+").list.explode(keep_nulls=False, empty_as_null=False).unique().sort().str.join("+")
    )["source"]


def _floats(series: pl.Series) -> np.ndarray:
    """Float64 values with NaN for null; no copy when there is nothing to fill."""
    series = series.cast(pl.Float64)
    return (series if series.null_count() == 0 else series.fill_null(np.nan)).to_numpy()


def _epoch_ms(series: pl.Series) -> np.ndarray:
    return series.dt.cast_time_unit("ms").to_physical().to_numpy()


def _tick_runs(ticks: pl.DataFrame) -> _Runs:
    """Ticks of one symbol, sorted, as one-row bars."""
    bid, ask = _floats(ticks["bid"]), _floats(ticks["ask"])
    mid = np.add(bid, ask)
    mid *= 0.5
    spread = np.subtract(ask, bid)
    all_quotes = ticks["bid"].null_count() == 0 and ticks["ask"].null_count() == 0
    quote = None if all_quotes else ~np.isnan(spread)
    if ticks["price"].null_count() == ticks.height:  # quotes only: the usual FX feed
        ref, volume, pv = mid, None, None
    else:
        price, size = _floats(ticks["price"]), _floats(ticks["size"])
        has_price = ~np.isnan(price)
        ref = np.where(has_price, price, mid)
        traded = has_price & ~np.isnan(size)
        volume, pv = np.where(traded, size, 0.0), np.where(traded, price * size, 0.0)
    columns: dict[str, np.ndarray | None] = {
        "open": ref, "high": ref, "low": ref, "close": ref, "bid_close": bid, "ask_close": ask,
        "volume": volume, "pv_sum": pv, "ref_sum": ref, "tick_count": None,
        "quote_count": None if all_quotes else quote,
        "spread_sum": spread if all_quotes else np.where(quote, spread, 0.0),
        "spread_max": spread if all_quotes else np.where(quote, spread, -np.inf),
    }
    return _Runs(ticks["symbol"][0], _epoch_ms(ticks["ts"]), columns, ticks["source"])


def _bar_runs(bars: pl.DataFrame) -> _Runs:
    """Finished bars of one symbol, sorted, with the sums behind their means rebuilt."""
    volume = bars["volume"].to_numpy()
    vwap, ticks, quotes = bars["vwap"].to_numpy(), bars["tick_count"].to_numpy(), bars["quote_count"].to_numpy()
    traded = volume > 0
    columns: dict[str, np.ndarray | None] = {
        name: _floats(bars[name]) for name in ("open", "high", "low", "close", "bid_close", "ask_close")
    }
    columns |= {
        "volume": volume,
        "pv_sum": np.where(traded, vwap * volume, 0.0),
        "ref_sum": np.where(traded, 0.0, vwap * ticks),
        "tick_count": ticks.astype(np.int64),
        "quote_count": quotes.astype(np.int64),
        "spread_sum": np.nan_to_num(_floats(bars["spread_mean"]) * quotes),
        "spread_max": np.nan_to_num(_floats(bars["spread_max"]), nan=-np.inf),
    }
    return _Runs(bars["symbol"][0], _epoch_ms(bars["ts"]), columns, bars["source"])


def _by_symbol(frame: pl.DataFrame) -> list[pl.DataFrame]:
    symbols = frame["symbol"]
    if symbols.len() == 0 or (symbols.null_count() == 0 and symbols.min() == symbols.max()):
        return [frame] if frame.height else []
    return frame.partition_by("symbol", maintain_order=True)


def sort_ticks(ticks: pl.DataFrame) -> pl.DataFrame:
    """Time order, keeping arrival order among equal timestamps (a stable sort)."""
    if ticks["ts"].is_sorted():
        return ticks
    return ticks.sort("ts", maintain_order=True)


def _minute_runs(ticks: pl.DataFrame) -> _Runs:
    runs = _tick_runs(sort_ticks(ticks))
    ts_ms = runs.ts_ms
    # Where each minute's first tick sits: a binary search per minute on the sorted times.
    edges = np.arange(ts_ms[0] // _MINUTE_MS, ts_ms[-1] // _MINUTE_MS + 1) * _MINUTE_MS
    starts = np.searchsorted(ts_ms, edges)
    keep = np.r_[starts[:-1] != starts[1:], True]  # of empty minutes' equal starts, the last has the ticks
    return runs.reduce(starts[keep], edges[keep])


def _stack(frames: list[pl.DataFrame]) -> pl.DataFrame:
    if not frames:
        return pl.DataFrame(schema=BAR_SCHEMA)
    return pl.concat(frames, how="vertical")


def ticks_to_m1(ticks: pl.DataFrame) -> pl.DataFrame:
    """M1 bars of ticks in :data:`models.market.ticks.TICK_SCHEMA` (any symbols, any order)."""
    return _stack([_minute_runs(part).finish(Timeframe.M1) for part in _by_symbol(ticks)])


def rollup_bars(bars: pl.DataFrame, tf: Timeframe, boundary: DayBoundary = DayBoundary.UTC) -> pl.DataFrame:
    """Bars of ``tf`` from finer finished bars sorted by symbol and ts (M1 -> H4, say)."""
    return _stack([_bar_runs(part).rollup(tf, boundary).finish(tf) for part in _by_symbol(bars)])


def aggregate_ticks(
    ticks: pl.DataFrame,
    timeframes: Iterable[Timeframe] = ALL_TIMEFRAMES,
    boundary: DayBoundary = DayBoundary.UTC,
) -> pl.DataFrame:
    """Bars at each requested timeframe, stacked, ordered by timeframe, symbol and ts."""
    return aggregate(ticks, None, timeframes, boundary)


def aggregate(
    ticks: pl.DataFrame | None,
    vendor: pl.DataFrame | None,
    timeframes: Iterable[Timeframe] = ALL_TIMEFRAMES,
    boundary: DayBoundary = DayBoundary.UTC,
) -> pl.DataFrame:
    """Bars at each requested timeframe from ticks and from finished bars a vendor served at
    their own timeframes (rows of :data:`BAR_SCHEMA`, ``timeframe`` saying which; see
    :func:`vendor_bars`), stacked and ordered by timeframe, symbol and ts.

    M1 is built from the ticks, and from vendor M1 bars for minutes without ticks; every
    longer timeframe rolls up the one below it, and takes a vendor bar of its own timeframe
    only for an interval the finer data left entirely empty. So a vendor's H1 bars make H1
    and longer bars, never M1..M30 ones: a finer timeframe is never invented.
    """
    wanted = set(timeframes)
    last = max((ALL_TIMEFRAMES.index(tf) for tf in wanted), default=-1)
    tick_parts = {part["symbol"][0]: part for part in (_by_symbol(ticks) if ticks is not None else [])}
    vendor_parts = {part["symbol"][0]: part for part in (_by_symbol(vendor) if vendor is not None else [])}
    frames: dict[Timeframe, list[pl.DataFrame]] = {tf: [] for tf in ALL_TIMEFRAMES}
    for symbol in dict.fromkeys([*tick_parts, *vendor_parts]):
        served = _vendor_levels(vendor_parts.get(symbol))
        runs = _minute_runs(tick_parts[symbol]) if symbol in tick_parts else None
        for tf in ALL_TIMEFRAMES[: last + 1]:
            if tf is not Timeframe.M1 and runs is not None:
                runs = runs.rollup(tf, boundary)
            if tf in served:
                runs = _fill_empty(runs, served[tf])
            if tf in wanted and runs is not None:
                frames[tf].append(runs.finish(tf))
    return _stack([frame for tf in ALL_TIMEFRAMES for frame in frames[tf]])


def _vendor_levels(bars: pl.DataFrame | None) -> dict[Timeframe, pl.DataFrame]:
    if bars is None or bars.is_empty():
        return {}
    return {Timeframe(tf): part.sort("ts") for (tf,), part in bars.partition_by("timeframe", as_dict=True).items()}


def _fill_empty(runs: _Runs | None, served: pl.DataFrame) -> _Runs | None:
    """``runs`` plus the served bars whose interval ``runs`` has no bar in (same open)."""
    if runs is not None:
        served = served.filter(~pl.col("ts").dt.epoch("ms").is_in(pl.Series(runs.ts_ms).implode()))
    if served.is_empty():
        return runs
    added = _bar_runs(served)
    if runs is None:
        return added
    order = np.argsort(np.r_[runs.ts_ms, added.ts_ms], kind="stable")
    columns = {
        name: None if runs.columns[name] is None and added.columns[name] is None
        else np.r_[_spelt_out(runs, name), _spelt_out(added, name)][order]
        for name in runs.columns
    }
    return _Runs(runs.symbol, np.r_[runs.ts_ms, added.ts_ms][order], columns, pl.concat([runs.source, added.source])[order])


def _spelt_out(runs: _Runs, name: str) -> np.ndarray:
    """A column of ``runs`` with its implicit value written out (None: zero sums, one count)."""
    values = runs.columns[name]
    if values is not None:
        return values
    return np.ones(len(runs.ts_ms), dtype=np.int64) if name in _COUNTS else np.zeros(len(runs.ts_ms))


def vendor_source(vendor: str, timeframe: pl.Expr) -> pl.Expr:
    """``source`` of bars a vendor served rather than built from its ticks: ``polygon:m1``,
    ``file:h1``."""
    return pl.concat_str(pl.lit(vendor + ":"), timeframe.str.to_lowercase())


def vendor_bars(candles: pl.DataFrame, symbol: str) -> pl.DataFrame:
    """A vendor's bars (ts, timeframe, open, high, low, close, volume, vwap, tick_count,
    source) as rows of :data:`BAR_SCHEMA` at their own timeframe: no quotes behind them, so
    no bid/ask or spread."""
    timeframe = pl.col("timeframe") if "timeframe" in candles.columns else pl.lit(Timeframe.M1.value)
    return candles.sort("ts").select(
        pl.lit(symbol).alias("symbol"),
        timeframe.alias("timeframe"),
        "ts", "open", "high", "low", "close",
        pl.lit(None, pl.Float64).alias("bid_close"),
        pl.lit(None, pl.Float64).alias("ask_close"),
        pl.col("volume").fill_null(0.0),
        pl.col("tick_count").fill_null(1).clip(lower_bound=1),
        pl.lit(0, pl.UInt32).alias("quote_count"),
        pl.lit(None, pl.Float64).alias("spread_mean"),
        pl.lit(None, pl.Float64).alias("spread_max"),
        pl.col("vwap").fill_null(pl.col("close")),
        pl.col("source"),
    ).cast(BAR_SCHEMA)  # type: ignore[arg-type]


def carried_bar_opens(
    start: datetime, timeframes: Iterable[Timeframe], boundary: DayBoundary
) -> dict[Timeframe, datetime]:
    """Per timeframe, the open of the bar that began before ``start`` and runs into it."""
    opens = {tf: bar_open_at(start, tf, boundary) for tf in timeframes}
    return {tf: opened for tf, opened in opens.items() if opened < start}


def window_lookback_start(start: datetime, timeframes: Iterable[Timeframe], boundary: DayBoundary) -> datetime:
    """Earliest tick needed to build every bar that overlaps a window starting at ``start``."""
    return min([start, *carried_bar_opens(start, timeframes, boundary).values()])


def bars_for_window(
    ticks: pl.DataFrame,
    start: datetime,
    timeframes: Iterable[Timeframe] = ALL_TIMEFRAMES,
    boundary: DayBoundary = DayBoundary.UTC,
    vendor: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Bars overlapping a window that starts at ``start``, built from ticks since
    :func:`window_lookback_start` up to the window's end, and from ``vendor`` bars (rows of
    :data:`BAR_SCHEMA`, see :func:`vendor_bars`) where the ticks leave intervals empty.

    A bar that runs past the window end holds the data up to it, as a live feed would; the
    window that contains the bar's end completes it. Bars that ended before ``start`` are
    left out: earlier windows own them.
    """
    timeframes = tuple(timeframes)
    bars = aggregate(ticks if ticks.height else None, vendor, timeframes, boundary)
    carried = carried_bar_opens(start, timeframes, boundary)
    is_carried = pl.any_horizontal(
        pl.lit(False), *((pl.col("timeframe") == tf.value) & (pl.col("ts") == opened) for tf, opened in carried.items())
    )
    return bars.filter((pl.col("ts") >= start) | is_carried)
