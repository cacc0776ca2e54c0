"""The trading engine: one object that the backtest and the live runner drive bar by bar.

Per bar of a symbol, in this order: the broker reports what happened during the bar (fills at
the open, stops and targets inside it); the account is marked at the close; the daily-loss
and drawdown limits are checked (they trip the kill switch); then the strategy's signal for
the bar goes through the risk model and becomes orders, sent at the close to fill at the next
bar's open. ``on_bar`` takes one bar (live); ``run`` takes a block of bars of one symbol
(backtest) and runs the very same step on each, except that it skips, without changing any
state, the bars on which nothing can happen: no order waiting, no stop or limit within the
bar's range, no signal that differs from the position, no new day, equity inside its limits.
A test holds a block run equal to bar-by-bar calls.

The state (positions, orders, last bar, counters) is a plain dict: ``snapshot`` / ``restore``
let a crashed runner continue where it stopped, and a replayed bar is refused, not redone.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

import numpy as np
import polars as pl

from models.market.instruments import Instrument
from models.market.timeframes import DayBoundary
from models.trading.broker import ACK_ACCEPTED, ACK_REJECTED, BrokerEvent, BrokerPort, BrokerTimeout, Fill
from models.trading.currency import CM_CROSS, CM_INVERSE, ConvMode, conversion_mode
from models.trading.fills import half_spreads
from models.trading.orders import (
    EV_ACCEPT,
    EV_CANCEL,
    EV_CANCEL_REQUEST,
    EV_EXPIRE,
    EV_FILL,
    EV_REJECT,
    EV_SUBMIT,
    EV_TIMEOUT,
    OT_LIMIT,
    OT_MARKET,
    OT_STOP,
    ST_ACCEPTED,
    ST_CANCELLED,
    ST_EXPIRED,
    ST_FILLED,
    ST_NEW,
    ST_REJECTED,
    ST_SUBMITTED,
    ST_UNKNOWN,
    WORKING,
    IllegalTransition,
    Order,
    Side,
    client_order_id,
)
from models.trading.portfolio import Portfolio, Position
from models.trading.risk import KS_OFF, EntryContext, KillSwitch, RiskModel, mean_true_range, true_ranges

_INF = math.inf
_SIDE = {1: Side.BUY, -1: Side.SELL}  # an Enum call costs microseconds; a lookup does not
_EXIT_REASONS = {"exit": "signal", "sl": "stop_loss", "tp": "take_profit", "flatten": "kill_switch"}


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

@dataclass(frozen=True, slots=True)
class EngineConfig:
    strategy: str  # the name client order ids are derived from
    initial_equity: float = 100_000.0
    account_currency: str = "USD"
    day_boundary: DayBoundary = DayBoundary.UTC  # when the daily-loss limit starts a new day


@dataclass(slots=True)  # a record: not frozen, frozen ones cost 5x to build on the order path
class RiskEvent:
    ts: int  # ms, open of the bar being processed
    symbol: str
    kind: str  # entry, exit, kill_switch, broker, order
    approved: bool
    reason: str
    client_id: str = ""
    qty: float = 0.0


@dataclass(slots=True)
class BarBlock:
    """Bars of one symbol as arrays, with their signals and conversion rates."""

    ts: np.ndarray  # int64 ms, bar open
    open: np.ndarray
    high: np.ndarray
    low: np.ndarray
    close: np.ndarray
    half_spread: np.ndarray
    conv: np.ndarray  # quote -> account, known at each close
    side: np.ndarray  # NaN: no decision
    confidence: np.ndarray
    prob: np.ndarray

    def __len__(self) -> int:
        return len(self.ts)

    @classmethod
    def build(cls, bars: pl.DataFrame, signals: pl.DataFrame | None, spread: float, conv: np.ndarray | None = None,
              use_bar_quotes: bool = True) -> BarBlock:
        """From a bars frame (``ts, open, high, low, close`` [+ ``bid_close, ask_close``]) and a
        signals frame of the same length (see :mod:`models.trading.strategy`)."""
        n = bars.height
        ts = bars["ts"]
        ts_ms = ts.dt.epoch("ms").to_numpy() if ts.dtype.is_temporal() else ts.to_numpy()
        f64 = {c: bars[c].cast(pl.Float64).to_numpy() for c in ("open", "high", "low", "close")}
        quotes = [bars[c].cast(pl.Float64).fill_null(np.nan).to_numpy() if c in bars.columns else None
                  for c in ("bid_close", "ask_close")]
        if signals is None:
            side, confidence, prob = np.full(n, np.nan), np.ones(n), np.full(n, np.nan)
        else:
            if signals.height != n:
                raise ValueError(f"signals have {signals.height} rows for {n} bars")
            side, confidence, prob = (signals[c].cast(pl.Float64).fill_null(np.nan).to_numpy() for c in ("side", "confidence", "prob"))
            confidence = np.nan_to_num(confidence, nan=1.0)
        return cls(
            ts=np.ascontiguousarray(ts_ms, dtype=np.int64), **f64,
            half_spread=half_spreads(quotes[0], quotes[1], n, spread, use_bar_quotes),
            conv=np.ones(n) if conv is None else np.asarray(conv, dtype=np.float64),
            side=side, confidence=confidence, prob=prob,
        )

    @classmethod
    def one(cls, bar: Mapping, signal: Mapping | None, spread: float, conv: np.ndarray | None = None) -> BarBlock:
        """One bar and its signal (the live path's :meth:`build`, without building frames for a
        row: the same arrays, a tenth of the time)."""
        ts = bar["ts"]
        if isinstance(ts, datetime):
            ts = (ts if ts.tzinfo else ts.replace(tzinfo=UTC)) - _EPOCH
            ts = ts // timedelta(milliseconds=1)

        def f64(value: object) -> np.ndarray:
            return np.array([np.nan if value is None else value], dtype=np.float64)

        quotes = [f64(bar[c]) if c in bar else None for c in ("bid_close", "ask_close")]
        if signal is None:
            side, confidence, prob = f64(None), np.ones(1), f64(None)
        else:
            side, prob = f64(signal.get("side")), f64(signal.get("prob"))
            confidence = np.nan_to_num(f64(signal.get("confidence", 1.0)), nan=1.0)
        return cls(ts=np.array([int(ts)], dtype=np.int64), open=f64(bar["open"]), high=f64(bar["high"]), low=f64(bar["low"]),
                   close=f64(bar["close"]), half_spread=half_spreads(quotes[0], quotes[1], 1, spread),
                   conv=np.ones(1) if conv is None else np.asarray(conv, dtype=np.float64),
                   side=side, confidence=confidence, prob=prob)

    def slice(self, start: int, stop: int) -> BarBlock:
        return BarBlock(*(getattr(self, f)[start:stop] for f in self.__dataclass_fields__))


_SCAN_MIN_BARS = 64  # shorter blocks take the bar-by-bar test
_SCAN_WINDOW = 32  # bars checked at once for a level touched, doubling while none is


class _Scan:
    """A block's arrays for the quiet-bar test on long runs of bars: the bid/ask highs and lows,
    and for each bar and each side the next bar (from there on) with that signal."""

    __slots__ = ("n", "ts", "close", "conv", "ha", "la", "hb", "lb", "side", "next_known", "next_side", "next_other", "day")

    @classmethod
    def of(cls, block: BarBlock, first: int) -> _Scan | None:
        """None when the block cannot be scanned (times out of order, prices not finite): every
        bar then takes the bar-by-bar test."""
        ts = block.ts
        if len(ts) > 1 and not bool(np.all(ts[1:] > ts[:-1])):
            return None
        if not (np.isfinite(block.high[first:]).all() and np.isfinite(block.low[first:]).all()
                and np.isfinite(block.half_spread[first:]).all()):
            return None
        self = cls()
        self.day = (None, 0)
        n = self.n = len(ts)
        hs = block.half_spread
        self.ts, self.close, self.conv = ts, block.close, block.conv
        self.ha, self.la, self.hb, self.lb = block.high + hs, block.low + hs, block.high - hs, block.low - hs
        self.side = side = block.side
        self.next_known = _next_true(~np.isnan(side), np.arange(n, dtype=np.int64), n)  # the next bar with any decision
        self.next_side = None  # per side, built when first needed (see next_signal)
        return self

    def _per_side(self) -> None:
        side, n = self.side, self.n
        index = np.arange(n, dtype=np.int64)
        self.next_side = {}
        known = np.isnan(side)
        for value in (-1.0, 0.0, 1.0):
            hit = side == value
            known |= hit
            self.next_side[value] = _next_true(hit, index, n)
        self.next_other = _next_true(~known, index, n) if not known.all() else None  # any other side acts

    def next_signal(self, i: int, cur: float, refused: float) -> int:
        """The first bar at or after ``i`` whose signal differs from the position and from a side
        the kill switch refused (``n`` when none)."""
        j = self.next_known.item(i)
        if j == self.n:
            return j
        s = self.side.item(j)
        if s != cur and s != refused:  # the next decision acts: it is the first (the usual case)
            return j
        if self.next_side is None:
            self._per_side()
        best = self.n if self.next_other is None else int(self.next_other[i])
        for value, nxt in self.next_side.items():
            if value != cur and value != refused:
                best = min(best, int(nxt[i]))
        return best

    def next_at_or_after(self, ts_ms: int, i: int) -> int:
        """The first bar at or after ``i`` opening at or after ``ts_ms`` (a new day)."""
        if ts_ms != self.day[0]:  # the day's end changes once a day: one search each
            self.day = (ts_ms, int(np.searchsorted(self.ts, ts_ms, side="left")))
        return max(i, self.day[1])


def _next_true(mask: np.ndarray, index: np.ndarray, n: int) -> np.ndarray:
    """For each position, the first position at or after it where ``mask`` holds (``n``: none)."""
    at = np.where(mask, index, n)
    return np.minimum.accumulate(at[::-1])[::-1]


@dataclass(slots=True)
class StepReport:
    """What one live bar did: for the runner to publish (signals, orders, fills, alerts)."""

    risk_events: list[RiskEvent]
    orders: list[Order]  # orders created or moved by this bar
    fills: list[Fill]


@dataclass(slots=True)
class BlockResult:
    equity: np.ndarray  # account equity at each bar's close
    units: np.ndarray  # this symbol's position after each bar
    processed: int  # bars processed (a replayed bar is not)


@dataclass(slots=True)
class _SymbolState:
    symbol: str
    spec: Instrument
    conv_mode: ConvMode
    spread: float  # configured spread, where a bar has no quotes
    last_ts: int = -1
    last_close: float = math.nan
    last_conv: float = math.nan
    tail: list = field(default_factory=list)  # true ranges of the last bars (for the ATR)
    refused: float = math.nan  # a side the kill switch refused: not asked again until something changes
    live: set = field(default_factory=set)  # ids of this symbol's orders not yet terminal
    working_market: int = 0
    up_ask: float = _INF  # lowest buy stop: triggers when the ask reaches it
    dn_ask: float = -_INF  # highest buy limit
    up_bid: float = _INF  # lowest sell limit
    dn_bid: float = -_INF  # highest sell stop


class TradingEngine:
    def __init__(self, config: EngineConfig, risk: RiskModel, broker: BrokerPort,
                 instruments: Mapping[str, Instrument], spreads: Mapping[str, float] | None = None) -> None:
        self.config = config
        self.risk = risk
        self.broker = broker
        self.portfolio = Portfolio(config.initial_equity)
        self.orders: dict[str, Order] = {}
        self.fills: list[Fill] = []
        self.risk_events: list[RiskEvent] = []
        self.kill = KS_OFF
        self.kill_reason = ""
        self._fill_ids: set[str] = set()
        self._order_times: deque[int] = deque()
        self._peak = config.initial_equity
        self._day_ref = config.initial_equity
        self._day_end = -1  # the first bar starts a day
        self._floor = -_INF
        self._unknown = 0
        self.steps = 0  # bars that took the full step (the others could not change anything)
        self._symbols: dict[str, _SymbolState] = {}
        for symbol, spec in instruments.items():
            spread = (spreads or {}).get(symbol, spec.spread)
            self._symbols[symbol] = _SymbolState(symbol, spec, conversion_mode(spec, config.account_currency), spread)
        self._update_floor()

    # -- driving it ------------------------------------------------------------------------
    def on_bar(self, symbol: str, bar: Mapping, signal: Mapping | None = None, conv: float | None = None) -> StepReport:
        """One closed bar (live): ``bar`` has ``ts`` (open, datetime or ms), ``open, high, low,
        close`` and optionally ``bid_close, ask_close``; ``signal`` has ``side`` [,
        ``confidence``, ``prob``]; ``conv`` is the quote -> account rate for a cross pair.
        Returns what the bar did. A bar at or before the last one is refused (a risk event)."""
        st = self._state(symbol)
        rates = None
        if st.conv_mode is CM_INVERSE:
            rates = np.array([1.0 / float(bar["close"])])
        elif st.conv_mode is CM_CROSS:
            if conv is None:
                raise ValueError(f"{symbol} is a cross in a {self.config.account_currency} account: pass conv")
            rates = np.array([conv])
        events, fills, known = len(self.risk_events), len(self.fills), len(self.orders)
        moves = {cid: len(o.history) for cid, o in self.orders.items() if not o.is_terminal}
        self.run(symbol, BarBlock.one(bar, signal, st.spread, rates))
        changed = [self.orders[cid] for cid, n in moves.items() if len(self.orders[cid].history) != n]
        changed += list(self.orders.values())[known:]  # dicts keep insertion order
        return StepReport(self.risk_events[events:], changed, self.fills[fills:])

    def reconcile(self) -> dict[str, tuple[float, float]]:
        """Settle orders the broker did not answer for, then compare positions with the
        broker's: ``{symbol: (engine units, broker units)}`` for every difference (empty when
        they agree). A live runner trades only once this is empty."""
        if self._unknown:
            self._resolve_unknown(max((s.last_ts for s in self._symbols.values()), default=0), "")
        theirs = self.broker.positions()
        ours = {s: p.units for s, p in self.portfolio.positions.items() if p.units}
        return {s: (ours.get(s, 0.0), theirs.get(s, 0.0)) for s in set(ours) | set(theirs)
                if abs(ours.get(s, 0.0) - theirs.get(s, 0.0)) > 1e-9}

    def run(self, symbol: str, block: BarBlock) -> BlockResult:
        """Process a block of bars of ``symbol`` in time order (see the module doc)."""
        st = self._state(symbol)
        n = len(block)
        first = 0
        while first < n and block.ts[first] <= st.last_ts:
            first += 1  # already processed: a replay after a restart
        if first:
            self.risk_events.append(RiskEvent(int(block.ts[first - 1]), symbol, "bar", False,
                                              f"{first} bar(s) at or before the last processed bar refused"))
        if first == n:
            return BlockResult(np.full(n, np.nan), np.full(n, np.nan), 0)
        prev = block.close[first - 1] if first else st.last_close
        ranges = true_ranges(block.high[first:], block.low[first:], block.close[first:], prev)
        self._ranges = np.concatenate([np.asarray(st.tail, dtype=np.float64), ranges]) if st.tail else ranges
        self._offset = len(st.tail) - first  # block index i -> self._ranges[i + offset]
        pos = self.portfolio.position(symbol)
        segments = [(first, self._base(symbol), pos.units, pos.avg)]
        if not self.broker.bar_driven:
            for i in range(first, n):  # a live broker is asked on every bar
                self._step(st, block, i)
                if segments[-1][0] == i:
                    segments[-1] = (i, self._base(symbol), pos.units, pos.avg)
                else:
                    segments.append((i, self._base(symbol), pos.units, pos.avg))
        elif n - first >= _SCAN_MIN_BARS and (scan := _Scan.of(block, first)) is not None:
            self._run_scanned(st, block, scan, first, segments)
        else:
            self._run_listed(st, block, first, segments)
        # Leave the symbol's state as after its last bar.
        st.last_ts, st.last_close, st.last_conv = block.ts[-1].item(), block.close[-1].item(), block.conv[-1].item()
        st.tail = self._ranges[-self.risk.config.atr_period:].tolist()
        equity, units = np.full(n, np.nan), np.full(n, np.nan)
        columns = list(zip(*segments))
        starts = np.array(columns[0], dtype=np.int64)
        lengths = np.diff(np.r_[starts, n])
        base, qty, avg = (np.repeat(np.array(columns[k], dtype=np.float64), lengths) for k in (1, 2, 3))
        equity[first:] = base + qty * (block.close[first:] - avg) * block.conv[first:]  # each segment's marks, at once
        units[first:] = qty
        return BlockResult(equity, units, n - first)

    def _run_listed(self, st: _SymbolState, block: BarBlock, first: int, segments: list) -> None:
        """Short blocks (the live runner's single bars, interleaved symbols): the quiet-bar
        test bar by bar on Python lists."""
        symbol, n = st.symbol, len(block)
        hs = block.half_spread
        ts, close, conv, side = block.ts.tolist(), block.close.tolist(), block.conv.tolist(), block.side.tolist()
        ha, la = (block.high + hs).tolist(), (block.low + hs).tolist()
        hb, lb = (block.high - hs).tolist(), (block.low - hs).tolist()
        pos = self.portfolio.position(symbol)
        limits = self.risk.config.max_drawdown is not None or self.risk.config.max_daily_loss is not None
        base, q, avg = segments[0][1:]
        # The state the skip test reads, in locals (reloaded after every full step).
        cur = float((q > 0) - (q < 0))
        skip = not st.working_market and self._unknown == 0
        day_end, peak, floor, refused = self._day_end, self._peak, self._floor, st.refused
        up_ask, dn_ask, up_bid, dn_bid = st.up_ask, st.dn_ask, st.up_bid, st.dn_bid
        for i in range(first, n):
            if skip and ts[i] < day_end and ha[i] < up_ask and la[i] > dn_ask and hb[i] < up_bid and lb[i] > dn_bid:
                s = side[i]
                if s != s or s == cur or s == refused:
                    if not limits:
                        continue
                    e = base + q * (close[i] - avg) * conv[i]
                    if e > peak:
                        self._peak = peak = e
                        self._update_floor()
                        floor = self._floor
                        continue
                    if e >= floor:
                        continue
            self._step(st, block, i)
            base, q, avg = self._base(symbol), pos.units, pos.avg
            cur = float((q > 0) - (q < 0))
            skip = not st.working_market and self._unknown == 0
            day_end, peak, floor, refused = self._day_end, self._peak, self._floor, st.refused
            up_ask, dn_ask, up_bid, dn_bid = st.up_ask, st.dn_ask, st.up_bid, st.dn_bid
            if segments[-1][0] == i:
                segments[-1] = (i, base, q, avg)
            else:
                segments.append((i, base, q, avg))

    def _run_scanned(self, st: _SymbolState, block: BarBlock, scan: _Scan, first: int, segments: list) -> None:
        """Long blocks (backtests): the same quiet-bar test as :meth:`_run_listed`, answered
        for a run of bars at once with numpy: the next bar with a signal to act on and the next
        new day come from indexes built once; only the bars before them are checked for a
        price level touched or an account limit, a widening window at a time. The floats and
        comparisons are the loop's, so the same bars take the step (a test referees it)."""
        symbol, n = st.symbol, len(block)
        pos = self.portfolio.position(symbol)
        c = self.risk.config
        limits = c.max_drawdown is not None or c.max_daily_loss is not None
        next_signal, next_day, step, base = scan.next_signal, scan.next_at_or_after, self._step, self._base
        i = first
        last = segments[-1][0]
        while i < n:
            if not st.working_market and self._unknown == 0:
                q, avg = pos.units, pos.avg
                stop = min(next_signal(i, float((q > 0) - (q < 0)), st.refused), next_day(self._day_end, i))
                if limits or st.up_ask != _INF or st.dn_ask != -_INF or st.up_bid != _INF or st.dn_bid != -_INF:
                    stop = self._first_touch(scan, i, stop, (st.up_ask, st.dn_ask, st.up_bid, st.dn_bid),
                                             segments[-1][1], q, avg, limits)
                if stop >= n:
                    break
                i = stop
            step(st, block, i)
            entry = (i, base(symbol), pos.units, pos.avg)
            if last == i:
                segments[-1] = entry
            else:
                segments.append(entry)
                last = i
            i += 1

    def _first_touch(self, scan: _Scan, i: int, stop: int, levels: tuple[float, float, float, float], base: float,
                     q: float, avg: float, limits: bool) -> int:
        """The first bar in ``[i, stop)`` whose range reaches a working order's level or whose
        close breaks an account limit (else ``stop``); the equity peak follows the bars before it."""
        up_ask, dn_ask, up_bid, dn_bid = levels
        c = self.risk.config
        width = _SCAN_WINDOW
        a = i
        while a < stop:
            b = min(stop, a + width)
            width *= 2
            quiet = None
            if up_ask < _INF:
                quiet = scan.ha[a:b] < up_ask
            if dn_ask > -_INF:
                quiet = scan.la[a:b] > dn_ask if quiet is None else quiet & (scan.la[a:b] > dn_ask)
            if up_bid < _INF:
                quiet = scan.hb[a:b] < up_bid if quiet is None else quiet & (scan.hb[a:b] < up_bid)
            if dn_bid > -_INF:
                quiet = scan.lb[a:b] > dn_bid if quiet is None else quiet & (scan.lb[a:b] > dn_bid)
            peaks = None
            if limits:
                e = base + q * (scan.close[a:b] - avg) * scan.conv[a:b]
                peaks = np.fmax(np.fmax.accumulate(e), self._peak)  # the peak after each bar (NaN never raises it)
                before = np.empty_like(peaks)
                before[0] = self._peak
                before[1:] = peaks[:-1]
                floor = np.full(len(e), -_INF)
                if self.kill is KS_OFF:
                    if c.max_drawdown is not None:
                        floor = before * (1 - c.max_drawdown)
                    if c.max_daily_loss is not None:
                        floor = np.maximum(floor, self._day_ref * (1 - c.max_daily_loss))
                ok = (e > before) | (e >= floor)
                quiet = ok if quiet is None else quiet & ok
            touched = int(np.argmin(quiet))
            if not quiet[touched]:
                self._raise_peak(peaks, touched)
                return a + touched
            self._raise_peak(peaks, len(quiet))
            a = b
        return stop

    def _raise_peak(self, peaks: np.ndarray | None, count: int) -> None:
        if peaks is not None and count and peaks[count - 1] > self._peak:
            self._peak = peaks[count - 1].item()
            self._update_floor()

    # -- one bar ---------------------------------------------------------------------------
    def _step(self, st: _SymbolState, block: BarBlock, i: int) -> None:
        self.steps += 1
        symbol = st.symbol
        ts = block.ts.item(i)
        pos = self.portfolio.position(symbol)
        prev_conv = block.conv.item(i - 1) if i > 0 else st.last_conv
        if ts >= self._day_end:
            # A new day: its loss is measured from the equity at the last close before it.
            prev_close = block.close.item(i - 1) if i > 0 else st.last_close
            marked = pos.units * (prev_close - pos.avg) * prev_conv if pos.units else 0.0
            self._day_ref = self._base(symbol) + marked
            self._day_end = _next_day_end(ts, self.config.day_boundary)
            if self.kill is not KS_OFF and self.kill_reason.startswith("daily loss"):
                self._record(ts, symbol, "kill_switch", True, "daily loss limit lifted: a new day")
                self.kill, self.kill_reason = KS_OFF, ""
                for other in self._symbols.values():
                    other.refused = math.nan
            self._update_floor()
        if self._unknown:
            self._resolve_unknown(ts, symbol)
        close, conv = block.close.item(i), block.conv.item(i)
        conv_known = prev_conv if prev_conv == prev_conv else conv
        events = self.broker.advance(symbol, ts, block.open.item(i), block.high.item(i), block.low.item(i),
                                     close, block.half_spread.item(i), conv_known)
        if events:
            self.on_broker_events(events, ts, symbol)
        # Mark at the close and watch the account's limits.
        st.last_close, st.last_conv, st.last_ts = close, conv, ts
        units = pos.units
        equity = self._base(symbol) + units * (close - pos.avg) * conv
        if equity > self._peak:
            self._peak = equity
            self._update_floor()
        if equity < self._floor:
            self._breach(equity, ts, symbol)
            units = pos.units
        s = block.side.item(i)
        if s == s and s != (units > 0) - (units < 0) and s != st.refused:
            self._decide(st, block, i, int(s), ts, pos)

    def _decide(self, st: _SymbolState, block: BarBlock, i: int, side: int, ts: int, pos: Position) -> None:
        symbol = st.symbol
        if st.working_market:  # kept by _refresh after every change of an order
            self._record(ts, symbol, "entry" if side else "exit", False, "an order of this symbol is still working")
            return
        units = pos.units
        cur = (units > 0) - (units < 0)
        strategy = self.config.strategy
        events = self.risk_events
        if cur:
            decision = self.risk.evaluate_exit(self.kill)
            exit_id = client_order_id(strategy, symbol, ts, "exit")
            events.append(RiskEvent(ts, symbol, "exit", decision.approved, decision.reason, exit_id, abs(units)))
            if not decision.approved:
                st.refused = float(side)  # the kill switch: refused until it or the position changes
                return
            self._submit(Order(exit_id, symbol, _SIDE[-cur], OT_MARKET, abs(units), "exit", ts, None, True,
                               reason="signal"), st, ts)
        if side == 0:
            return
        risk = self.risk
        atr = mean_true_range(self._ranges, risk.config.atr_period, i + 1 + self._offset) if risk.config.uses_atr else None
        prob = block.prob.item(i)
        # Other symbols count with their positions and their entries still on the way.
        notional = margin = 0.0
        open_elsewhere = 0
        if len(self._symbols) > 1:
            positions, orders = self.portfolio.positions, self.orders
            for s, o in self._symbols.items():
                if s == symbol:
                    continue
                units = abs(positions[s].units) if s in positions else 0.0
                units += sum(orders[c].remaining for c in o.live if not orders[c].reduce_only)
                if units:
                    value = units * o.last_close * o.last_conv
                    notional += value
                    margin += value / o.spec.leverage
                    open_elsewhere += 1
        times = self._order_times
        if times:
            since = ts - risk.config.order_window_minutes * 60_000
            while times and times[0] <= since:
                times.popleft()
        ctx = EntryContext(symbol, side, block.close.item(i), block.conv.item(i), atr, self.equity(), block.confidence.item(i),
                           prob if prob == prob else None, notional, margin, open_elsewhere, len(times), self.kill)
        decision = risk.evaluate_entry(ctx, st.spec)
        entry_id = client_order_id(strategy, symbol, ts, "entry")
        events.append(RiskEvent(ts, symbol, "entry", decision.approved, decision.reason, entry_id, decision.qty))
        if not decision.approved:
            if self.kill is not KS_OFF:
                st.refused = float(side)
            return
        stop, target = decision.stop, decision.target
        entry = Order(entry_id, symbol, _SIDE[side], OT_MARKET, decision.qty, "entry", ts, None, False, None, stop, target,
                      ST_NEW, 0.0, 0.0, decision.reason)
        if not self._submit(entry, st, ts) or (stop is None and target is None):
            return
        for intent, level, kind in (("sl", stop, OT_STOP), ("tp", target, OT_LIMIT)):
            if level is not None:
                self._submit(Order(client_order_id(strategy, symbol, ts, intent), symbol, _SIDE[-side], kind,
                                   decision.qty, intent, ts, price=level, reduce_only=True, parent_id=entry_id), st, ts)

    # -- orders and broker events ----------------------------------------------------------
    def _submit(self, order: Order, st: _SymbolState, ts: int) -> bool:
        cid = order.client_id
        if cid in self.orders:
            self._record(ts, order.symbol, "order", False, f"decision replayed: order {cid} already exists, not sent again", cid)
            return False
        self.orders[cid] = order
        order.apply(EV_SUBMIT)
        st.live.add(cid)
        if order.parent_id is None:
            self._order_times.append(ts)
        try:
            ack = self.broker.submit(order)
        except BrokerTimeout as exc:
            order.apply(EV_TIMEOUT)
            self._unknown += 1
            self._record(ts, order.symbol, "broker", False, f"no answer to {order.client_id} ({exc}): state unknown until the broker is asked",
                         order.client_id)
            self._refresh(st)
            return True
        status = ack.status
        if status is ACK_ACCEPTED:
            order.apply(EV_ACCEPT)
        elif status is ACK_REJECTED:
            order.apply(EV_REJECT, ack.reason)
            self._record(ts, order.symbol, "broker", False, f"broker rejected {cid}: {ack.reason}", cid)
            self._refresh(st)
            return False
        if order.type is OT_MARKET and not self._unknown:
            # A working market order: the one count it changes (the levels count stops and
            # limits only, and every other order of the symbol is as the last refresh left it).
            st.working_market += 1
        else:
            self._refresh(st)
        return True

    def on_broker_events(self, events: list[BrokerEvent], ts: int | None = None, symbol: str | None = None) -> None:
        """Apply what the broker reported. A duplicate fill is ignored; an event the order's
        state does not allow is recorded, never applied."""
        touched = set()
        orders = self.orders
        for event in events:
            order = orders.get(event.client_id)
            if order is None:
                when = event.ts if event.ts >= 0 else (ts or 0)
                self._record(when, symbol or "", "broker", False, f"event {event.kind.value} for unknown order {event.client_id}",
                             event.client_id)
                continue
            touched.add(order.symbol)
            try:
                if event.kind is EV_FILL:
                    self._on_fill(order, event.fill)
                else:
                    order.apply(event.kind, event.reason)
            except IllegalTransition as exc:
                when = event.ts if event.ts >= 0 else (ts or 0)
                self._record(when, order.symbol, "order", False, f"{order.client_id}: {exc}", order.client_id)
        for s in touched:
            self._refresh(self._symbols[s])

    def _on_fill(self, order: Order, fill: Fill) -> None:
        fill_ids = self._fill_ids
        if fill.fill_id in fill_ids:
            return
        fill_ids.add(fill.fill_id)
        intent = order.intent
        portfolio = self.portfolio
        portfolio.apply_fill(fill, self.equity(), order.stop_loss if intent == "entry" else None, _EXIT_REASONS.get(intent, intent))
        self._symbols[order.symbol].refused = math.nan  # the position changed: ask again
        self.fills.append(fill)
        order.add_fill(fill.qty, fill.price, order.reduce_only and portfolio.positions[order.symbol].units == 0)

    def _refresh(self, st: _SymbolState) -> None:
        """Recount this symbol's working orders and the price levels that can trigger one."""
        st.working_market = 0
        st.up_ask = st.up_bid = _INF
        st.dn_ask = st.dn_bid = -_INF
        for cid in list(st.live):
            order = self.orders[cid]
            if order.state not in WORKING and order.state is not ST_NEW:
                st.live.discard(cid)
                continue
            if order.type is OT_MARKET:
                st.working_market += 1
                continue
            if order.parent_id is not None and self.orders[order.parent_id].state is not ST_FILLED:
                continue
            level = order.price
            if order.side > 0:
                if order.type is OT_STOP:
                    st.up_ask = min(st.up_ask, level)
                else:
                    st.dn_ask = max(st.dn_ask, level)
            elif order.type is OT_STOP:
                st.dn_bid = max(st.dn_bid, level)
            else:
                st.up_bid = min(st.up_bid, level)
        if self._unknown:
            self._unknown = sum(1 for o in self.orders.values() if o.state is ST_UNKNOWN)

    def _resolve_unknown(self, ts: int, symbol: str) -> None:
        """Ask the broker about every order it did not answer for; never resend one."""
        for order in [o for o in self.orders.values() if o.state is ST_UNKNOWN]:
            try:
                status = self.broker.order_status(order.client_id)
            except BrokerTimeout:
                continue
            if status is None:
                order.apply(EV_REJECT, "the broker never received it")
                self._record(ts, order.symbol, "broker", False, f"{order.client_id} was not placed: the broker never received it",
                             order.client_id)
            else:
                kind = {ST_REJECTED: EV_REJECT, ST_CANCELLED: EV_CANCEL,
                        ST_EXPIRED: EV_EXPIRE}.get(status.state, EV_ACCEPT)
                order.apply(kind, status.reason)
                self._record(ts, order.symbol, "broker", True, f"{order.client_id} settled by asking the broker: {status.state.value}",
                             order.client_id)
            self._refresh(self._symbols[order.symbol])
        self._unknown = sum(1 for o in self.orders.values() if o.state is ST_UNKNOWN)

    # -- the kill switch -------------------------------------------------------------------
    def set_kill_switch(self, mode: KillSwitch, reason: str = "manual", flatten: bool = False) -> None:
        """Halt, reduce-only or off; ``flatten`` also closes every position at the next open
        and cancels working entry orders. Protective stops stay at the broker."""
        ts = max((s.last_ts for s in self._symbols.values()), default=0)
        self.kill, self.kill_reason = mode, reason if mode is not KS_OFF else ""
        for st in self._symbols.values():
            st.refused = math.nan
        self._record(ts, "", "kill_switch", mode is KS_OFF, f"kill switch {mode.value}: {reason}")
        self._update_floor()
        if flatten:
            for symbol, st in self._symbols.items():
                pos = self.portfolio.position(symbol)
                for cid in list(st.live):
                    order = self.orders[cid]
                    if not order.reduce_only and order.state in (ST_ACCEPTED, ST_SUBMITTED):
                        order.apply(EV_CANCEL_REQUEST)
                        try:
                            self.broker.cancel(cid)  # the outcome comes back as an event
                        except BrokerTimeout:
                            order.apply(EV_TIMEOUT)
                            self._unknown += 1
                if pos.units:
                    side = Side(-1 if pos.units > 0 else 1)
                    cid = client_order_id(self.config.strategy, symbol, st.last_ts, "flatten")
                    self._record(st.last_ts, symbol, "exit", True, f"flatten: {reason}", cid, abs(pos.units))
                    self._submit(Order(cid, symbol, side, OT_MARKET, abs(pos.units), "flatten", st.last_ts,
                                       reduce_only=True, reason=reason), st, st.last_ts)

    def _breach(self, equity: float, ts: int, symbol: str) -> None:
        c = self.risk.config
        if c.max_drawdown is not None and equity < self._peak * (1 - c.max_drawdown):
            reason = f"drawdown limit: equity {equity:,.2f} is {1 - equity / self._peak:.2%} below the peak {self._peak:,.2f} (limit {c.max_drawdown:.2%})"
        else:
            reason = (f"daily loss limit: equity {equity:,.2f} is {1 - equity / self._day_ref:.2%} below the day's start "
                      f"{self._day_ref:,.2f} (limit {c.max_daily_loss:.2%})")
        self._record(ts, symbol, "limit", False, reason)
        self.set_kill_switch(c.breach_action, reason, flatten=c.flatten_on_breach)

    def _update_floor(self) -> None:
        c = self.risk.config
        floor = -_INF
        if self.kill is KS_OFF:
            if c.max_drawdown is not None:
                floor = max(floor, self._peak * (1 - c.max_drawdown))
            if c.max_daily_loss is not None:
                floor = max(floor, self._day_ref * (1 - c.max_daily_loss))
        self._floor = floor

    # -- account ---------------------------------------------------------------------------
    def _state(self, symbol: str) -> _SymbolState:
        try:
            return self._symbols[symbol]
        except KeyError:
            raise ValueError(f"the engine does not trade {symbol}; it knows {sorted(self._symbols)}") from None

    def _base(self, symbol: str) -> float:
        """Balance plus the other symbols' unrealised PnL at their last marks."""
        positions = self.portfolio.positions
        base = self.portfolio.balance
        if not positions or (len(positions) == 1 and symbol in positions):  # no other symbol's mark to add
            return base
        for s, p in sorted(positions.items()):  # symbol order: see equity()
            if s != symbol and p.units:
                o = self._symbols[s]
                base += p.units * (o.last_close - p.avg) * o.last_conv
        return base

    def equity(self) -> float:
        """Balance plus every position marked at its symbol's last close, summed in symbol order:
        the same account gives the same float whichever symbol traded first (the live runner warms
        up symbol by symbol, a backtest bar by bar)."""
        positions = self.portfolio.positions
        equity = self.portfolio.balance
        for s, p in (sorted(positions.items()) if len(positions) > 1 else positions.items()):
            if p.units:
                o = self._symbols[s]
                equity += p.units * (o.last_close - p.avg) * o.last_conv
        return equity

    def exposure(self) -> tuple[float, float]:
        """Gross notional of the positions and the margin it holds, account currency, at each
        symbol's last close (what the backtest reports per bar)."""
        notional = margin = 0.0
        for s, p in self.portfolio.positions.items():
            if p.units:
                o = self._symbols[s]
                value = abs(p.units) * o.last_close * o.last_conv
                notional += value
                margin += value / o.spec.leverage
        return notional, margin

    def _record(self, ts: int, symbol: str, kind: str, approved: bool, reason: str, client_id: str = "", qty: float = 0.0) -> None:
        self.risk_events.append(RiskEvent(ts, symbol, kind, approved, reason, client_id, qty))

    # -- state -----------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Everything needed to continue exactly where this engine is (JSON-serialisable)."""
        return {
            "config": {**asdict(self.config), "day_boundary": self.config.day_boundary.value},
            "portfolio": self.portfolio.snapshot(),
            "orders": [o.to_dict() for o in self.orders.values()],
            "fills": [f.to_dict() for f in self.fills],
            "risk_events": [asdict(e) for e in self.risk_events],
            "kill": self.kill.value, "kill_reason": self.kill_reason,
            "order_times": list(self._order_times),
            "peak": self._peak, "day_ref": self._day_ref, "day_end": self._day_end,
            "symbols": {s: {"last_ts": st.last_ts, "last_close": _nan_to_none(st.last_close),
                            "last_conv": _nan_to_none(st.last_conv), "tail": list(st.tail), "live": sorted(st.live),
                            "refused": _nan_to_none(st.refused)}
                        for s, st in self._symbols.items()},
        }

    def restore(self, state: dict) -> None:
        """Continue from :meth:`snapshot` (on an engine built with the same configuration)."""
        if state["config"]["strategy"] != self.config.strategy:
            raise ValueError(f"snapshot of strategy {state['config']['strategy']!r}, engine of {self.config.strategy!r}")
        self.portfolio = Portfolio.restore(state["portfolio"])
        self.orders = {d["client_id"]: Order.from_dict(d) for d in state["orders"]}
        self.fills = [Fill(**{**d, "side": Side(d["side"])}) for d in state["fills"]]
        self._fill_ids = {f.fill_id for f in self.fills}
        self.risk_events = [RiskEvent(**d) for d in state["risk_events"]]
        self.kill, self.kill_reason = KillSwitch(state["kill"]), state["kill_reason"]
        self._order_times = deque(state["order_times"])
        self._peak, self._day_ref, self._day_end = state["peak"], state["day_ref"], state["day_end"]
        for s, d in state["symbols"].items():
            st = self._state(s)
            st.last_ts = d["last_ts"]
            st.last_close = math.nan if d["last_close"] is None else d["last_close"]
            st.last_conv = math.nan if d["last_conv"] is None else d["last_conv"]
            st.tail = list(d["tail"])
            st.refused = math.nan if d["refused"] is None else d["refused"]
            st.live = set(d["live"])
            self._refresh(st)
        self._unknown = sum(1 for o in self.orders.values() if o.state is ST_UNKNOWN)
        self._update_floor()


def _nan_to_none(x: float) -> float | None:
    return None if x != x else x


def _next_day_end(ts_ms: int, boundary: DayBoundary) -> int:
    moment = datetime.fromtimestamp(ts_ms / 1000, UTC)
    if boundary is DayBoundary.UTC:
        start = datetime(moment.year, moment.month, moment.day, tzinfo=UTC)
        return int((start + timedelta(days=1)).timestamp() * 1000)
    local = moment.astimezone(ZoneInfo("America/New_York"))
    end = local.replace(hour=17, minute=0, second=0, microsecond=0)
    if local >= end:
        end = (end + timedelta(days=1)).replace(hour=17)
    return int(end.timestamp() * 1000)
