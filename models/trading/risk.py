"""The risk model: how big, where the stop and target go, and whether an order may go at all.

Sizing: a fixed fraction of equity risked at the stop (the stop ATR multiples or a percentage
away), a capped fractional Kelly fraction from the signal's probability and the payoff
(target over stop distance), a fraction of equity as notional, or fixed lots. Sizes are
rounded down to the lot step and bounded by the instrument's lots. Limits: lots and exposure
per symbol (clipped), gross exposure (clipped), open positions, order rate, margin (rejected),
and the account's daily loss and drawdown (they trip the kill switch). Every decision carries
its reason, approvals included.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from enum import StrEnum

import numpy as np

from models.market.instruments import Instrument


class Sizing(StrEnum):
    FIXED_FRACTION = "fixed_fraction"
    KELLY = "kelly"
    EQUITY_FRACTION = "equity_fraction"
    FIXED_LOTS = "fixed_lots"


class KillSwitch(StrEnum):
    OFF = "off"
    HALT = "halt"  # no new orders at all; working protective orders stay
    REDUCE_ONLY = "reduce_only"  # only orders that shrink a position


# Module globals for the order path (see models/trading/orders.py: enum reads are slow in 3.11).
KS_OFF, KS_HALT, KS_REDUCE_ONLY = KillSwitch.OFF, KillSwitch.HALT, KillSwitch.REDUCE_ONLY
SZ_FIXED_FRACTION, SZ_KELLY, SZ_EQUITY_FRACTION, SZ_FIXED_LOTS = (
    Sizing.FIXED_FRACTION, Sizing.KELLY, Sizing.EQUITY_FRACTION, Sizing.FIXED_LOTS)


@dataclass(frozen=True, slots=True)
class RiskConfig:
    sizing: Sizing = SZ_FIXED_FRACTION
    risk_fraction: float = 0.01  # of equity, lost if the stop is hit (FIXED_FRACTION)
    kelly_multiplier: float = 0.5  # fractional Kelly
    kelly_cap: float = 0.02  # the most of equity one trade may risk under Kelly
    payoff: float | None = None  # Kelly's win/loss ratio when no target is set
    equity_fraction: float = 1.0  # notional over equity (EQUITY_FRACTION)
    fixed_lots: float = 0.1
    scale_by_confidence: bool = False
    atr_period: int = 14
    stop_atr: float | None = 2.0
    target_atr: float | None = None
    stop_pct: float | None = None
    target_pct: float | None = None
    max_lots_per_symbol: float | None = None
    max_symbol_exposure: float | None = None  # notional of one symbol over equity
    max_gross_exposure: float | None = None  # all notionals over equity
    max_open_positions: int | None = None
    max_daily_loss: float | None = None  # fraction of the day's opening equity
    max_drawdown: float | None = None  # fraction below the equity peak
    max_orders: int | None = None  # within order_window_minutes of bar time
    order_window_minutes: int = 60
    max_margin_usage: float = 1.0  # used margin over equity after the order
    breach_action: KillSwitch = KS_HALT
    flatten_on_breach: bool = True

    def __post_init__(self) -> None:
        for name in ("risk_fraction", "kelly_multiplier", "kelly_cap", "equity_fraction", "fixed_lots", "max_margin_usage"):
            if not getattr(self, name) > 0:
                raise ValueError(f"risk setting {name} must be positive, got {getattr(self, name)}")
        for name in ("max_daily_loss", "max_drawdown"):
            value = getattr(self, name)
            if value is not None and not 0 < value < 1:
                raise ValueError(f"risk setting {name} is a fraction between 0 and 1, got {value}")
        if self.atr_period < 1:
            raise ValueError(f"risk setting atr_period must be at least 1, got {self.atr_period}")

    @property
    def uses_atr(self) -> bool:
        """Whether a stop or target is placed in ATRs (else the ATR is never read)."""
        return self.stop_atr is not None or self.target_atr is not None

    def to_dict(self) -> dict:
        return {k: (v.value if isinstance(v, StrEnum) else v) for k, v in asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict) -> RiskConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown risk settings {sorted(unknown)}; known: {sorted(known)}")
        values = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            value, kind = data[f.name], str(f.type)
            try:
                if value is None and "None" in kind:
                    values[f.name] = None
                elif f.name == "sizing":
                    values[f.name] = Sizing(value)
                elif f.name == "breach_action":
                    values[f.name] = KillSwitch(value)
                elif kind.startswith("bool"):
                    if not isinstance(value, bool):
                        raise ValueError
                    values[f.name] = value
                elif kind.startswith("int"):
                    values[f.name] = int(value)
                else:
                    values[f.name] = float(value)
            except (TypeError, ValueError):
                raise ValueError(f"risk setting {f.name}={value!r} is not a valid {kind}") from None
        return cls(**values)


@dataclass(slots=True)  # a record: not frozen, frozen ones cost 5x to build on the order path
class EntryContext:
    """What the risk model knows when a strategy asks to open a position."""

    symbol: str
    side: int
    price: float  # the decision bar's close
    conv: float  # quote -> account at the decision
    atr: float | None
    equity: float
    confidence: float = 1.0
    prob: float | None = None  # probability the side is right (for Kelly)
    other_notional: float = 0.0  # gross notional of the other positions, account currency
    other_margin: float = 0.0
    other_positions: int = 0
    orders_in_window: int = 0
    kill: KillSwitch = KS_OFF


@dataclass(slots=True)  # a record: not frozen, frozen ones cost 5x to build on the order path
class RiskDecision:
    approved: bool
    reason: str
    qty: float = 0.0  # units
    lots: float = 0.0
    stop: float | None = None
    target: float | None = None
    risk: float = 0.0  # money at risk at the stop, account currency


_EXIT_APPROVED = RiskDecision(True, "exit approved")  # read, never changed: one object each
_EXIT_HALTED = RiskDecision(False, "kill switch: halt")


def round_lots(lots: float, spec: Instrument) -> float:
    """Down to the lot step (a hair of tolerance so 0.3 / 0.1 counts as 3 steps)."""
    steps = math.floor(lots / spec.lot_step + 1e-9)
    return round(steps * spec.lot_step, 10)


def true_ranges(high: np.ndarray, low: np.ndarray, close: np.ndarray, prev_close: float) -> np.ndarray:
    """True range of each bar; a bar without a previous close (NaN) counts its high - low."""
    pc = np.r_[prev_close, close[:-1]]
    return np.fmax(high - low, np.fmax(np.abs(high - pc), np.abs(low - pc)))


def mean_true_range(ranges: list[float], period: int, end: int | None = None) -> float | None:
    """ATR as the mean of the last ``period`` true ranges, summed exactly (``math.fsum``): a
    function of those bars alone, whatever history came before, so a live runner restarted on
    the same bars gets the backtest's value to the bit. None without enough bars."""
    end = len(ranges) if end is None else end
    if end < period:
        return None
    window = ranges[end - period:end]
    # fsum over a list of floats: over an array it would box every element as a numpy scalar (2x slower)
    return math.fsum(window.tolist() if isinstance(window, np.ndarray) else window) / period


class RiskModel:
    def __init__(self, config: RiskConfig = RiskConfig()) -> None:
        self.config = config

    def levels(self, side: int, price: float, atr: float | None) -> tuple[float | None, float | None, str]:
        """Stop and target prices of an entry at ``price``; an error text when they cannot be set."""
        c = self.config
        stop_dist = target_dist = None
        if c.uses_atr:
            if atr is None or not atr > 0:
                return None, None, f"not enough history for ATR({c.atr_period})"
        if c.stop_pct is not None:
            stop_dist = price * c.stop_pct
        elif c.stop_atr is not None:
            stop_dist = c.stop_atr * atr
        if c.target_pct is not None:
            target_dist = price * c.target_pct
        elif c.target_atr is not None:
            target_dist = c.target_atr * atr
        stop = price - side * stop_dist if stop_dist else None
        target = price + side * target_dist if target_dist else None
        return stop, target, ""

    def evaluate_exit(self, kill: KillSwitch) -> RiskDecision:
        return _EXIT_HALTED if kill is KS_HALT else _EXIT_APPROVED

    def evaluate_entry(self, ctx: EntryContext, spec: Instrument) -> RiskDecision:
        c = self.config
        if ctx.kill is not KS_OFF:
            return RiskDecision(False, f"kill switch: {ctx.kill.value}")
        if c.max_open_positions is not None and ctx.other_positions + 1 > c.max_open_positions:
            return RiskDecision(False, f"open positions limit: {ctx.other_positions} open, at most {c.max_open_positions}")
        if c.max_orders is not None and ctx.orders_in_window + 1 > c.max_orders:
            return RiskDecision(False, f"order rate limit: {ctx.orders_in_window} orders in {c.order_window_minutes} min, "
                                       f"at most {c.max_orders}")
        if not ctx.equity > 0:
            return RiskDecision(False, f"no equity ({ctx.equity:.2f})")
        stop, target, error = self.levels(ctx.side, ctx.price, ctx.atr)
        if error:
            return RiskDecision(False, error)
        scale = ctx.confidence if c.scale_by_confidence else 1.0
        unit_value = ctx.conv  # account currency per unit per 1.0 of price
        if c.sizing in (SZ_FIXED_FRACTION, SZ_KELLY):
            if stop is None:
                return RiskDecision(False, f"{c.sizing.value} sizing needs a stop (stop_atr or stop_pct)")
            stop_dist = abs(ctx.price - stop)
            if c.sizing is SZ_FIXED_FRACTION:
                fraction = c.risk_fraction * scale
                how = f"fixed fraction {fraction:.2%}"
            else:
                if ctx.prob is None or not 0.0 <= ctx.prob <= 1.0:
                    return RiskDecision(False, "kelly sizing needs the signal's probability")
                payoff = abs(target - ctx.price) / stop_dist if target is not None else c.payoff
                if not payoff:
                    return RiskDecision(False, "kelly sizing needs a target or a payoff ratio")
                kelly = ctx.prob - (1.0 - ctx.prob) / payoff
                if kelly <= 0:
                    return RiskDecision(False, f"kelly: no edge (p={ctx.prob:.3f}, payoff={payoff:.2f}, f*={kelly:.3f})")
                fraction = min(c.kelly_cap, c.kelly_multiplier * kelly) * scale
                how = f"kelly {fraction:.2%} (p={ctx.prob:.3f}, payoff={payoff:.2f}, f*={kelly:.3f}, cap {c.kelly_cap:.2%})"
            units = fraction * ctx.equity / (stop_dist * unit_value)
            how += f" of {ctx.equity:,.2f} at a stop {stop_dist:.6g} away"
        elif c.sizing is SZ_EQUITY_FRACTION:
            units = c.equity_fraction * scale * ctx.equity / (ctx.price * unit_value)
            how = f"notional {c.equity_fraction * scale:.2%} of {ctx.equity:,.2f}"
        else:
            units = c.fixed_lots * scale * spec.contract_size
            how = f"fixed {c.fixed_lots * scale:g} lots"
        lots = units / spec.contract_size
        notes = []
        caps = [(spec.max_lot, "instrument max lot")]
        if c.max_lots_per_symbol is not None:
            caps.append((c.max_lots_per_symbol, "lots per symbol"))
        lot_notional = spec.contract_size * ctx.price * unit_value
        if c.max_symbol_exposure is not None:
            caps.append((c.max_symbol_exposure * ctx.equity / lot_notional, "symbol exposure"))
        if c.max_gross_exposure is not None:
            caps.append((max(c.max_gross_exposure * ctx.equity - ctx.other_notional, 0.0) / lot_notional, "gross exposure"))
        for cap, name in caps:
            if lots > cap:
                lots = cap
                notes.append(f"clipped by {name}")
        lots = round_lots(lots, spec)
        if lots < spec.min_lot:
            return RiskDecision(False, f"size {lots:g} lots below the minimum {spec.min_lot:g} ({how}"
                                       f"{'; ' + ', '.join(notes) if notes else ''})")
        qty = lots * spec.contract_size
        margin = qty * ctx.price * unit_value / spec.leverage
        if ctx.other_margin + margin > c.max_margin_usage * ctx.equity:
            return RiskDecision(False, f"margin: {ctx.other_margin + margin:,.2f} needed, "
                                       f"{c.max_margin_usage * ctx.equity:,.2f} allowed")
        risk = abs(ctx.price - stop) * qty * unit_value if stop is not None else 0.0
        reason = f"{how}: {lots:g} lots" + (f" ({', '.join(notes)})" if notes else "")
        return RiskDecision(True, reason, qty, lots, stop, target, risk)
