"""Strategies: bars (and predictions) in, one signal per bar out.

One small interface, freqtrade-style: :meth:`Strategy.signals` takes a frame of bars and
returns, for every bar, ``side`` (+1 be long, -1 be short, 0 be flat, null: no new decision),
``confidence`` in [0, 1] and ``prob`` (the probability that the side is right, for Kelly
sizing; null when the strategy has none). It must be causal: a bar's signal may use that bar
and earlier ones only. The backtest calls it once on the whole history; the live runner calls
it on its window and takes the last row; :func:`causality_violations` checks the two agree.
The engine acts when a signal's side differs from the position's.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import numpy as np
import polars as pl
from numpy.lib.stride_tricks import sliding_window_view

SIGNAL_SCHEMA = {"side": pl.Float64(), "confidence": pl.Float64(), "prob": pl.Float64()}


class Strategy(ABC):
    """Subclass, set ``name`` and ``defaults``, implement :meth:`signals`."""

    name: ClassVar[str]
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **params: Any) -> None:
        unknown = set(params) - set(self.defaults)
        if unknown:
            raise ValueError(f"strategy {self.name!r} has no parameters {sorted(unknown)}; it takes {sorted(self.defaults)}")
        self.params = {**self.defaults, **params}

    @property
    def warmup(self) -> int:
        """Bars of history a signal needs; the live runner keeps at least this many."""
        return 1

    @abstractmethod
    def signals(self, bars: pl.DataFrame) -> pl.DataFrame:
        """One row per bar, in order: ``side``, ``confidence``, ``prob`` (see the module doc)."""

    def describe(self) -> str:
        return f"{self.name}({', '.join(f'{k}={v}' for k, v in self.params.items())})"


def window_mean(values: np.ndarray, n: int) -> np.ndarray:
    """Mean of each bar's last ``n`` values (NaN before): each mean is a function of its own
    window only, so a live window and the full history give the very same floats."""
    out = np.full(len(values), np.nan)
    if len(values) >= n:
        out[n - 1:] = sliding_window_view(values, n).mean(axis=1)
    return out


def crossings(fast: np.ndarray, slow: np.ndarray) -> np.ndarray:
    """+1 where ``fast`` crosses above ``slow`` on this bar (strictly below on the previous bar,
    strictly above now), -1 for the opposite, NaN elsewhere."""
    side = np.full(len(fast), np.nan)
    if len(fast) > 1:
        with np.errstate(invalid="ignore"):
            up = (fast[:-1] < slow[:-1]) & (fast[1:] > slow[1:])
            down = (fast[:-1] > slow[:-1]) & (fast[1:] < slow[1:])
        side[1:][up] = 1.0
        side[1:][down] = -1.0
    return side


def _frame(side: np.ndarray, confidence: np.ndarray | float = 1.0, prob: np.ndarray | None = None) -> pl.DataFrame:
    n = len(side)
    conf = np.broadcast_to(np.asarray(confidence, dtype=np.float64), (n,))
    return pl.DataFrame({
        "side": pl.Series(side, dtype=pl.Float64, nan_to_null=True),
        "confidence": pl.Series(conf, dtype=pl.Float64),
        "prob": pl.Series(np.full(n, np.nan) if prob is None else prob, dtype=pl.Float64, nan_to_null=True),
    })


class SmaCross(Strategy):
    """Long when the fast SMA crosses above the slow one, short when below: always in the
    market after the first crossing (the reference strategy of the parity test)."""

    name = "sma_cross"
    defaults = {"fast": 10, "slow": 30}

    def __init__(self, **params: Any) -> None:
        super().__init__(**params)
        if not 1 <= int(self.params["fast"]) < int(self.params["slow"]):
            raise ValueError(f"sma_cross needs 1 <= fast < slow, got fast={self.params['fast']} slow={self.params['slow']}")

    @property
    def warmup(self) -> int:
        return int(self.params["slow"]) + 1

    def indicators(self, close: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return window_mean(close, int(self.params["fast"])), window_mean(close, int(self.params["slow"]))

    def signals(self, bars: pl.DataFrame) -> pl.DataFrame:
        fast, slow = self.indicators(bars["close"].to_numpy())
        return _frame(crossings(fast, slow))


class DonchianBreakout(Strategy):
    """Long when the close breaks above the high of the previous ``window`` bars, short below
    their low; ``exit_window`` > 0 goes flat on the opposite break of that shorter channel."""

    name = "donchian_breakout"
    defaults = {"window": 20, "exit_window": 0}

    @property
    def warmup(self) -> int:
        return int(self.params["window"]) + 1

    def signals(self, bars: pl.DataFrame) -> pl.DataFrame:
        n = int(self.params["window"])
        frame = bars.select(
            pl.col("close"),
            pl.col("high").rolling_max(n).shift(1).alias("upper"),
            pl.col("low").rolling_min(n).shift(1).alias("lower"),
        )
        side = np.full(bars.height, np.nan)
        close, upper, lower = (frame[c].to_numpy().astype(np.float64) for c in ("close", "upper", "lower"))
        with np.errstate(invalid="ignore"):
            exit_n = int(self.params["exit_window"])
            if exit_n > 0:
                ex = bars.select(pl.col("high").rolling_max(exit_n).shift(1).alias("u"),
                                 pl.col("low").rolling_min(exit_n).shift(1).alias("l"))
                side[close < ex["l"].to_numpy().astype(np.float64)] = 0.0  # a long's exit (also flat when short: no harm)
                side[close > ex["u"].to_numpy().astype(np.float64)] = 0.0
            side[close > upper] = 1.0
            side[close < lower] = -1.0
        return _frame(side)


class ModelStrategy(Strategy):
    """A model's out-of-sample prediction through thresholds: long when ``prob_up`` is at or
    above ``long_above``, short at or below ``short_below``, flat in between (or no decision
    there when ``exit_between`` is false). Confidence is ``2 |p - 0.5|``; ``prob`` is the
    probability of the chosen side (``prob_up`` or ``1 - prob_up``), for Kelly sizing.
    With ``column="prediction"`` the thresholds apply to a predicted return instead, with no
    probability. Reads the prediction columns of the frame it is given (bars joined with
    ``model_predictions``); a bar without a prediction makes no decision."""

    name = "model"
    defaults = {"long_above": 0.55, "short_below": 0.45, "exit_between": True, "column": "prob_up"}

    def signals(self, bars: pl.DataFrame) -> pl.DataFrame:
        column = self.params["column"]
        if column not in bars.columns:
            raise ValueError(f"model strategy needs a {column!r} column (bars joined with model_predictions)")
        return _frame(*self._decide(bars[column].cast(pl.Float64).fill_null(np.nan).to_numpy()))

    def signal(self, value: float | None) -> dict[str, float | None]:
        """One prediction's signal (the live runner, per bar): the row :meth:`signals` gives for
        it (``side, confidence, prob``, None where null), by the same code, without a frame."""
        side, confidence, prob = self._decide(np.array([np.nan if value is None else value], dtype=np.float64))

        def value_of(x: np.ndarray | None) -> float | None:
            return None if x is None or np.isnan(x[0]) else float(x[0])

        return {"side": value_of(side), "confidence": float(confidence[0]), "prob": value_of(prob)}

    def _decide(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        column = self.params["column"]
        hi, lo = float(self.params["long_above"]), float(self.params["short_below"])
        if not lo <= hi:
            raise ValueError(f"model strategy needs short_below <= long_above, got {lo} > {hi}")
        with np.errstate(invalid="ignore"):
            side = np.where(p >= hi, 1.0, np.where(p <= lo, -1.0, 0.0 if self.params["exit_between"] else np.nan))
        side[np.isnan(p)] = np.nan
        if column == "prob_up":
            confidence = np.nan_to_num(np.abs(p - 0.5) * 2.0, nan=0.0)
            prob = np.where(side > 0, p, np.where(side < 0, 1.0 - p, np.nan))
        else:
            confidence, prob = np.ones(len(p)), None
        return side, confidence, prob


STRATEGIES: dict[str, type[Strategy]] = {cls.name: cls for cls in (SmaCross, DonchianBreakout, ModelStrategy)}


def make_strategy(name: str, params: dict[str, Any] | None = None) -> Strategy:
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; registered: {', '.join(sorted(STRATEGIES))}") from None
    return cls(**(params or {}))


def causality_violations(strategy: Strategy, bars: pl.DataFrame, cuts: list[int]) -> list[int]:
    """Bars (indices) whose signal changes when the history is cut right after them: a
    strategy that peeks ahead shows up here. Empty for a causal strategy."""
    full = strategy.signals(bars)
    bad = []
    for cut in cuts:
        last = strategy.signals(bars.head(cut + 1)).row(-1)
        if any(not (a == b or (a is None and b is None)) for a, b in zip(last, full.row(cut))):
            bad.append(cut)
    return bad
