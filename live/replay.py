"""Replay: stored bars -> ``bars.{SYM}.{TF}`` at a chosen speed, for paper trading, demos
and tests.

Bars go out in the order they became known (their close time; symbols of one moment
together), each with its ``Nats-Msg-Id`` ``bar:SYM:TF:ts`` to the ``BARS`` stream, paced so
that a bar closing ``d`` after the first is published ``d / speed`` after it (``speed`` 1: real
time, 60: a minute a second, None: as fast as the bus acknowledges).

A restarted replay publishes nothing twice: it starts after the newest bar the stream already
holds for each subject (:func:`resources.bus.streams.last_bar_ts`), and a bar whose first
publish was stored but not acknowledged (the crash came between) is recognised by its id within
the stream's duplicate window. Bars of a subject are published one at a time, each
acknowledged before the next, so the stream never holds a later bar before an earlier one; the
bars of one moment (several symbols) go out together.

No Dagster and no warehouse here: the caller hands over frames of bars (the CLI reads them
from ``aggregates`` a month at a time).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime

import polars as pl

from live.publishing import DurablePublisher
from models.market.candles import BAR_SCHEMA
from models.market.timeframes import DayBoundary, Timeframe, bar_close_expr
from resources.bus.client import NatsBus, StreamSpec
from resources.bus.messages import bar_msg_id, encode_bar
from resources.bus.streams import bars_stream, last_bar_ts
from resources.bus.subjects import bars as bars_subject

log = logging.getLogger("tradeforge.live")


def parse_speed(text: str) -> float | None:
    """``max`` -> None (as fast as possible); ``1`` -> real time; ``60`` -> a minute a second."""
    if text.strip().lower() in ("max", "fast", "0"):
        return None
    try:
        speed = float(text)
    except ValueError:
        raise ValueError(f"--speed {text!r}: use max, 1 (real time), 60 (a minute a second) or any positive number") from None
    if speed <= 0:
        raise ValueError(f"--speed {text!r} must be positive (or max)")
    return speed


@dataclass
class ReplayStats:
    published: int = 0
    already_on_bus: int = 0  # at or before the stream's newest bar of their subject: skipped
    duplicates: int = 0  # sent, and the stream said it had them (a restart inside the window)
    first_close: datetime | None = None
    last_close: datetime | None = None
    seconds: float = 0.0

    @property
    def seen(self) -> int:
        return self.published + self.already_on_bus + self.duplicates


def with_close_ts(bars: pl.DataFrame, boundary: DayBoundary = DayBoundary.UTC) -> pl.DataFrame:
    """Bars of :data:`BAR_SCHEMA` (any timeframes) with ``close_ts``, in the order they became known."""
    parts = [part.with_columns(bar_close_expr(pl.col("ts"), Timeframe(tf), boundary).alias("close_ts"))
             for (tf,), part in bars.select(list(BAR_SCHEMA)).partition_by("timeframe", as_dict=True).items()]
    if not parts:
        return bars.select(list(BAR_SCHEMA)).with_columns(pl.col("ts").alias("close_ts"))
    return pl.concat(parts).sort("close_ts", "timeframe", "symbol")


class Replay:
    def __init__(self, bus: NatsBus, *, speed: float | None = None, stream: StreamSpec | None = None,
                 boundary: DayBoundary = DayBoundary.UTC, resume: bool = True,
                 progress: Callable[[str], None] | None = None, progress_every_s: float = 5.0,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, monotonic: Callable[[], float] = time.monotonic) -> None:
        if speed is not None and speed <= 0:
            raise ValueError("speed must be positive, or None for as fast as possible")
        self.publisher = DurablePublisher(bus, stream or bars_stream())
        self.speed, self.boundary, self.resume = speed, boundary, resume
        self.progress = progress or (lambda line: log.info("%s", line))
        self.progress_every_s = progress_every_s
        self.sleep, self.monotonic = sleep, monotonic
        self.stats = ReplayStats()
        self._last: dict[tuple[str, str], int | None] = {}
        self._anchor: tuple[float, int] | None = None  # (monotonic, close ms) of the first bar sent
        self._next_line = 0.0

    async def _last_stored(self, symbol: str, timeframe: str) -> int | None:
        key = (symbol, timeframe)
        if key not in self._last:
            self._last[key] = await last_bar_ts(self.publisher.bus.js, symbol, timeframe, self.publisher.stream.name) if self.resume else None
            if self._last[key] is not None:
                self.progress(f"{symbol} {timeframe}: the stream has bars up to {_dt(self._last[key]):%Y-%m-%d %H:%M} UTC: "
                              f"resuming after it")
        return self._last[key]

    async def _pace(self, close_ms: int) -> None:
        if self.speed is None:
            return
        if self._anchor is None:
            self._anchor = (self.monotonic(), close_ms)
            return
        wall0, close0 = self._anchor
        wait = wall0 + (close_ms - close0) / 1000 / self.speed - self.monotonic()
        if wait > 0:
            await self.sleep(wait)

    async def _publish(self, bar: dict) -> None:
        ts_ms = round(bar["ts"].timestamp() * 1000)
        stored = await self.publisher.publish(bars_subject(bar["symbol"], bar["timeframe"]), encode_bar(bar),
                                              bar_msg_id(bar["symbol"], bar["timeframe"], ts_ms))
        if stored:
            self.stats.published += 1
        else:
            self.stats.duplicates += 1

    def _line(self, window: tuple[datetime, datetime] | None, force: bool = False) -> None:
        now = self.monotonic()
        if not force and now < self._next_line:
            return
        self._next_line = now + self.progress_every_s
        s = self.stats
        elapsed = max(now - self._started, 1e-9)
        at, share = "", ""
        if s.last_close is not None:
            at = f" up to {s.last_close:%Y-%m-%d %H:%M} UTC"
            if window is not None and window[1] > window[0]:
                done = (min(s.last_close, window[1]) - window[0]) / (window[1] - window[0])
                share = f" ({max(done, 0.0):.0%} of the range)"
        self.progress(f"replay: {s.seen:,} bars{at}{share}, {s.seen / elapsed:,.0f} bars/s; published {s.published:,}, "
                      f"already on the bus {s.already_on_bus + s.duplicates:,}")

    async def run(self, chunks: Iterable[pl.DataFrame], window: tuple[datetime, datetime] | None = None) -> ReplayStats:
        """Publish every bar of ``chunks`` (frames of BAR_SCHEMA rows, each chunk later than the
        one before); ``window`` (the range asked for) lets the progress lines show how far."""
        self._started = self.monotonic()
        self._next_line = self._started + self.progress_every_s
        await self.publisher.start()
        try:
            for chunk in chunks:
                if chunk.is_empty():
                    continue
                bars = with_close_ts(chunk, self.boundary)
                for (close,), group in bars.partition_by("close_ts", as_dict=True, maintain_order=True).items():
                    fresh = []
                    for bar in group.iter_rows(named=True):
                        last = await self._last_stored(bar["symbol"], bar["timeframe"])
                        if last is not None and round(bar["ts"].timestamp() * 1000) <= last:
                            self.stats.already_on_bus += 1
                        else:
                            fresh.append(bar)
                    if fresh:
                        await self._pace(round(close.timestamp() * 1000))
                        await asyncio.gather(*(self._publish(bar) for bar in fresh))  # one bar per subject
                        self.stats.first_close = self.stats.first_close or close
                    self.stats.last_close = close
                    self._line(window)
            self.stats.seconds = self.monotonic() - self._started
            self._line(window, force=True)
        finally:
            await self.publisher.close()
        return self.stats


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)
