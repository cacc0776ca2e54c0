"""Conversion of PnL from an instrument's quote currency into the account currency.

Three cases, as MetaTrader computes profit: the quote currency is the account's (EURUSD in a
USD account: rate 1); the base currency is the account's (USDJPY in a USD account: JPY -> USD
is 1 / the pair's own price, exact at every fill and close); otherwise a cross (EURGBP in a USD
account: GBP -> USD from another pair, GBPUSD, as known at the time: the last close before the
moment, never a later one).
"""

from __future__ import annotations

from enum import StrEnum

import numpy as np

from models.market.instruments import Instrument

# Market convention for which currency of a pair is the base: earlier in this list wins.
_PRIORITY = ("EUR", "GBP", "AUD", "NZD", "USD", "CAD", "CHF", "JPY")


class ConvMode(StrEnum):
    ONE = "one"  # quote currency == account currency
    INVERSE = "inverse"  # base currency == account currency: 1 / price
    CROSS = "cross"  # from another pair's prices


# Module globals for the order path (see models/trading/orders.py: enum reads are slow in 3.11).
CM_ONE, CM_INVERSE, CM_CROSS = ConvMode.ONE, ConvMode.INVERSE, ConvMode.CROSS


def conversion_mode(spec: Instrument, account_currency: str) -> ConvMode:
    base, quote = spec.currencies
    if quote == account_currency:
        return CM_ONE
    if base == account_currency:
        return CM_INVERSE
    return CM_CROSS


def cross_pair(quote: str, account_currency: str) -> tuple[str, bool]:
    """The pair that converts ``quote`` into the account currency, and whether its price must
    be inverted: GBP -> USD is GBPUSD (as is), JPY -> USD is USDJPY (inverted)."""
    rank = {c: i for i, c in enumerate(_PRIORITY)}
    if rank.get(quote, 99) <= rank.get(account_currency, 99):
        return f"{quote}{account_currency}", False
    return f"{account_currency}{quote}", True


def fill_conversion(mode: ConvMode, price: float, known_rate: float) -> float:
    """Quote -> account rate for an execution at ``price``; ``known_rate`` is the cross rate
    known at that moment (ignored unless the mode is a cross)."""
    if mode is CM_ONE:
        return 1.0
    if mode is CM_INVERSE:
        return 1.0 / price
    return known_rate


def mark_conversion(mode: ConvMode, close: np.ndarray, cross: np.ndarray | None = None) -> np.ndarray:
    """Quote -> account rate at each bar's close (what unrealised PnL is marked with)."""
    if mode is CM_ONE:
        return np.ones(len(close))
    if mode is CM_INVERSE:
        return 1.0 / close
    if cross is None:
        raise ValueError("a cross pair needs the conversion pair's rates")
    return np.asarray(cross, dtype=np.float64)


def asof_rates(bar_close_ms: np.ndarray, rate_close_ms: np.ndarray, rate: np.ndarray, invert: bool) -> np.ndarray:
    """The conversion pair's last close known at each bar's close (never a later one); NaN
    before its first close."""
    idx = np.searchsorted(rate_close_ms, bar_close_ms, side="right") - 1
    values = np.where(idx >= 0, rate[np.clip(idx, 0, None)], np.nan) if len(rate) else np.full(len(bar_close_ms), np.nan)
    return 1.0 / values if invert else values
