"""The live path: the feature vector of the newest bar, updated one bar at a time.

The batch engine computes whole partitions; recomputing a 1,500-bar window per bar costs
~16 ms. Here every part of the vector is kept as cheap as the feature allows, through the
batch engine's own code wherever the value is a function of a finite window:

- recursive indicators (EMA family, Wilder smoothing, SAR, MACD, TRIX, ...) keep their
  state and advance one bar (:mod:`models.features.recursive`, TA-Lib's recursions);
- every other bar-array feature runs the batch families on the last :data:`TAIL` bars, with
  the recursive values supplied by that state (:class:`_LiveArrays`);
- higher-timeframe context is recomputed only when a higher bar completes, from the
  completed higher bars kept on the side, with the batch's ``context_values``;
- the clock features are computed by the batch code for a run of upcoming bar closes at
  once and looked up.

The parity test holds the vector equal to the batch row for every bar (<= 1e-9).
"""

from __future__ import annotations

import math
from collections import deque
from datetime import datetime

import numpy as np
import polars as pl

from models.market.candles import BAR_SCHEMA
from models.features.compute import (
    CONTEXT_TIMEFRAMES,
    EXTERNAL_FEATURES,
    FAMILIES,
    QUIET,
    BarArrays,
    clock_features,
    context_values,
    external_features,
    interactions,
)
from models.features.external import ExternalData
from models.features.recursive import (
    DecayedSum,
    DirectionalMovement,
    Ema,
    GainLoss,
    ParabolicSar,
    StochRsi,
    Wilder,
    true_range,
)
from models.features.registry import FEATURE_NAMES, WARMUP_BARS
from models.market.ticks import TS
from models.market.timeframes import DayBoundary, Timeframe, bar_close_at, bar_open_at

TAIL = 208  # bars the finite-window families see: the longest window (SMA 200) and a margin
_CLOCK_CHUNK = 512  # bar closes whose clock features are computed per batch call
_COLUMNS = ("open", "high", "low", "close", "volume", "tick_count", "spread_mean", "spread_max", "vwap")
_HIGHER_KEPT = 24  # completed higher bars kept; the context needs 16


class _Recursions:
    """The state of every recursive indicator the families use."""

    def __init__(self) -> None:
        self.ema = {n: Ema(n) for n in (10, 12, 20, 26, 50)}
        self.ema20_2, self.ema20_3 = Ema(20), Ema(20)  # DEMA/TEMA: EMAs of EMA(20)
        self.t3 = [Ema(10) for _ in range(6)]
        self.macd_signal = Ema(9)
        self.trix = [Ema(15) for _ in range(3)]
        self.trix_previous = math.nan
        self.gain_loss = {n: GainLoss(n) for n in (7, 14, 28)}
        self.stochrsi = StochRsi()
        self.atr = {n: Wilder(n) for n in (7, 14, 20, 28)}
        self.directional = DirectionalMovement(14)
        self.sar = ParabolicSar()
        self.ad = {n: DecayedSum(n) for n in (3, 10)}
        self.previous_close = math.nan
        self.values: dict[tuple, float | tuple[float, ...]] = {}

    def update(self, o: float, h: float, l: float, c: float, ad_step: float) -> None:
        v: dict[tuple, float | tuple[float, ...]] = {}
        for n, ema in self.ema.items():
            v["ema", n] = ema.update(c)
        second = self.ema20_2.update(v["ema", 20])  # type: ignore[arg-type]
        third = self.ema20_3.update(second)
        v["dema", 20] = 2 * v["ema", 20] - second  # type: ignore[operator]
        v["tema", 20] = 3 * v["ema", 20] - 3 * second + third  # type: ignore[operator]
        chain, x = [], c
        for ema in self.t3:
            x = ema.update(x)
            chain.append(x)
        a = 0.7
        c1, c2, c3, c4 = -a**3, 3 * a * a + 3 * a**3, -6 * a * a - 3 * a - 3 * a**3, 1 + 3 * a + a**3 + 3 * a * a
        v["t3", 10] = c1 * chain[5] + c2 * chain[4] + c3 * chain[3] + c4 * chain[2]
        macd = v["ema", 12] - v["ema", 26]  # type: ignore[operator]
        signal = self.macd_signal.update(macd)
        v["macd",] = (macd, signal, macd - signal)
        x = c
        for ema in self.trix:
            x = ema.update(x)
        previous, self.trix_previous = self.trix_previous, x
        v["trix", 15] = ((x / previous) - 1.0) * 100.0 if not math.isnan(previous) and previous != 0 else math.nan
        for n, state in self.gain_loss.items():
            state.update(c)
            v["rsi", n], v["cmo", n] = state.rsi, state.cmo
        v["stochrsi",] = self.stochrsi.update(v["rsi", 14])  # type: ignore[arg-type]
        tr = true_range(h, l, self.previous_close)
        for n, state in self.atr.items():
            v["atr", n] = state.update(tr)
        self.directional.update(h, l, c)
        d = self.directional
        v["directional", 14] = (d.adx, d.plus_di, d.minus_di)
        v["sar",] = self.sar.update(h, l)
        for n, state in self.ad.items():
            v["ad", n] = state.update(ad_step)
        self.previous_close = c
        self.values = v


class _LiveArrays(BarArrays):
    """The last :data:`TAIL` bars, whose recursive indicators come from the kept state as
    one-element arrays: they broadcast against the bar columns, and the families' formulas
    are elementwise in them, so the last element of every result is right (the only one the
    live path reads; the parity test checks every feature)."""

    def __init__(self, columns: dict[str, np.ndarray]) -> None:
        super().__init__(columns)
        self.state: dict[tuple, float | tuple[float, ...]] = {}
        self.first_row = len(self.c) - 1

    @staticmethod
    def _last(value: float) -> np.ndarray:
        return np.array((value,))

    def ema(self, n: int) -> np.ndarray:
        return self._last(self.state["ema", n])  # type: ignore[arg-type]

    def dema(self, n: int) -> np.ndarray:
        return self._last(self.state["dema", n])  # type: ignore[arg-type]

    def tema(self, n: int) -> np.ndarray:
        return self._last(self.state["tema", n])  # type: ignore[arg-type]

    def t3(self, n: int, vfactor: float) -> np.ndarray:
        return self._last(self.state["t3", n])  # type: ignore[arg-type]

    def macd(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(self._last(x) for x in self.state["macd",])  # type: ignore[return-value,union-attr]

    def directional(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return tuple(self._last(x) for x in self.state["directional", n])  # type: ignore[return-value,union-attr]

    def sar(self) -> np.ndarray:
        return self._last(self.state["sar",])  # type: ignore[arg-type]

    def rsi(self, n: int) -> np.ndarray:
        return self._last(self.state["rsi", n])  # type: ignore[arg-type]

    def cmo(self, n: int) -> np.ndarray:
        return self._last(self.state["cmo", n])  # type: ignore[arg-type]

    def stochrsi(self) -> tuple[np.ndarray, np.ndarray]:
        return tuple(self._last(x) for x in self.state["stochrsi",])  # type: ignore[return-value,union-attr]

    def trix(self, n: int) -> np.ndarray:
        return self._last(self.state["trix", n])  # type: ignore[arg-type]

    def atr(self, n: int) -> np.ndarray:
        return self._last(self.state["atr", n])  # type: ignore[arg-type]

    def ad_decayed(self, n: int) -> np.ndarray:
        return self._last(self.state["ad", n])  # type: ignore[arg-type]


class _HigherBars:
    """Completed bars of one higher timeframe, built from the base bars as they arrive."""

    def __init__(self, k: int, tf: Timeframe, boundary: DayBoundary) -> None:
        self.k, self.tf, self.boundary = k, tf, boundary
        self.forming: tuple[datetime, datetime] | None = None  # (open, close) of the bar being built
        self.highs: deque[float] = deque(maxlen=_HIGHER_KEPT)
        self.lows: deque[float] = deque(maxlen=_HIGHER_KEPT)
        self.closes: deque[float] = deque(maxlen=_HIGHER_KEPT)
        self.values = {name: math.nan for name in context_values(k, np.full(1, np.nan), np.full(1, np.nan), np.full(1, np.nan))}

    def add(self, ring: _Ring, opened: datetime, closed: datetime) -> None:
        """After the base bar ``[opened, closed)`` joined ``ring``."""
        changed = False
        if self.forming is not None and opened >= self.forming[1]:
            changed |= self._complete(ring, *self.forming, include_newest=False)
            self.forming = None
        if self.forming is None:
            start = bar_open_at(opened, self.tf, self.boundary)
            self.forming = (start, bar_close_at(start, self.tf, self.boundary))
        if self.forming[1] <= closed:
            changed |= self._complete(ring, *self.forming, include_newest=True)
            self.forming = None
        if changed:
            h, l, c = (np.fromiter(x, dtype=np.float64) for x in (self.highs, self.lows, self.closes))
            self.values = {name: float(column[-1]) for name, column in context_values(self.k, c, h, l).items()}

    def _complete(self, ring: _Ring, start: datetime, end: datetime, include_newest: bool) -> bool:
        ts = ring.ts_ms()
        stop = len(ts) if include_newest else len(ts) - 1
        first = int(np.searchsorted(ts[:stop], int(start.timestamp() * 1000), side="left"))
        last = int(np.searchsorted(ts[:stop], int(end.timestamp() * 1000), side="left"))
        if last <= first:
            return False
        window = ring.column_view
        self.highs.append(float(window("high")[first:last].max()))
        self.lows.append(float(window("low")[first:last].min()))
        self.closes.append(float(window("close")[last - 1]))
        return True


class _Ring:
    """The newest ``capacity`` bars as numpy columns, appended in amortised O(1)."""

    def __init__(self, capacity: int) -> None:
        self.capacity, self.size, self.end = capacity, 0, 0
        self.data = {name: np.empty(2 * capacity) for name in _COLUMNS}
        self.ts = np.empty(2 * capacity, dtype=np.int64)

    def append(self, ts_ms: int, values: dict[str, float]) -> None:
        if self.end == len(self.ts):  # compact: keep the newest capacity - 1 rows at the front
            keep = self.capacity - 1
            for column in (*self.data.values(), self.ts):
                column[:keep] = column[self.end - keep : self.end]
            self.end, self.size = keep, keep
        for name, column in self.data.items():
            column[self.end] = values[name]
        self.ts[self.end] = ts_ms
        self.end += 1
        self.size = min(self.size + 1, self.capacity)

    def ts_ms(self) -> np.ndarray:
        return self.ts[self.end - self.size : self.end]

    def column_view(self, name: str) -> np.ndarray:
        return self.data[name][self.end - self.size : self.end]

    def tail(self, n: int) -> dict[str, np.ndarray]:
        start = self.end - min(n, self.size)
        return {name: column[start : self.end] for name, column in self.data.items()}


def _impossible(values: dict[str, float]) -> str | None:
    """Why a bar cannot be real, or None: the price rules of ``models.market.quality`` (finite,
    positive, :func:`~models.market.quality.inconsistent_ohlc`) on one bar's floats, since a polars
    expression per bar would cost more than the whole vector."""
    o, h, l, c = values["open"], values["high"], values["low"], values["close"]
    if not all(math.isfinite(x) and x > 0 for x in (o, h, l, c)):
        return f"prices must be finite and positive (open {o}, high {h}, low {l}, close {c})"
    if l > min(o, c) or h < max(o, c):
        return f"low <= open, close <= high does not hold (open {o}, high {h}, low {l}, close {c})"
    return None


class RollingFeatures:
    """Feed closed bars in order with :meth:`update`; get each bar's feature row back."""

    def __init__(self, tf: Timeframe, boundary: DayBoundary = DayBoundary.UTC, window: int = WARMUP_BARS) -> None:
        self.tf, self.boundary, self.window = tf, boundary, window
        self._ring = _Ring(window)
        self._state = _Recursions()
        self._higher = [_HigherBars(k, higher, boundary) for k, higher in enumerate(CONTEXT_TIMEFRAMES[tf], start=1)]
        self._clock_row: dict[datetime, int] = {}  # bar close -> row of _clock_values
        self._clock_names: tuple[str, ...] = ()
        self._clock_values: list[list[float]] = []
        self._seen = 0
        self._last_ts: datetime | None = None
        self._symbol = ""

    def seed(self, bars: pl.DataFrame) -> None:
        """Start from history (the newest bars from the warehouse, say): advance the state
        through every bar given, without producing vectors."""
        frame = bars.select(list(BAR_SCHEMA)).cast(BAR_SCHEMA)
        if frame.is_empty():
            return
        columns = BarArrays.columns_of(frame)
        ad_step = BarArrays(columns).ad_step
        for i, (opened, symbol) in enumerate(zip(frame["ts"], frame["symbol"], strict=True)):
            values = {name: float(columns[name][i]) for name in _COLUMNS}
            self._append(opened, values, symbol)
            self._advance(opened, values, float(ad_step[i]))

    def update(self, bar: pl.DataFrame, external: ExternalData | None = None) -> dict[str, object]:
        """Append one closed bar (a one-row frame in BAR_SCHEMA); returns its feature row.

        Bars must arrive in time order; a bar at or before the newest one is refused.
        """
        if bar.height != 1:
            raise ValueError(f"update takes exactly one bar, got {bar.height}")
        row = bar.row(0, named=True)
        opened: datetime = row["ts"]
        values = {name: math.nan if row[name] is None else float(row[name]) for name in _COLUMNS}
        problem = _impossible(values)
        if problem:  # refused before any state moves: one bad bar must not poison every recursion
            raise ValueError(f"{row['symbol']} bar at {opened} refused, the window is unchanged: {problem}")
        self._append(opened, values, row["symbol"])
        arrays = _LiveArrays(self._ring.tail(TAIL))
        self._advance(opened, values, float(arrays.ad_step[-1]))  # the batch code's per-bar input
        arrays.state = self._state.values
        closed = bar_close_at(opened, self.tf, self.boundary)
        out: dict[str, float] = {}
        with np.errstate(**QUIET):
            for family in FAMILIES:
                out |= {name: column[-1] for name, column in family(arrays).items()}  # numpy floats
        out |= self._clock_at(closed)
        for higher in self._higher:
            out |= higher.values
        if external is not None:
            close_ms = np.array((int(closed.timestamp() * 1000),))
            out |= {name: float(column[0]) for name, column in external_features(close_ms, external).items()}
        else:
            out |= {name: math.nan for name in EXTERNAL_FEATURES}
        out |= interactions(out)
        vector = {name: None if math.isnan(out[name]) else out[name] for name in FEATURE_NAMES}
        return {"symbol": row["symbol"], "timeframe": row["timeframe"], "ts": opened, "close_ts": closed, **vector}

    def _append(self, opened: datetime, values: dict[str, float], symbol: str) -> None:
        if self._last_ts is not None and opened <= self._last_ts:
            raise ValueError(f"bar at {opened} is not after the newest bar {self._last_ts}")
        if self._symbol and symbol != self._symbol:
            raise ValueError(f"bar of {symbol} in the window of {self._symbol}")
        self._symbol, self._last_ts = symbol, opened
        self._ring.append(int(opened.timestamp() * 1000), values)

    def _advance(self, opened: datetime, values: dict[str, float], ad_step: float) -> None:
        """Move the recursions and the higher timeframes past the bar just appended."""
        self._state.update(values["open"], values["high"], values["low"], values["close"], ad_step)
        closed = bar_close_at(opened, self.tf, self.boundary)
        for higher in self._higher:
            higher.add(self._ring, opened, closed)
        self._seen += 1

    def _clock_at(self, closed: datetime) -> dict[str, float]:
        """Clock features by the batch code, computed for the next bar closes in one call."""
        if closed not in self._clock_row:
            closes, at = [], closed
            for _ in range(_CLOCK_CHUNK):
                closes.append(at)
                at = bar_close_at(at, self.tf, self.boundary)
            frame = pl.DataFrame({"close_ts": closes}, schema={"close_ts": TS})
            columns = clock_features(frame)
            self._clock_row = {t: i for i, t in enumerate(closes)}
            self._clock_names = tuple(columns)
            self._clock_values = np.column_stack(list(columns.values())).tolist()
        return dict(zip(self._clock_names, self._clock_values[self._clock_row[closed]], strict=True))

    @property
    def warm(self) -> bool:
        """True once a full window of bars has passed: from then on every feature equals the batch value."""
        return self._seen >= self.window

