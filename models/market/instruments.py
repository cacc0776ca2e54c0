"""Instrument specifications: asset class, price scale, pip and point sizes, typical spread,
and the trading specification the engine sizes and accounts with (contract size, lot step,
minimum and maximum lot, leverage, currencies).

Known symbols carry measured-looking defaults; any other FX pair, metal or crypto pair is
inferred from its name, so a user adds a symbol (a new partition) without writing code.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import StrEnum


class AssetClass(StrEnum):
    FX = "fx"
    METAL = "metal"
    CRYPTO = "crypto"


@dataclass(frozen=True, slots=True)
class Instrument:
    symbol: str
    asset_class: AssetClass
    base_price: float  # long-run price level the synthetic market reverts to
    digits: int  # decimals of a quoted price; a point is 10**-digits
    pip: float  # the conventional pip, for spreads and gap/spread limits
    spread_pips: float  # typical spread in liquid hours
    annual_vol: float  # annualised volatility of log returns
    ticks_per_day: int  # mean quote updates on a full trading day
    # Trading specification (MetaTrader's terms): units per lot, lot granularity and bounds,
    # and the account leverage the broker grants (margin = notional / leverage).
    contract_size: float = 100_000.0
    lot_step: float = 0.01
    min_lot: float = 0.01
    max_lot: float = 100.0
    leverage: float = 30.0

    def plausible_prices(self) -> tuple[float, float]:
        """The price range a quote of this instrument can plausibly have, wide enough for its
        whole history (EURUSD 0.82-1.60 since 1999, gold 250-4,500 since 2000, bitcoin from
        cents) and narrow enough to catch another symbol's prices (EURUSD levels under
        XAUUSD, JPY crosses under EURUSD). Override per symbol in the conventions resource."""
        low, high = _PLAUSIBLE[self.asset_class]
        return self.base_price * low, self.base_price * high

    @property
    def point(self) -> float:
        return 10.0 ** -self.digits

    @property
    def currencies(self) -> tuple[str, str]:
        """(base, quote): ``EURUSD`` -> (EUR, USD), ``XAUUSD`` -> (XAU, USD), ``BTCUSDT`` -> (BTC, USDT)."""
        if self.asset_class is AssetClass.CRYPTO:
            coin = next(c for c in _CRYPTO if self.symbol.startswith(c))
            return coin, self.symbol[len(coin):]
        return self.symbol[:3], self.symbol[3:]

    @property
    def base_currency(self) -> str:
        return self.currencies[0]

    @property
    def quote_currency(self) -> str:
        """The currency prices and so PnL are in: JPY for USDJPY, GBP for EURGBP, USD for XAUUSD."""
        return self.currencies[1]

    @property
    def spread(self) -> float:
        """Typical spread in price units: the fill model's fallback where a bar has no bid/ask."""
        return self.spread_pips * self.pip


_PLAUSIBLE = {  # multiples of base_price
    AssetClass.FX: (0.1, 10.0),
    AssetClass.METAL: (0.1, 5.0),
    AssetClass.CRYPTO: (1e-6, 100.0),
}

_USD_PER_UNIT = {  # rough levels used to infer cross rates
    "USD": 1.0, "EUR": 1.08, "GBP": 1.27, "AUD": 0.66, "NZD": 0.61, "CAD": 0.74,
    "CHF": 1.13, "JPY": 0.0067, "SEK": 0.095, "NOK": 0.094, "DKK": 0.145, "SGD": 0.74,
    "HKD": 0.128, "MXN": 0.058, "ZAR": 0.054, "TRY": 0.031, "PLN": 0.25, "CNH": 0.138,
}
_METALS = {"XAU": (2000.0, 2, 0.1, 2.5, 0.15), "XAG": (23.0, 3, 0.01, 2.5, 0.25),
           "XPT": (950.0, 2, 0.1, 8.0, 0.25), "XPD": (1000.0, 2, 0.1, 10.0, 0.35)}
_CRYPTO = {"BTC": (42000.0, 0.6), "ETH": (2300.0, 0.7), "SOL": (100.0, 0.9), "XRP": (0.6, 0.8),
           "LTC": (70.0, 0.75), "ADA": (0.5, 0.8), "DOGE": (0.08, 0.9), "BNB": (300.0, 0.6)}

# Retail-broker defaults per asset class: (contract size, lot step, min lot, max lot, leverage).
_TRADING = {
    AssetClass.FX: (100_000.0, 0.01, 0.01, 100.0, 30.0),
    AssetClass.METAL: (100.0, 0.01, 0.01, 50.0, 20.0),
    AssetClass.CRYPTO: (1.0, 0.01, 0.01, 100.0, 2.0),
}


def _with_trading_spec(spec: Instrument) -> Instrument:
    contract, step, lo, hi, leverage = _TRADING[spec.asset_class]
    if spec.symbol.startswith("XAG"):
        contract = 5_000.0  # silver trades in lots of 5,000 oz
    return replace(spec, contract_size=contract, lot_step=step, min_lot=lo, max_lot=hi, leverage=leverage)


_KNOWN: dict[str, Instrument] = {
    "EURUSD": Instrument("EURUSD", AssetClass.FX, 1.08, 5, 1e-4, 0.2, 0.07, 90_000),
    "GBPUSD": Instrument("GBPUSD", AssetClass.FX, 1.27, 5, 1e-4, 0.4, 0.08, 80_000),
    "USDJPY": Instrument("USDJPY", AssetClass.FX, 150.0, 3, 1e-2, 0.3, 0.09, 85_000),
    "XAUUSD": Instrument("XAUUSD", AssetClass.METAL, 2000.0, 2, 0.1, 2.5, 0.15, 70_000),
    "BTCUSD": Instrument("BTCUSD", AssetClass.CRYPTO, 42000.0, 2, 1.0, 15.0, 0.6, 45_000),
}


def instrument(symbol: str) -> Instrument:
    """Spec of ``symbol`` (``EURUSD``, ``XAUUSD``, ``BTCUSD``, ...), known or inferred.

    Raises ``ValueError`` for a name that is no FX pair, metal or crypto pair.
    """
    return _with_trading_spec(_market_spec(symbol.upper()))


def _market_spec(symbol: str) -> Instrument:
    if symbol in _KNOWN:
        return _KNOWN[symbol]
    base, quote = symbol[:3], symbol[3:]
    if base in _METALS and quote == "USD":
        price, digits, pip, spread, vol = _METALS[base]
        return Instrument(symbol, AssetClass.METAL, price, digits, pip, spread, vol, 40_000)
    for coin, (price, vol) in _CRYPTO.items():
        if symbol.startswith(coin) and symbol[len(coin):] in ("USD", "USDT", "USDC"):
            digits = max(2, 6 - len(str(int(price))))
            point = 10.0 ** -digits
            return Instrument(symbol, AssetClass.CRYPTO, price, digits, point * 100, 5.0, vol, 30_000)
    if len(symbol) == 6 and base in _USD_PER_UNIT and quote in _USD_PER_UNIT and base != quote:
        price = _USD_PER_UNIT[base] / _USD_PER_UNIT[quote]
        jpy_like = price > 20
        digits, pip = (3, 1e-2) if jpy_like else (5, 1e-4)
        major = "USD" in (base, quote)
        return Instrument(symbol, AssetClass.FX, round(price, digits), digits, pip,
                          0.6 if major else 1.2, 0.09, 70_000 if major else 50_000)
    raise ValueError(
        f"unknown instrument {symbol!r}: expected an FX pair of ISO codes (EURUSD), "
        f"a metal (XAUUSD) or a crypto pair (BTCUSD)"
    )
