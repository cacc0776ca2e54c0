"""The feature registry: each feature declared once, with its family, look-back and meaning.

The registry generates the ``ml_features`` columns, the catalog (``CATALOG.md``) and the
``feature_set`` version, which changes whenever a declaration or the computing code changes.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class FeatureSpec:
    name: str
    family: str
    lookback: int  # bars of history the value needs (0: this bar only)
    description: str
    needs: tuple[str, ...] = ()  # data beyond OHLC bars: "quotes" (bid/ask spreads), "external"


FAMILIES = (
    "trend", "momentum", "volatility", "volume", "candle", "pattern", "fibonacci",
    "session", "calendar", "returns", "multi_timeframe", "external", "interaction",
)

_SPECS: list[FeatureSpec] = []


def _add(family: str, lookback: int, needs: tuple[str, ...] = (), **described: str) -> None:
    for name, description in described.items():
        _SPECS.append(FeatureSpec(name, family, lookback, description, needs or (("external",) if family == "external" else ())))


# -- trend ---------------------------------------------------------------------------------
for n in (10, 20, 50, 200):
    _add("trend", n, **{f"sma_ratio_{n}": f"close / SMA({n}) - 1"})
for n in (10, 20, 50):
    _add("trend", 4 * n, **{f"ema_ratio_{n}": f"close / EMA({n}) - 1"})
_add("trend", 20, wma_ratio_20="close / WMA(20) - 1", trima_ratio_20="close / TRIMA(20) - 1")
_add("trend", 80, dema_ratio_20="close / DEMA(20) - 1", tema_ratio_20="close / TEMA(20) - 1")
_add("trend", 60, t3_ratio_10="close / T3(10, 0.7) - 1")
_add("trend", 50, sma_cross_10_50="SMA(10) / SMA(50) - 1")
_add("trend", 104, ema_cross_12_26="EMA(12) / EMA(26) - 1",
     macd="MACD(12, 26) line / close", macd_signal="MACD signal(9) / close", macd_hist="MACD histogram / close")
_add("trend", 56, adx_14="ADX(14) / 100", plus_di_14="+DI(14) / 100", minus_di_14="-DI(14) / 100")
_add("trend", 25, aroon_up_25="Aroon up(25) / 100", aroon_down_25="Aroon down(25) / 100",
     aroon_osc_25="Aroon oscillator(25) / 100")
_add("trend", 100, sar_distance="(close - parabolic SAR(0.02, 0.2)) / close")
_add("trend", 20, linreg_slope_20="slope of the 20-bar linear regression of close / close")
# -- momentum ------------------------------------------------------------------------------
for n in (7, 14, 28):
    _add("momentum", 4 * n, **{f"rsi_{n}": f"RSI({n}) / 100"})
_add("momentum", 20, stoch_k="slow stochastic %K(14, 3) / 100", stoch_d="slow stochastic %D(3) / 100")
_add("momentum", 60, stochrsi_k="stochastic RSI %K(14, 14, 3) / 100", stochrsi_d="stochastic RSI %D(3) / 100")
_add("momentum", 20, cci_20="CCI(20) / 100")
_add("momentum", 14, willr_14="Williams %R(14) / 100")
for n in (5, 10, 20):
    _add("momentum", n, **{f"roc_{n}": f"close / close {n} bars ago - 1"})
_add("momentum", 14, mfi_14="money flow index(14) / 100, volume = traded volume or tick count")
_add("momentum", 28, ultosc="ultimate oscillator(7, 14, 28) / 100")
_add("momentum", 60, trix_15="TRIX(15): 1-bar rate of change of a triple EMA, %")
_add("momentum", 104, ppo="percentage price oscillator(12, 26) / 100")
_add("momentum", 14, cmo_14="Chande momentum oscillator(14) / 100")
_add("momentum", 0, bop="balance of power: (close - open) / (high - low)")
# -- volatility ----------------------------------------------------------------------------
for n in (7, 14, 28):
    _add("volatility", 4 * n, **{f"natr_{n}": f"ATR({n}) / close"})
_add("volatility", 20, bb_position_20="(close - lower) / (upper - lower), Bollinger(20, 2)",
     bb_width_20="(upper - lower) / middle, Bollinger(20, 2)")
_add("volatility", 80, keltner_position_20="(close - lower) / (upper - lower), Keltner EMA(20) +- 2 ATR(20)",
     keltner_width_20="(upper - lower) / EMA(20), Keltner channel")
for n in (20, 55):
    _add("volatility", n, **{f"donchian_position_{n}": f"(close - lowest low) / (highest - lowest), {n} bars",
                             f"donchian_width_{n}": f"(highest high - lowest low) / close, {n} bars"})
for n in (10, 30, 60, 120):
    _add("volatility", n + 1, **{f"realized_vol_{n}": f"standard deviation of 1-bar log returns, {n} bars"})
_add("volatility", 20, parkinson_vol_20="Parkinson high-low volatility estimator, 20 bars",
     garman_klass_vol_20="Garman-Klass OHLC volatility estimator, 20 bars")
_add("volatility", 61, vol_ratio_10_60="realized_vol_10 / realized_vol_60")
_add("volatility", 56, true_range_ratio="true range / ATR(14)")
# -- volume, ticks and spread --------------------------------------------------------------
_add("volume", 21, obv_change_20="change of on-balance volume over 20 bars / activity over those bars")
for n in (20, 100):
    _add("volume", n, **{f"tick_count_ratio_{n}": f"tick count / its {n}-bar mean"})
_add("volume", 50, activity_zscore_50="z-score of activity (volume, or ticks without volume), 50 bars")
_add("volume", 100, ("quotes",), spread_zscore_100="z-score of the mean spread, 100 bars")
_add("volume", 56, ("quotes",), spread_to_atr="mean spread / ATR(14)")
_add("volume", 0, ("quotes",), spread_max_ratio="max spread / mean spread in the bar")
_add("volume", 0, vwap_distance="(close - vwap) / close")
_add("volume", 40, adosc_3_10="Chaikin A/D oscillator(3, 10) / 10-bar activity")
# -- candle structure ----------------------------------------------------------------------
_add("candle", 0, body="(close - open) / (high - low)", upper_wick="(high - max(open, close)) / (high - low)",
     lower_wick="(min(open, close) - low) / (high - low)", close_position="(close - low) / (high - low)")
_add("candle", 56, range_to_atr="(high - low) / ATR(14)")
_add("candle", 1, gap="open / previous close - 1")
# -- candlestick patterns (TA-Lib, +1 bullish, -1 bearish, 0 none) --------------------------
PATTERNS = {
    "CDLDOJI": "doji", "CDLHAMMER": "hammer", "CDLSHOOTINGSTAR": "shooting star", "CDLENGULFING": "engulfing",
    "CDLHARAMI": "harami", "CDLMORNINGSTAR": "morning star", "CDLEVENINGSTAR": "evening star",
    "CDL3WHITESOLDIERS": "three white soldiers", "CDL3BLACKCROWS": "three black crows", "CDLMARUBOZU": "marubozu",
}
for function, label in PATTERNS.items():
    _add("pattern", 12, **{f"pattern_{function[3:].lower()}": f"TA-Lib {function} ({label}): sign of the signal"})
# -- Fibonacci retracements of the 100-bar swing --------------------------------------------
FIB_LEVELS = (0.236, 0.382, 0.5, 0.618, 0.786)
for level in FIB_LEVELS:
    _add("fibonacci", 100, **{f"fib_{str(level)[2:]}_distance": f"(close - {level} retracement of the 100-bar swing) / swing range"})
_add("fibonacci", 100, swing_position="(close - swing low) / (swing high - swing low), 100 bars",
     swing_direction="+1 when the 100-bar high came after the low, else -1")
# -- market sessions (at the bar's close, DST-aware) ----------------------------------------
_add("session", 0, session_tokyo="Tokyo session open (09:00-18:00 JST)", session_london="London session open",
     session_new_york="New York session open", overlap_london_new_york="London and New York both open",
     overlap_tokyo_london="Tokyo and London both open",
     hours_since_london_open="hours since 08:00 London (0-24)", hours_since_new_york_open="hours since 08:00 New York (0-24)",
     hours_since_rollover="hours since the 17:00 New York rollover (0-24)")
# -- calendar ------------------------------------------------------------------------------
_add("calendar", 0, hour_sin="sin(2 pi hour / 24), UTC", hour_cos="cos(2 pi hour / 24), UTC",
     dow_sin="sin(2 pi weekday / 7)", dow_cos="cos(2 pi weekday / 7)", month_sin="sin(2 pi month / 12)",
     month_cos="cos(2 pi month / 12)", month_start="first two days of the month", month_end="last two days of the month")
# -- lagged returns and rolling statistics --------------------------------------------------
for n in (1, 3, 6, 12, 24, 48):
    _add("returns", n, **{f"ret_{n}": f"log return over {n} bars"})
for k in (1, 2, 3):
    _add("returns", k + 1, **{f"ret_1_lag_{k}": f"1-bar log return {k} bars earlier"})
_add("returns", 61, skew_60="skewness of 1-bar log returns, 60 bars", kurt_60="excess kurtosis of 1-bar log returns, 60 bars")
_add("returns", 100, percentile_100="share of the last 100 closes below this close",
     resistance_distance_100="highest high of 100 bars / close - 1", support_distance_100="lowest low of 100 bars / close - 1")
# -- multi-timeframe context (completed higher-timeframe bars only) --------------------------
for k in (1, 2):
    _add("multi_timeframe", 16, **{
        f"htf{k}_trend": f"higher timeframe {k} (look-back in its bars): close / SMA(10) - 1 of its completed bars",
        f"htf{k}_rsi": f"higher timeframe {k}: RSI(14), simple averages (Cutler), / 100",
        f"htf{k}_natr": f"higher timeframe {k}: mean true range(14) / close",
    })
# -- external data, as known at the bar's close (null until the data is present) -------------
EXTERNAL_SERIES = {"fedfunds": "effective federal funds rate", "dgs10": "US 10-year Treasury yield",
                   "cpi_yoy": "US CPI, year on year"}
for series, label in EXTERNAL_SERIES.items():
    _add("external", 0, **{f"fred_{series}": f"latest known {label}",
                           f"fred_{series}_change": f"change of {label} at its latest release"})
COMMODITIES = {"gold": "gold", "wti": "WTI crude oil", "dxy": "US dollar index"}
for key, label in COMMODITIES.items():
    _add("external", 0, **{f"commodity_{key}_ret_1d": f"{label}: 1-day return, latest known"})
_add("external", 0, event_hours_to_next="hours to the next high-impact event in the symbol's currencies",
     event_hours_since_last="hours since the last high-impact event", event_last_surprise="(actual - forecast) / |forecast| of the last event")
# -- interactions ----------------------------------------------------------------------------
_add("interaction", 56, rsi_x_natr="(rsi_14 - 0.5) * natr_14", adx_x_macd_hist="adx_14 * macd_hist")
_add("interaction", 200, trend_x_vol="sma_ratio_50 * realized_vol_30")
_add("interaction", 100, ("quotes",), london_x_spread="session_london * spread_zscore_100")

FEATURES: tuple[FeatureSpec, ...] = tuple(_SPECS)
FEATURE_NAMES: tuple[str, ...] = tuple(spec.name for spec in FEATURES)
WARMUP_BARS = 1500  # bars of history read before the first bar; covers every look-back and EMA memory


QUOTE_FEATURES: tuple[str, ...] = tuple(spec.name for spec in FEATURES if "quotes" in spec.needs)
"""Features of bid/ask spreads: null where the bars have no quotes (bars imported from files)."""


def feature_set_version(specs: tuple[FeatureSpec, ...] = FEATURES) -> str:
    """A short hash of every declaration and of all the code a feature or label value depends
    on: the families, external joins, labels, sessions, instruments (pips, points, currencies)
    and bar boundaries. Any edit there makes a new feature set, so two never mix."""
    from models.features import compute, external, labels  # the code is part of the definition
    from models.market import instruments, sessions, timeframes

    digest = hashlib.sha256()
    for spec in specs:
        digest.update(repr((spec.name, spec.family, spec.lookback, spec.description, spec.needs)).encode())
    for module in (compute, external, labels, sessions, instruments, timeframes):
        digest.update(inspect.getsource(module).encode())
    return f"fs-{digest.hexdigest()[:12]}"


def catalog_markdown() -> str:
    """The feature catalog, generated from the registry."""
    lines = [
        "# Feature catalog",
        "",
        f"Generated from `models/features/registry.py` (feature set `{feature_set_version()}`, "
        f"{len(FEATURES)} features). Regenerate with `tradeforge features catalog > models/features/CATALOG.md`.",
        "",
    ]
    for family in FAMILIES:
        specs = [s for s in FEATURES if s.family == family]
        lines += [f"## {family} ({len(specs)})", "", "| feature | look-back (bars) | needs | definition |", "|---|---|---|---|"]
        lines += [f"| `{s.name}` | {s.lookback} | {', '.join(s.needs) or 'bars'} | {s.description} |" for s in specs]
        lines.append("")
    return "\n".join(lines)
