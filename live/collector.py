"""The live collector: Polygon's WebSocket feed -> ``ticks.{SYM}`` -> bars -> ``bars.{SYM}.{TF}``.

One connection per Polygon market (``forex`` for FX and metals, quotes ``C.EUR/USD``;
``crypto``, trades ``XT.BTC-USD``) through the official ``massive`` WebSocket client. Every
tick is checked by the batch's row rules and published on ``ticks.{SYM}`` (core NATS); bars
are built by :class:`models.market.live_candles.LiveCandles` (the batch's own ``aggregate``)
and published on ``bars.{SYM}.{TF}`` to the JetStream stream ``BARS`` once the clock passes
their end plus ``grace_s``, each with its ``Nats-Msg-Id`` ``bar:SYM:TF:ts``.

Nothing is lost or doubled across drops and restarts, because every minute's ticks come wholly
from one source:
- A connection is *live* from ``live_from``: the first whole minute that starts at least
  ``margin_s`` after its first message (the subscription's answer). Ticks before it are
  dropped.
- When it drops, the minutes from the last message received (less ``margin_s``) on are a gap,
  and so is the start: from where the stream's bars end (a restart resumes there, at most
  ``max_backfill_s`` back) or the open of the current bar. Bars wait at a gap's start; once
  the next connection is live and ``backfill_delay_s`` has passed, the gap's ticks come from
  Polygon's REST history (the vendor the batch uses) and the bars go out.
- Reconnects back off exponentially (``backoff_initial_s`` .. ``backoff_max_s``), in this
  loop and in the websockets library's own retries of a refused connection.
- Bars are published one at a time, each acknowledged before the next
  (:class:`live.publishing.DurablePublisher`): a bus outage delays them, it loses none.

``grace_s`` should cover the feed's latency: a tick that arrives after its minute was closed
is counted as late and left to the batch. No Dagster here: the REST history is any object
with ``fetch_ticks(symbol, start, end)`` (the CLI hands it the Polygon vendor).
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections import Counter
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import polars as pl

from live.publishing import DurablePublisher
from models.market.instruments import AssetClass, instrument
from models.market.live_candles import LiveCandles, ceil_minute, floor_minute
from models.market.ticks import TS
from models.market.timeframes import DayBoundary, Timeframe, bar_close_at, bar_open_at
from resources.bus.client import NatsBus, StreamSpec
from resources.bus.messages import bar_msg_id, encode_bar, encode_ticks
from resources.bus.streams import bars_stream, last_bar_ts
from resources.bus.subjects import bars as bars_subject
from resources.bus.subjects import ticks as ticks_subject

log = logging.getLogger("tradeforge.live")

SOURCE = "polygon"  # the same source name as the REST vendor's rows, so bars match the batch's
_ID_BITS = 48  # a crypto trade's vendor_seq: exchange << 48 | id, as resources.vendors.polygon packs REST trades
DEFAULT_TIMEFRAMES = (Timeframe.M1, Timeframe.M5, Timeframe.M15, Timeframe.M30, Timeframe.H1)


class CollectorError(RuntimeError):
    """A failure the collector cannot wait out (a refused key, a bad setting): one line."""


class TickHistory(Protocol):
    """Where a gap's ticks come from: the Polygon REST vendor, or anything alike."""

    def fetch_ticks(self, symbol: str, start: datetime, end: datetime) -> pl.DataFrame: ...


@dataclass(frozen=True)
class CollectorConfig:
    symbols: tuple[str, ...]
    timeframes: tuple[Timeframe, ...] = DEFAULT_TIMEFRAMES
    boundary: DayBoundary = DayBoundary.UTC
    ws_url: str = "wss://socket.massive.com"
    grace_s: float = 2.0
    margin_s: float = 2.0
    backfill_delay_s: float = 2.0
    max_backfill_s: float = 86_400.0
    check_interval_s: float = 0.25
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    publish_ticks: bool = True
    open_timeout_s: float = 10.0
    ping_interval_s: float = 20.0

    def __post_init__(self) -> None:
        if not self.symbols:
            raise CollectorError("no symbols to collect")
        for symbol in self.symbols:
            instrument(symbol)  # an unknown name fails here
        parts = urlsplit(self.ws_url)
        if parts.scheme not in ("ws", "wss") or not parts.netloc:
            raise CollectorError(f"POLYGON_WS_URL {self.ws_url!r} is not a ws:// or wss:// URL")
        if not self.timeframes:
            raise CollectorError("no timeframes to build")


@dataclass(frozen=True)
class Feed:
    """One Polygon market: its symbols, the topic of each, the event kind carried."""

    market: str  # massive's Market value: "forex" or "crypto"
    symbols: tuple[str, ...]

    def topic(self, symbol: str) -> str:
        base, quote = instrument(symbol).currencies
        return f"C.{base}/{quote}" if self.market == "forex" else f"XT.{base}-{quote}"

    def pairs(self) -> dict[str, str]:
        """Polygon's pair name (``EUR/USD``, ``BTC-USD``) -> our symbol."""
        return {self.topic(s).split(".", 1)[1]: s for s in self.symbols}


def feeds_of(symbols: tuple[str, ...]) -> list[Feed]:
    crypto = tuple(s for s in symbols if instrument(s).asset_class is AssetClass.CRYPTO)
    forex = tuple(s for s in symbols if s not in crypto)
    return [feed for feed in (Feed("forex", forex), Feed("crypto", crypto)) if feed.symbols]


@dataclass
class Gap:
    """Minutes ``[start, end)`` whose ticks must come from the REST history; ``end`` is None
    while the feed is down."""

    start: int
    end: int | None = None
    fetching: bool = False
    failures: int = 0
    next_try: float = 0.0  # time.monotonic()


@dataclass
class Connection:
    feed: Feed
    live_from: int | None = None
    last_message_ms: int | None = None
    messages: int = 0


@dataclass
class CollectorStats:
    received: Counter = field(default_factory=Counter)  # events per symbol, as received
    before_live: Counter = field(default_factory=Counter)  # dropped: their minute comes from the backfill
    ticks_published: int = 0
    ticks_unpublished: int = 0
    bars_published: int = 0
    bars_already_stored: int = 0
    connections: int = 0
    drops: int = 0
    backfills: list = field(default_factory=list)  # (symbol, start_ms, end_ms, ticks kept)
    statuses: list = field(default_factory=list)  # Polygon status messages that are not OK


def exponential_backoff(initial_s: float, max_s: float) -> Callable[[], Generator[float]]:
    """Delays that start at ``initial_s`` (with up to 50% jitter) and double to ``max_s``."""

    def delays() -> Generator[float]:
        delay = initial_s
        while True:
            yield delay * (1 + random.random() / 2)
            delay = min(delay * 2, max_s)

    return delays


_OK_STATUSES = {"connected", "auth_success", "success"}


class Collector:
    def __init__(self, config: CollectorConfig, api_key: str, bus: NatsBus, history: TickHistory, *,
                 clock: Callable[[], float] = time.time, stream: StreamSpec | None = None,
                 progress: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.api_key = api_key
        self.history = history
        self.clock = clock
        self.stream = stream or bars_stream()
        self.publisher = DurablePublisher(bus, self.stream)
        self.progress = progress or (lambda line: log.info("%s", line))
        self.feeds = feeds_of(config.symbols)
        self.builders: dict[str, LiveCandles] = {}
        self.gaps: dict[str, list[Gap]] = {s: [] for s in config.symbols}
        self.stats = CollectorStats()
        self._stopping = asyncio.Event()
        self._clients: dict[str, Any] = {}
        self._fetches: set[asyncio.Task] = set()
        self._delays = exponential_backoff(config.backoff_initial_s, config.backoff_max_s)

    @property
    def bus(self) -> NatsBus:
        return self.publisher.bus

    def now_ms(self) -> int:
        return int(self.clock() * 1000)

    # -- start: resume where the stream's bars end ---------------------------------------------

    async def _resume(self) -> None:
        now = self.now_ms()
        oldest = floor_minute(now - int(self.config.max_backfill_s * 1000))
        for symbol in self.config.symbols:
            published, starts = {}, []
            for tf in self.config.timeframes:
                last = await last_bar_ts(self.bus.js, symbol, tf.value, self.stream.name)
                published[tf] = last
                if last is not None:
                    starts.append(_ms(bar_close_at(_dt(last), tf, self.config.boundary)))
                else:
                    starts.append(_ms(bar_open_at(_dt(now), tf, self.config.boundary)))
            start = max(oldest, floor_minute(min(starts)))
            self.builders[symbol] = LiveCandles(symbol, self.config.timeframes, start, boundary=self.config.boundary,
                                                published=published)
            self.gaps[symbol] = [Gap(start)]
            resumed = [f"{tf.value} after {_dt(v):%Y-%m-%d %H:%M}" for tf, v in published.items() if v is not None]
            self.progress(f"{symbol}: bars from {_dt(start):%Y-%m-%d %H:%M} UTC"
                          + (f" (the stream has {', '.join(resumed)})" if resumed else " (nothing on the stream yet)"))

    # -- the feeds -------------------------------------------------------------------------

    async def _feed(self, feed: Feed) -> None:
        from massive import WebSocketClient
        from massive.exceptions import AuthError

        parts = urlsplit(self.config.ws_url)
        delays = self._delays()
        while not self._stopping.is_set():
            connection = Connection(feed)
            client = WebSocketClient(
                api_key=self.api_key, feed=parts.netloc + parts.path.rstrip("/"), market=feed.market, raw=True,
                subscriptions=[feed.topic(s) for s in feed.symbols], max_reconnects=0, secure=parts.scheme == "wss",
            )
            self._clients[feed.market] = client

            async def on_message(message: str | bytes, connection: Connection = connection) -> None:
                await self._on_message(connection, message)

            try:
                await client.connect(
                    on_message, reconnect_delays=self._delays, open_timeout=self.config.open_timeout_s,
                    ping_interval=self.config.ping_interval_s, ping_timeout=self.config.ping_interval_s, max_size=2**24,
                )
                reason = "closed by the server"
            except AuthError as exc:
                raise CollectorError(f"Polygon refused the API key ({exc}): check POLYGON_API_KEY") from None
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # dropped (ConnectionClosedError), refused, timed out; or a message this
                # code could not process: handled as a drop too, so its minutes come from REST, not from a half-read batch
                reason = f"{type(exc).__name__}: {exc}"
            finally:
                self._clients.pop(feed.market, None)
            if self._stopping.is_set():
                return
            self._lost(connection, reason)
            if connection.messages:
                delays = self._delays()  # it worked for a while: start the backoff again
            await asyncio.sleep(next(delays))

    async def _on_message(self, connection: Connection, raw: str | bytes) -> None:
        from massive.websocket.models import Market, parse

        now = self.now_ms()
        try:
            messages = json.loads(raw)
        except ValueError:
            log.warning("Polygon %s sent a message that is not JSON: %r", connection.feed.market, raw[:120])
            return
        if not isinstance(messages, list):
            messages = [messages]
        connection.messages += 1
        connection.last_message_ms = now
        if connection.live_from is None:
            self._went_live(connection, now)
        for message in messages:
            if isinstance(message, dict) and message.get("ev") == "status" and message.get("status") not in _OK_STATUSES:
                self.stats.statuses.append((message.get("status"), message.get("message")))
                log.warning("Polygon %s: %s: %s", connection.feed.market, message.get("status"), message.get("message"))
        events = parse([m for m in messages if isinstance(m, dict) and "ev" in m], log, Market(connection.feed.market))
        if events:
            await self._ticks_in(connection, events)

    def _went_live(self, connection: Connection, now_ms: int) -> None:
        connection.live_from = ceil_minute(now_ms + int(self.config.margin_s * 1000))
        self.stats.connections += 1
        for symbol in connection.feed.symbols:
            for gap in self.gaps[symbol]:
                if gap.end is None:
                    gap.end = max(gap.start, connection.live_from)
            self.gaps[symbol] = [g for g in self.gaps[symbol] if g.end is None or g.end > g.start or g.fetching]
        self.progress(f"Polygon {connection.feed.market}: live from {_dt(connection.live_from):%H:%M} UTC "
                      f"({', '.join(connection.feed.topic(s) for s in connection.feed.symbols)})")

    def _lost(self, connection: Connection, reason: str) -> None:
        self.stats.drops += 1
        if connection.live_from is None:
            self.progress(f"Polygon {connection.feed.market}: no connection ({reason}); retrying")
            return
        margin = int(self.config.margin_s * 1000)
        for symbol in connection.feed.symbols:
            start = max(floor_minute((connection.last_message_ms or connection.live_from) - margin),
                        self.builders[symbol].closed_until)
            gaps = self.gaps[symbol]
            if gaps and gaps[-1].end is not None and start <= gaps[-1].end and not gaps[-1].fetching:
                gaps[-1].end = None  # the previous gap is not filled yet: it grows
            else:
                gaps.append(Gap(start))
        self.progress(f"Polygon {connection.feed.market}: connection lost ({reason}); the missed minutes will be "
                      f"backfilled over REST")

    async def _ticks_in(self, connection: Connection, events: list[Any]) -> None:
        pairs = connection.feed.pairs()
        rows: dict[str, list[tuple]] = {}
        for event in events:
            symbol = pairs.get(getattr(event, "pair", None) or "")
            if symbol is None or event.timestamp is None:
                continue
            if connection.feed.market == "forex":
                row = (event.timestamp, event.bid_price, event.ask_price, None, None, None)
            else:
                row = (event.timestamp, None, None, event.price, event.size, _trade_seq(event.exchange, event.id))
            rows.setdefault(symbol, []).append(row)
        for symbol, values in rows.items():
            frame = pl.DataFrame(values, schema={"ts": pl.Int64, "bid": pl.Float64, "ask": pl.Float64, "price": pl.Float64,
                                                 "size": pl.Float64, "vendor_seq": pl.Int64}, orient="row")
            frame = frame.with_columns(pl.col("ts").cast(TS), pl.lit(symbol).alias("symbol"), pl.lit(SOURCE).alias("source"))
            self.stats.received[symbol] += frame.height
            live = frame.filter(pl.col("ts").dt.epoch("ms") >= connection.live_from)
            self.stats.before_live[symbol] += frame.height - live.height
            kept = self.builders[symbol].add(live) if live.height else live
            if self.config.publish_ticks and kept.height:
                await self._publish_ticks(symbol, kept)

    async def _publish_ticks(self, symbol: str, ticks: pl.DataFrame) -> None:
        try:
            if not self.bus.connected:
                raise ConnectionError("bus not connected")
            await self.bus.publish(ticks_subject(symbol), encode_ticks(symbol, SOURCE, ticks))
            self.stats.ticks_published += ticks.height
        except Exception:  # ticks are telemetry: a bus outage costs them, never the bars
            self.stats.ticks_unpublished += ticks.height

    # -- bars out and backfills ------------------------------------------------------------

    async def _closer(self) -> None:
        grace = int(self.config.grace_s * 1000)
        while not self._stopping.is_set():
            now = self.now_ms()
            for symbol in self.config.symbols:
                held = min((g.start for g in self.gaps[symbol]), default=None)
                until = now - grace if held is None else min(now - grace, held)
                bars = self.builders[symbol].close(until)
                if bars.height:
                    await self._publish_bars(bars)
            self._start_backfills(now)
            try:
                await asyncio.wait_for(self._stopping.wait(), self.config.check_interval_s)
            except TimeoutError:
                pass

    async def _publish_bars(self, bars: pl.DataFrame) -> None:
        for bar in bars.sort("close_ts", maintain_order=True).iter_rows(named=True):
            ts_ms = _ms(bar["ts"])
            stored = await self.publisher.publish(bars_subject(bar["symbol"], bar["timeframe"]), encode_bar(bar),
                                                  bar_msg_id(bar["symbol"], bar["timeframe"], ts_ms))
            if stored:
                self.stats.bars_published += 1
            else:
                self.stats.bars_already_stored += 1
            log.debug("bar %s %s %s: %s ticks", bar["symbol"], bar["timeframe"], bar["ts"], bar["tick_count"])

    def _start_backfills(self, now_ms: int) -> None:
        delay = int(self.config.backfill_delay_s * 1000)
        for symbol, gaps in self.gaps.items():
            for gap in gaps:
                if gap.end is None or gap.fetching or now_ms < gap.end + delay or time.monotonic() < gap.next_try:
                    continue
                gap.fetching = True
                task = asyncio.get_running_loop().create_task(self._backfill(symbol, gap, gap.end))
                self._fetches.add(task)
                task.add_done_callback(self._fetches.discard)

    async def _backfill(self, symbol: str, gap: Gap, end: int) -> None:
        start = gap.start
        try:
            ticks = await asyncio.to_thread(self.history.fetch_ticks, symbol, _dt(start), _dt(end))
        except Exception as exc:  # the vendor's errors say what went wrong; the bars wait
            gap.failures += 1
            gap.next_try = time.monotonic() + min(self.config.backoff_initial_s * 2**gap.failures, self.config.backoff_max_s)
            gap.fetching = False
            self.progress(f"{symbol}: backfill {_dt(start):%H:%M}-{_dt(end):%H:%M} failed ({exc}); its bars wait, "
                          f"retrying (attempt {gap.failures + 1})")
            return
        kept = self.builders[symbol].fill(start, end, ticks)
        self.stats.backfills.append((symbol, start, end, kept))
        gap.fetching = False
        gap.start = end
        if gap.end == end:
            self.gaps[symbol] = [g for g in self.gaps[symbol] if g is not gap]
        self.progress(f"{symbol}: backfilled {_dt(start):%Y-%m-%d %H:%M}-{_dt(end):%H:%M} UTC over REST ({kept:,} ticks)")

    # -- run and stop ----------------------------------------------------------------------

    async def run(self) -> CollectorStats:
        """Collect until :meth:`stop`; raises :class:`CollectorError` on what cannot be waited out."""
        await self.publisher.start()
        await self._resume()
        tasks = [asyncio.create_task(self._feed(feed), name=f"feed-{feed.market}") for feed in self.feeds]
        tasks.append(asyncio.create_task(self._closer(), name="closer"))
        stop = asyncio.create_task(self._stopping.wait())
        try:
            done, _ = await asyncio.wait([*tasks, stop], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stop and not task.cancelled() and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            self._stopping.set()
            for client in list(self._clients.values()):
                try:
                    await client.close()
                except Exception:
                    pass
            for task in [*tasks, *self._fetches, stop]:
                task.cancel()
            await asyncio.gather(*tasks, *self._fetches, stop, return_exceptions=True)
            await self.publisher.close()
        return self.stats

    def stop(self) -> None:
        self._stopping.set()


def _trade_seq(exchange: int | None, trade_id: str | None) -> int | None:
    try:
        number = int(trade_id) if trade_id is not None else None
    except ValueError:
        return None
    if exchange is None or number is None or not 0 <= exchange < 2 ** (63 - _ID_BITS) or not 0 <= number < 2**_ID_BITS:
        return None
    return exchange * 2**_ID_BITS + number


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def _ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


__all__ = ["Collector", "CollectorConfig", "CollectorError", "CollectorStats", "Feed", "TickHistory", "feeds_of"]
