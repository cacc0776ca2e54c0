"""Bars of a live tick stream, closed as time passes, built by the batch's own functions.

:class:`LiveCandles` holds the ticks of one symbol's open bars. When the clock passes a bar's
end (the caller adds its grace for late ticks), the bar is computed with
:func:`models.market.candles.aggregate` over exactly that bar's ticks, the function the batch
runs over a day: a live bar therefore equals the batch bar of the same ticks, column for
column. Ticks go through the batch's row rules (:func:`models.market.quality.reason_expr`)
first; what cannot be judged live is the day's median spread (``implausible_spread`` against
50x the median needs the whole day), so only the 5%-of-mid limit applies here.

Coverage is explicit, so nothing is published from a partial record:
- ``start_ms``: the builder has every tick from here on; a bar that opened earlier is partial
  and never emitted.
- :meth:`fill`: the ticks of ``[start, end)`` from another source (the vendor's REST history
  after a disconnect) replace whatever live ticks arrived in that range, and live ticks
  arriving there later are dropped: each minute comes wholly from one source, so nothing is
  counted twice and nothing is missing at the seams.
- ``closed_until``: bars ending at or before it are emitted; a tick older than it is late
  (counted, not used: every bar containing it may already be out).
- ``published``: per timeframe, the last bar already on the bus (a restarted collector
  resumes after it).

Pure: no clock, no I/O; the collector decides when to call :meth:`close`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime

import polars as pl

from models.market.candles import BAR_SCHEMA, aggregate
from models.market.instruments import instrument
from models.market.quality import TickRules, reason_expr
from models.market.ticks import TICK_SCHEMA, TS, conform_ticks
from models.market.timeframes import ALL_TIMEFRAMES, DayBoundary, Timeframe, bar_close_expr, bar_open_at

MINUTE_MS = 60_000
LIVE_BAR_SCHEMA = {**BAR_SCHEMA, "close_ts": TS}
_FAR_PAST, _FAR_FUTURE = datetime(1970, 1, 1, tzinfo=UTC), datetime(9999, 1, 1, tzinfo=UTC)


def floor_minute(ms: int) -> int:
    return ms // MINUTE_MS * MINUTE_MS


def ceil_minute(ms: int) -> int:
    return -(-ms // MINUTE_MS) * MINUTE_MS


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


def _epoch_ms(frame: pl.DataFrame) -> pl.Series:
    return frame["ts"].dt.epoch("ms")


class LiveCandles:
    """One symbol's bars at ``timeframes``, from ticks in :data:`TICK_SCHEMA`."""

    def __init__(self, symbol: str, timeframes: Iterable[Timeframe], start_ms: int, *,
                 boundary: DayBoundary = DayBoundary.UTC, published: Mapping[Timeframe, int | None] | None = None,
                 rules: TickRules = TickRules(), band: tuple[float, float] | None = None) -> None:
        self.symbol = symbol
        self.timeframes = tuple(sorted(set(timeframes), key=ALL_TIMEFRAMES.index))
        if not self.timeframes:
            raise ValueError("no timeframe to build")
        self.boundary = boundary
        self.start_ms = floor_minute(start_ms)
        self.closed_until = self.start_ms
        self.published: dict[Timeframe, int | None] = {tf: (published or {}).get(tf) for tf in self.timeframes}
        self._reasons = reason_expr(symbol, _FAR_PAST, _FAR_FUTURE, None, rules,
                                    band if band is not None else instrument(symbol).plausible_prices())
        self._ticks = pl.DataFrame(schema=TICK_SCHEMA)
        self._pending: list[pl.DataFrame] = []
        self._filled: list[tuple[int, int]] = []  # ranges owned by another source
        self.counts: Counter[str] = Counter()  # accepted, late, replaced, rejected:<reason>, filled

    # -- ticks in -------------------------------------------------------------------------

    def _clean(self, ticks: pl.DataFrame) -> pl.DataFrame:
        tagged = conform_ticks(ticks).with_columns(self._reasons.alias("_reason"))
        bad = tagged.filter(pl.col("_reason").is_not_null())
        for reason, count in bad.group_by("_reason").len().iter_rows():
            self.counts[f"rejected:{reason}"] += count
        good = tagged.filter(pl.col("_reason").is_null()).drop("_reason")
        if good["vendor_seq"].null_count() < good.height:  # the source's own id seen before: a repeat
            seen = pl.concat([self._ticks["vendor_seq"], *(p["vendor_seq"] for p in self._pending)]).drop_nulls()
            seq = pl.col("vendor_seq")
            repeat = seq.is_not_null() & (seq.is_in(seen.implode()) | ~seq.is_first_distinct())
            self.counts["rejected:duplicate"] += good.filter(repeat).height
            good = good.filter(~repeat)
        return good

    def _in_filled(self, ms: pl.Series) -> pl.Series:
        inside = pl.repeat(False, ms.len(), eager=True)
        for start, end in self._filled:
            inside = inside | ((ms >= start) & (ms < end))
        return inside

    def add(self, ticks: pl.DataFrame) -> pl.DataFrame:
        """Live ticks; returns those kept (clean, not late, not in a filled range)."""
        if ticks.is_empty():
            return ticks
        good = self._clean(ticks)
        ms = _epoch_ms(good)
        late = ms < self.closed_until
        replaced = self._in_filled(ms) & ~late
        self.counts["late"] += int(late.sum())
        self.counts["replaced"] += int(replaced.sum())
        kept = good.filter(~late & ~replaced)
        if kept.height:
            self._pending.append(kept)
            self.counts["accepted"] += kept.height
        return kept

    def fill(self, start_ms: int, end_ms: int, ticks: pl.DataFrame) -> int:
        """``ticks`` are every tick of ``[start_ms, end_ms)``: they replace the live ones
        there (and any arriving later). Returns how many were kept."""
        self._consolidate()
        ms = _epoch_ms(self._ticks)
        dropped = (ms >= start_ms) & (ms < end_ms)
        self.counts["replaced"] += int(dropped.sum())
        self._ticks = self._ticks.filter(~dropped)
        self._filled.append((start_ms, end_ms))
        good = self._clean(ticks) if ticks.height else ticks
        if good.height:
            ms = _epoch_ms(good)
            inside = (ms >= start_ms) & (ms < end_ms)
            late = inside & (ms < self.closed_until)
            self.counts["late"] += int(late.sum())
            good = good.filter(inside & ~late)
        if good.height:
            self._pending.append(good.select(list(TICK_SCHEMA)))
            self.counts["filled"] += good.height
        return good.height

    def _consolidate(self) -> pl.DataFrame:
        if self._pending:
            self._ticks = pl.concat([self._ticks, *(p.select(list(TICK_SCHEMA)) for p in self._pending)], how="vertical")
            self._pending = []
            if not self._ticks["ts"].is_sorted():
                self._ticks = self._ticks.sort("ts", maintain_order=True)  # arrival order among equal times
        return self._ticks

    # -- bars out -------------------------------------------------------------------------

    def close(self, until_ms: int) -> pl.DataFrame:
        """Every bar that ends by ``until_ms`` (rounded down to the minute) and was not emitted
        yet, finer timeframes first, in time order (:data:`LIVE_BAR_SCHEMA`)."""
        until = floor_minute(until_ms)
        if until <= self.closed_until:
            return pl.DataFrame(schema=LIVE_BAR_SCHEMA)
        ticks = self._consolidate()
        ms = _epoch_ms(ticks)
        frames, keep_from = [], until
        for tf in self.timeframes:
            first = _ms(bar_open_at(_dt(self.closed_until), tf, self.boundary))
            still_open = _ms(bar_open_at(_dt(until), tf, self.boundary))
            keep_from = min(keep_from, still_open)
            if still_open <= first:
                continue
            window = ticks.filter((ms >= first) & (ms < still_open))
            if window.is_empty():
                continue
            bars = aggregate(window, None, [tf], self.boundary)
            floor = max(self.start_ms - 1, self.published[tf] if self.published[tf] is not None else -1)
            bars = bars.filter(pl.col("ts").dt.epoch("ms") > floor)
            if bars.height:
                self.published[tf] = int(bars["ts"].dt.epoch("ms").max())  # type: ignore[arg-type]
                frames.append(bars.with_columns(bar_close_expr(pl.col("ts"), tf, self.boundary).alias("close_ts")))
        self.closed_until = until
        self._ticks = ticks.filter(ms >= keep_from)
        self._filled = [(s, e) for s, e in self._filled if e > until]
        if not frames:
            return pl.DataFrame(schema=LIVE_BAR_SCHEMA)
        return pl.concat(frames, how="vertical").cast(LIVE_BAR_SCHEMA)  # type: ignore[arg-type]

    @property
    def buffered(self) -> int:
        return self._ticks.height + sum(p.height for p in self._pending)
