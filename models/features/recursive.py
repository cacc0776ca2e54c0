"""Recursive indicators one bar at a time, with TA-Lib's recursions.

TA-Lib computes EMA-family and Wilder-smoothed indicators as recursions over the whole
array. The live path keeps their state instead and advances it by one bar: the same
recursion (same formulas, in TA-Lib's order of operations), so once the start has been
forgotten (the batch engine relies on that too, see :data:`WARMUP_BARS`) both give the same
value. ``TA_IS_ZERO`` and the SAR's rules are TA-Lib's. The parity test is the referee.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field

_EPSILON = 1e-8  # TA-Lib's TA_IS_ZERO


def _is_zero(value: float) -> bool:
    return -_EPSILON < value < _EPSILON


def true_range(high: float, low: float, previous_close: float) -> float:
    if math.isnan(previous_close):
        return high - low
    return max(high - low, abs(previous_close - high), abs(previous_close - low))


@dataclass(slots=True)
class Ema:
    """TA-Lib EMA: ``ema += (x - ema) * k`` with ``k = 2 / (n + 1)``."""

    n: int
    value: float = math.nan

    def update(self, x: float) -> float:
        if math.isnan(self.value):
            self.value = x
        else:
            self.value = (x - self.value) * (2.0 / (self.n + 1)) + self.value
        return self.value


@dataclass(slots=True)
class Wilder:
    """Wilder's average, TA-Lib's way: ``avg = (avg * (n - 1) + x) / n``."""

    n: int
    value: float = math.nan

    def update(self, x: float) -> float:
        if math.isnan(self.value):
            self.value = x
        else:
            self.value = (self.value * (self.n - 1) + x) / self.n
        return self.value


@dataclass(slots=True)
class GainLoss:
    """RSI(n) and CMO(n): Wilder averages of gains and losses."""

    n: int
    previous: float = math.nan
    gain: float = 0.0
    loss: float = 0.0

    def update(self, close: float) -> None:
        if not math.isnan(self.previous):
            change = close - self.previous
            gain, loss = self.gain * (self.n - 1), self.loss * (self.n - 1)
            if change < 0:
                loss -= change
            else:
                gain += change
            self.gain, self.loss = gain / self.n, loss / self.n
        self.previous = close

    @property
    def rsi(self) -> float:
        total = self.gain + self.loss
        return 0.0 if _is_zero(total) else 100.0 * (self.gain / total)

    @property
    def cmo(self) -> float:
        total = self.gain + self.loss
        return 0.0 if _is_zero(total) else 100.0 * ((self.gain - self.loss) / total)


@dataclass(slots=True)
class DirectionalMovement:
    """+DI, -DI and ADX(n) from Wilder sums of directional movement and true range."""

    n: int
    high: float = math.nan
    low: float = math.nan
    close: float = math.nan
    plus_dm: float = 0.0
    minus_dm: float = 0.0
    tr: float = 0.0
    plus_di: float = 0.0
    minus_di: float = 0.0
    adx: float = 0.0

    def update(self, high: float, low: float, close: float) -> None:
        if not math.isnan(self.high):
            diff_plus, diff_minus = high - self.high, self.low - low
            self.minus_dm -= self.minus_dm / self.n
            self.plus_dm -= self.plus_dm / self.n
            if diff_minus > 0 and diff_plus < diff_minus:
                self.minus_dm += diff_minus
            elif diff_plus > 0 and diff_plus > diff_minus:
                self.plus_dm += diff_plus
            self.tr = self.tr - self.tr / self.n + true_range(high, low, self.close)
            if not _is_zero(self.tr):
                self.minus_di = 100.0 * (self.minus_dm / self.tr)
                self.plus_di = 100.0 * (self.plus_dm / self.tr)
                total = self.minus_di + self.plus_di
                if not _is_zero(total):
                    dx = 100.0 * (abs(self.minus_di - self.plus_di) / total)
                    self.adx = (self.adx * (self.n - 1) + dx) / self.n
            else:
                self.minus_di = self.plus_di = 0.0
        self.high, self.low, self.close = high, low, close


@dataclass(slots=True)
class ParabolicSar:
    """TA-Lib SAR: the value reported for a bar is the stop in force during it."""

    acceleration: float = 0.02
    maximum: float = 0.2
    is_long: bool = True
    sar: float = math.nan
    ep: float = math.nan
    af: float = 0.02
    high: float = math.nan
    low: float = math.nan

    def update(self, high: float, low: float) -> float:
        if math.isnan(self.high):  # first bar: start long from its low
            self.high, self.low, self.sar, self.ep, self.af = high, low, low, high, self.acceleration
            return math.nan
        prev_high, prev_low = self.high, self.low
        self.high, self.low = high, low
        sar, ep, af = self.sar, self.ep, self.af
        if self.is_long:
            if low <= sar:
                self.is_long = False
                sar = max(ep, prev_high, high)
                out = sar
                af, ep = self.acceleration, low
                sar = max(sar + af * (ep - sar), prev_high, high)
            else:
                out = sar
                if high > ep:
                    ep, af = high, min(af + self.acceleration, self.maximum)
                sar = min(sar + af * (ep - sar), prev_low, low)
        else:
            if high >= sar:
                self.is_long = True
                sar = min(ep, prev_low, low)
                out = sar
                af, ep = self.acceleration, high
                sar = min(sar + af * (ep - sar), prev_low, low)
            else:
                out = sar
                if low < ep:
                    ep, af = low, min(af + self.acceleration, self.maximum)
                sar = max(sar + af * (ep - sar), prev_high, high)
        self.sar, self.ep, self.af = sar, ep, af
        return out


@dataclass(slots=True)
class StochRsi:
    """STOCHRSI(14, 14, 3, SMA): fast %K of RSI over ``k`` bars, %D its ``d``-bar mean."""

    k: int = 14
    d: int = 3
    rsi: deque = field(default_factory=deque)
    fast_k: deque = field(default_factory=deque)

    def __post_init__(self) -> None:
        self.rsi, self.fast_k = deque(maxlen=self.k), deque(maxlen=self.d)

    def update(self, rsi: float) -> tuple[float, float]:
        self.rsi.append(rsi)
        if len(self.rsi) < self.k:
            return math.nan, math.nan
        lowest, highest = min(self.rsi), max(self.rsi)
        diff = (highest - lowest) / 100.0
        self.fast_k.append((rsi - lowest) / diff if diff != 0.0 else 0.0)
        if len(self.fast_k) < self.d:
            return self.fast_k[-1], math.nan
        return self.fast_k[-1], sum(self.fast_k) / self.d


@dataclass(slots=True)
class DecayedSum:
    """``(1 - a) / a`` times polars' ``ewm_mean(alpha=a, adjust=False)`` with ``a = 2 / (n + 1)``."""

    n: int
    value: float = math.nan

    def update(self, x: float) -> float:
        x = 0.0 if math.isnan(x) else x
        alpha = 2 / (self.n + 1)
        self.value = x if math.isnan(self.value) else (1 - alpha) * self.value + alpha * x
        return (1 - alpha) * self.value / alpha
