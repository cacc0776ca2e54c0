"""Compute every registered feature for the bars of one symbol and timeframe.

One function, :func:`compute_features`, serves the batch asset (whole partitions with their
warm-up) and the live runner (a rolling window ending at the newest bar): both call it, so
the same bar gets the same vector. Every value at bar ``t`` uses bars up to ``t`` only;
higher-timeframe context uses only higher-timeframe bars that closed by ``t``'s close;
external data joins as of ``t``'s close by the time it became known.

Recursive indicators (EMA, Wilder smoothing) forget their start geometrically; periods are
kept short enough that :data:`WARMUP_BARS` of history makes any two starts agree to far
below 1e-9. Scale-free forms (ratios to price, /100 oscillators, z-scores) let one model
serve EURUSD and XAUUSD alike. Indicators come from TA-Lib.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import talib

from models.market.candles import rollup_bars
from models.features.external import ExternalData, event_features
from models.features.registry import FEATURE_NAMES, FEATURES, FIB_LEVELS, PATTERNS
from models.market.sessions import london_session, minutes_after_rollover, new_york_session, tokyo_session
from models.market.timeframes import DayBoundary, Timeframe, bar_close_expr

# Higher timeframes for context, chosen so 16 completed bars fit in the warm-up window.
CONTEXT_TIMEFRAMES: dict[Timeframe, tuple[Timeframe, Timeframe]] = {
    Timeframe.M1: (Timeframe.M15, Timeframe.H1),
    Timeframe.M5: (Timeframe.H1, Timeframe.H4),
    Timeframe.M15: (Timeframe.H1, Timeframe.H4),
    Timeframe.M30: (Timeframe.H4, Timeframe.D1),
    Timeframe.H1: (Timeframe.H4, Timeframe.D1),
    Timeframe.H4: (Timeframe.D1, Timeframe.W1),
    Timeframe.D1: (Timeframe.W1, Timeframe.W1),
    Timeframe.W1: (Timeframe.W1, Timeframe.W1),
}
EXTERNAL_FEATURES = tuple(spec.name for spec in FEATURES if spec.family == "external")


class _TaLib:
    """TA-Lib's functions without their pandas/polars argument wrapper (numpy goes in): about
    2 us less per call, and the live path makes some 50 calls per bar."""

    def __getattr__(self, name: str):
        function = getattr(talib, name)
        function = getattr(function, "__wrapped__", function)
        setattr(self, name, function)
        return function


ta = _TaLib()

QUIET = {"divide": "ignore", "invalid": "ignore"}
_LN2 = float(np.log(2))
"""numpy error state the families run under (``np.errstate(**QUIET)``): _div handles 0 and NaN."""


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a / b with 0 where b is 0 (a flat bar has no range to be a fraction of); NaN stays NaN."""
    out = a / b
    if np.count_nonzero(b) != b.size:  # the cheap test (``b.size``, not ``np.size``): ~60 calls per live bar
        out = np.where(np.equal(b, 0) & (a == a), 0.0, out)
    return out


def _shift(x: np.ndarray, k: int) -> np.ndarray:
    out = np.empty(len(x))
    out[:k] = np.nan
    out[k:] = x[: max(len(x) - k, 0)]
    return out


def _decayed_sum(x: np.ndarray, n: int) -> np.ndarray:
    """sum_i x[t-i] * beta**(i+1) with beta = 1 - 2/(n+1): what EMA(n) of a cumulative sum
    lags behind that sum."""
    alpha = 2 / (n + 1)
    smoothed = pl.Series(np.nan_to_num(x)).ewm_mean(alpha=alpha, adjust=False).to_numpy()
    return (1 - alpha) * smoothed / alpha


def _windows(x: np.ndarray, n: int, start: int, stop: int) -> np.ndarray:
    """Rows ``start..stop-1`` of the length-``n`` trailing windows of ``x``: a read-only view,
    made directly (``as_strided`` costs ~3 us per call, ``sliding_window_view`` ~8)."""
    x = np.ascontiguousarray(x)
    step = x.strides[0]
    view = np.ndarray((stop - start, n), dtype=x.dtype, buffer=x, offset=(start - n + 1) * step, strides=(step, step))
    view.flags.writeable = False
    return view


def _rolling_shape(x: np.ndarray, n: int, first: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Rolling skewness and excess kurtosis (population moments) over ``n`` values, for rows
    from ``first`` on; NaN where the window holds a NaN.

    polars' rolling moments for whole histories (4-5x faster than central moments per
    window on 1M bars, equal within 1e-12); central moments of the few windows asked for
    when only the newest rows are wanted (the live path: 20 us against polars' 95 us for a
    208-bar array). tests/test_features.py holds both to a direct per-window computation."""
    if len(x) - max(first, n - 1) > _FEW_ROWS:
        series = pl.Series(x).fill_nan(None)
        skew = series.rolling_skew(n, bias=True).fill_null(np.nan).to_numpy()
        kurt = series.rolling_kurtosis(n, fisher=True, bias=True).fill_null(np.nan).to_numpy()
        return skew, kurt
    skew, kurt = np.full(len(x), np.nan), np.full(len(x), np.nan)
    start = max(n - 1, first)
    if start < len(x):
        windows = _windows(x, n, start, len(x))
        total = np.add.reduce  # ndarray.sum without its Python layer
        centred = windows - (total(windows, axis=1) / n)[:, None]
        squared = centred * centred
        m2, m3, m4 = total(squared, axis=1) / n, total(squared * centred, axis=1) / n, total(squared * squared, axis=1) / n
        skew[start:], kurt[start:] = m3 / m2**1.5, m4 / m2**2 - 3.0
    return skew, kurt


_FEW_ROWS = 64


def _rolling(x: np.ndarray, n: int, how: str) -> np.ndarray:
    """Rolling mean/sum/std (sample) over ``n`` bars. TA-Lib when only leading values are
    missing (the common case, and the fast one); polars, which skips gaps window by window,
    otherwise."""
    leading = np.count_nonzero(x != x)  # NaNs; all of them leading is the common case
    if leading == 0 or not np.isnan(x[leading:]).any():
        if how == "mean":
            return ta.SMA(x, n)
        if how == "sum":
            return ta.SUM(x, n)
        return np.sqrt(np.maximum(ta.VAR(x, n, 1), 0) * n / (n - 1))
    series = pl.Series(x).fill_nan(None)
    result = getattr(series, f"rolling_{how}")(n)
    return result.cast(pl.Float64).fill_null(np.nan).to_numpy()


class BarArrays:
    """Arrays of one symbol's bars and the indicators several families share.

    The recursive indicators (EMA family, Wilder smoothing, SAR) are methods: the batch
    engine runs TA-Lib over the whole history; the live engine (``models.features.online``)
    answers them from state advanced one bar at a time, and the families stay one code.
    """

    def __init__(self, columns: dict[str, np.ndarray]):
        self.o, self.h, self.l, self.c = (columns[c] for c in ("open", "high", "low", "close"))
        volume, ticks = columns["volume"], columns["tick_count"]
        self.ticks = ticks
        self.activity = np.where(volume > 0, volume, ticks)
        self.spread, self.spread_max, self.vwap = columns["spread_mean"], columns["spread_max"], columns["vwap"]
        self.log_ret = np.concatenate(((np.nan,), np.diff(np.log(self.c))))
        with np.errstate(**QUIET):
            self.ad_step = _div((self.c - self.l) - (self.h - self.c), self.h - self.l) * self.activity
        self._cache: dict[tuple, object] = {}
        self.first_row = 0  # rows before it may be left NaN by per-window statistics (the live path needs the last)

    @staticmethod
    def columns_of(bars: pl.DataFrame) -> dict[str, np.ndarray]:
        return {
            name: bars[name].fill_null(np.nan).to_numpy().astype(np.float64)
            for name in ("open", "high", "low", "close", "volume", "tick_count", "spread_mean", "spread_max", "vwap")
        }

    def _memo(self, key: tuple, compute):
        if key not in self._cache:
            self._cache[key] = compute()
        return self._cache[key]

    def ema(self, n: int) -> np.ndarray:
        return self._memo(("ema", n), lambda: ta.EMA(self.c, n))

    def dema(self, n: int) -> np.ndarray:
        return ta.DEMA(self.c, n)

    def tema(self, n: int) -> np.ndarray:
        return ta.TEMA(self.c, n)

    def t3(self, n: int, vfactor: float) -> np.ndarray:
        return ta.T3(self.c, n, vfactor)

    def macd(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        return ta.MACD(self.c, 12, 26, 9)

    def directional(self, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """ADX, +DI, -DI."""
        return ta.ADX(self.h, self.l, self.c, n), ta.PLUS_DI(self.h, self.l, self.c, n), ta.MINUS_DI(self.h, self.l, self.c, n)

    def sar(self) -> np.ndarray:
        return ta.SAR(self.h, self.l, 0.02, 0.2)

    def rsi(self, n: int) -> np.ndarray:
        return ta.RSI(self.c, n)

    def cmo(self, n: int) -> np.ndarray:
        return ta.CMO(self.c, n)

    def stochrsi(self) -> tuple[np.ndarray, np.ndarray]:
        return ta.STOCHRSI(self.c, 14, 14, 3, 0)

    def trix(self, n: int) -> np.ndarray:
        return ta.TRIX(self.c, n)

    def atr(self, n: int) -> np.ndarray:
        return self._memo(("atr", n), lambda: ta.ATR(self.h, self.l, self.c, n))

    def ad_decayed(self, n: int) -> np.ndarray:
        return _decayed_sum(self.ad_step, n)


def _trend(b: BarArrays) -> dict[str, np.ndarray]:
    c, out = b.c, {}
    sma = {n: ta.SMA(c, n) for n in (10, 20, 50, 200)}
    for n, average in sma.items():
        out[f"sma_ratio_{n}"] = _div(c, average) - 1
    for n in (10, 20, 50):
        out[f"ema_ratio_{n}"] = _div(c, b.ema(n)) - 1
    out["wma_ratio_20"] = _div(c, ta.WMA(c, 20)) - 1
    out["trima_ratio_20"] = _div(c, ta.TRIMA(c, 20)) - 1
    out["dema_ratio_20"] = _div(c, b.dema(20)) - 1
    out["tema_ratio_20"] = _div(c, b.tema(20)) - 1
    out["t3_ratio_10"] = _div(c, b.t3(10, 0.7)) - 1
    out["sma_cross_10_50"] = _div(sma[10], sma[50]) - 1
    out["ema_cross_12_26"] = _div(b.ema(12), b.ema(26)) - 1
    macd, signal, hist = b.macd()
    out["macd"], out["macd_signal"], out["macd_hist"] = _div(macd, c), _div(signal, c), _div(hist, c)
    adx, plus_di, minus_di = b.directional(14)
    out["adx_14"], out["plus_di_14"], out["minus_di_14"] = adx / 100, plus_di / 100, minus_di / 100
    down, up = ta.AROON(b.h, b.l, 25)
    out["aroon_up_25"], out["aroon_down_25"] = up / 100, down / 100
    out["aroon_osc_25"] = ta.AROONOSC(b.h, b.l, 25) / 100
    out["sar_distance"] = _div(c - b.sar(), c)
    out["linreg_slope_20"] = _div(ta.LINEARREG_SLOPE(c, 20), c)
    return out


def _momentum(b: BarArrays) -> dict[str, np.ndarray]:
    c, out = b.c, {}
    for n in (7, 14, 28):
        out[f"rsi_{n}"] = b.rsi(n) / 100
    k, d = ta.STOCH(b.h, b.l, c, 14, 3, 0, 3, 0)
    out["stoch_k"], out["stoch_d"] = k / 100, d / 100
    k, d = b.stochrsi()
    out["stochrsi_k"], out["stochrsi_d"] = k / 100, d / 100
    out["cci_20"] = ta.CCI(b.h, b.l, c, 20) / 100
    out["willr_14"] = ta.WILLR(b.h, b.l, c, 14) / 100
    for n in (5, 10, 20):
        out[f"roc_{n}"] = _div(c, _shift(c, n)) - 1
    out["mfi_14"] = ta.MFI(b.h, b.l, c, b.activity, 14) / 100
    out["ultosc"] = ta.ULTOSC(b.h, b.l, c, 7, 14, 28) / 100
    out["trix_15"] = b.trix(15)
    out["ppo"] = ta.PPO(c, 12, 26, 0) / 100
    out["cmo_14"] = b.cmo(14) / 100
    out["bop"] = _div(c - b.o, b.h - b.l)
    return out


def _volatility(b: BarArrays) -> dict[str, np.ndarray]:
    c, h, l, out = b.c, b.h, b.l, {}
    for n in (7, 14, 28):
        out[f"natr_{n}"] = _div(b.atr(n), c)
    upper, middle, lower = ta.BBANDS(c, 20, 2, 2, 0)
    band = upper - lower
    out["bb_position_20"], out["bb_width_20"] = _div(c - lower, band), _div(band, middle)
    ema20, atr20 = b.ema(20), b.atr(20)
    out["keltner_position_20"] = _div(c - (ema20 - 2 * atr20), 4 * atr20)
    out["keltner_width_20"] = _div(4 * atr20, ema20)
    for n in (20, 55):
        highest, lowest = ta.MAX(h, n), ta.MIN(l, n)
        channel = highest - lowest
        out[f"donchian_position_{n}"] = _div(c - lowest, channel)
        out[f"donchian_width_{n}"] = _div(channel, c)
    for n in (10, 30, 60, 120):
        out[f"realized_vol_{n}"] = _rolling(b.log_ret, n, "std")
    hl2 = np.log(_div(h, l)) ** 2
    out["parkinson_vol_20"] = np.sqrt(_rolling(hl2, 20, "mean") / (4 * _LN2))
    co = np.log(_div(c, b.o))
    out["garman_klass_vol_20"] = np.sqrt(np.maximum(_rolling(0.5 * hl2 - (2 * _LN2 - 1) * co**2, 20, "mean"), 0))
    out["vol_ratio_10_60"] = _div(out["realized_vol_10"], out["realized_vol_60"])
    out["true_range_ratio"] = _div(ta.TRANGE(h, l, c), b.atr(14))
    return out


def _volume(b: BarArrays) -> dict[str, np.ndarray]:
    out = {}
    direction = np.sign(np.concatenate(((0.0,), np.diff(b.c))))
    obv_step = direction * b.activity
    out["obv_change_20"] = _div(_rolling(obv_step, 20, "sum"), _rolling(b.activity, 20, "sum"))
    for n in (20, 100):
        out[f"tick_count_ratio_{n}"] = _div(b.ticks, ta.SMA(b.ticks, n))
    out["activity_zscore_50"] = _div(b.activity - ta.SMA(b.activity, 50), ta.STDDEV(b.activity, 50, 1))
    spread_mean, spread_std = _rolling(b.spread, 100, "mean"), _rolling(b.spread, 100, "std")
    out["spread_zscore_100"] = _div(b.spread - spread_mean, spread_std)
    out["spread_to_atr"] = _div(b.spread, b.atr(14))
    out["spread_max_ratio"] = _div(b.spread_max, b.spread)
    out["vwap_distance"] = _div(b.c - b.vwap, b.c)
    # Chaikin's oscillator EMA3(A/D) - EMA10(A/D) written on the A/D increments, where the
    # level of the cumulative line cancels: the same value whatever bar the history starts at.
    out["adosc_3_10"] = _div(b.ad_decayed(10) - b.ad_decayed(3), _rolling(b.activity, 10, "sum"))
    return out


def _candle(b: BarArrays) -> dict[str, np.ndarray]:
    span = b.h - b.l
    return {
        "body": _div(b.c - b.o, span),
        "upper_wick": _div(b.h - np.maximum(b.o, b.c), span),
        "lower_wick": _div(np.minimum(b.o, b.c) - b.l, span),
        "close_position": _div(b.c - b.l, span),
        "range_to_atr": _div(span, b.atr(14)),
        "gap": _div(b.o, _shift(b.c, 1)) - 1,
    }


def _patterns(b: BarArrays) -> dict[str, np.ndarray]:
    signs = np.sign([getattr(ta, name)(b.o, b.h, b.l, b.c) for name in PATTERNS], dtype=np.float64)  # a row each
    return {f"pattern_{name[3:].lower()}": row for name, row in zip(PATTERNS, signs, strict=True)}


def _fibonacci(b: BarArrays) -> dict[str, np.ndarray]:
    n = 100
    high, low = ta.MAX(b.h, n), ta.MIN(b.l, n)
    high_at, low_at = ta.MAXINDEX(b.h, n).astype(np.float64), ta.MININDEX(b.l, n).astype(np.float64)
    up = high_at >= low_at  # the swing ran up: retrace from the high
    span = high - low
    levels = np.array(FIB_LEVELS)[:, None]  # every level at once: one row each
    prices = np.where(up, high - levels * span, low + levels * span)
    distances = _div(b.c - prices, span)
    out = {f"fib_{str(level)[2:]}_distance": distances[i] for i, level in enumerate(FIB_LEVELS)}
    out["swing_position"] = _div(b.c - low, span)
    out["swing_direction"] = np.where(np.isnan(span), np.nan, np.where(up, 1.0, -1.0))
    out["swing_direction"][: n - 1] = np.nan
    return out


def _returns(b: BarArrays) -> dict[str, np.ndarray]:
    log_c = np.log(b.c)
    out = {f"ret_{n}": log_c - _shift(log_c, n) for n in (1, 3, 6, 12, 24, 48)}
    for k in (1, 2, 3):
        out[f"ret_1_lag_{k}"] = _shift(b.log_ret, k)
    out["skew_60"], out["kurt_60"] = _rolling_shape(b.log_ret, 60, first=b.first_row)
    out["percentile_100"] = np.full(len(b.c), np.nan)
    first = max(99, b.first_row)
    if len(b.c) > first:
        windows = _windows(b.c, 100, first, len(b.c))
        out["percentile_100"][first:] = (windows < windows[:, -1:]).sum(axis=1) / 99
    out["resistance_distance_100"] = _div(ta.MAX(b.h, 100), b.c) - 1
    out["support_distance_100"] = _div(ta.MIN(b.l, 100), b.c) - 1
    return out


def clock_features(frame: pl.DataFrame) -> dict[str, np.ndarray]:
    """Sessions and calendar at each bar's close."""
    at = pl.col("close_ts")
    hour = at.dt.hour().cast(pl.Float64) + at.dt.minute().cast(pl.Float64) / 60
    weekday = at.dt.weekday().cast(pl.Float64) - 1
    month = at.dt.month().cast(pl.Float64) - 1
    day, days_in_month = at.dt.day(), at.dt.month_end().dt.day()

    def hours_since(tz: str, start_hour: int) -> pl.Expr:
        local = at.dt.convert_time_zone(tz)
        minutes = local.dt.hour().cast(pl.Int32) * 60 + local.dt.minute().cast(pl.Int32)
        return ((minutes - start_hour * 60) % 1440).cast(pl.Float64) / 60

    tokyo, london, new_york = tokyo_session(at), london_session(at), new_york_session(at)
    two_pi = 2 * np.pi
    columns = frame.select(
        tokyo.cast(pl.Float64).alias("session_tokyo"),
        london.cast(pl.Float64).alias("session_london"),
        new_york.cast(pl.Float64).alias("session_new_york"),
        (london & new_york).cast(pl.Float64).alias("overlap_london_new_york"),
        (tokyo & london).cast(pl.Float64).alias("overlap_tokyo_london"),
        hours_since("Europe/London", 8).alias("hours_since_london_open"),
        hours_since("America/New_York", 8).alias("hours_since_new_york_open"),
        (minutes_after_rollover(at).cast(pl.Float64) / 60).alias("hours_since_rollover"),
        (hour * two_pi / 24).sin().alias("hour_sin"),
        (hour * two_pi / 24).cos().alias("hour_cos"),
        (weekday * two_pi / 7).sin().alias("dow_sin"),
        (weekday * two_pi / 7).cos().alias("dow_cos"),
        (month * two_pi / 12).sin().alias("month_sin"),
        (month * two_pi / 12).cos().alias("month_cos"),
        (day <= 2).cast(pl.Float64).alias("month_start"),
        (day >= days_in_month - 1).cast(pl.Float64).alias("month_end"),
    )
    return {name: columns[name].to_numpy() for name in columns.columns}


def _simple_rsi(close: np.ndarray, n: int) -> np.ndarray:
    change = np.concatenate(((np.nan,), np.diff(close)))
    gain, loss = _rolling(np.maximum(change, 0), n, "mean"), _rolling(np.maximum(-change, 0), n, "mean")
    return np.where(np.isnan(gain), np.nan, _div(gain, gain + loss))


def context_values(k: int, c: np.ndarray, h: np.ndarray, l: np.ndarray) -> dict[str, np.ndarray]:
    """Trend, RSI and ATR of higher-timeframe bars ``k`` (closes, highs, lows in order)."""
    previous = _shift(c, 1)
    true_range = np.fmax(h - l, np.fmax(np.abs(h - previous), np.abs(l - previous)))
    with np.errstate(**QUIET):
        return {
            f"htf{k}_trend": _div(c, _rolling(c, 10, "mean")) - 1,
            f"htf{k}_rsi": _simple_rsi(c, 14),
            f"htf{k}_natr": _div(_rolling(true_range, 14, "mean"), c),
        }


def _context(bars: pl.DataFrame, frame: pl.DataFrame, tf: Timeframe, boundary: DayBoundary) -> dict[str, np.ndarray]:
    """Higher-timeframe trend, RSI and ATR from higher-timeframe bars closed by each bar's close.

    Finite windows only (SMA, Cutler's RSI, mean true range), so a rolling window and a full
    history give the same value once 16 higher bars have closed inside it.
    """
    out: dict[str, np.ndarray] = {}
    for k, higher in enumerate(CONTEXT_TIMEFRAMES[tf], start=1):
        upper = rollup_bars(bars, higher, boundary)
        c, h, l = (upper[col].to_numpy() for col in ("close", "high", "low"))
        values = upper.select(bar_close_expr(pl.col("ts"), higher, boundary).alias("available_at")).with_columns(
            pl.Series(name, column) for name, column in context_values(k, c, h, l).items()
        )
        joined = frame.select("close_ts").join_asof(values, left_on="close_ts", right_on="available_at", strategy="backward")
        out |= {name: joined[name].fill_null(np.nan).to_numpy() for name in values.columns[1:]}
    return out


def external_features(close_ms: np.ndarray, external: ExternalData | None) -> dict[str, np.ndarray]:
    """External features known at each bar's close (epoch ms); null where nothing was known yet.

    ``external.values`` holds long rows ``(known_at, name, value)`` named after registered
    features (the latest known value wins); ``external.events`` the symbol's high-impact events.
    """
    unknown = set(external.names) - set(EXTERNAL_FEATURES) if external is not None else ()
    if unknown:
        raise ValueError(f"external rows for unregistered features {sorted(unknown)}; registered: {EXTERNAL_FEATURES}")
    known = event_features(close_ms, external.event_arrays) | external.values_at(close_ms) if external is not None else {}
    nothing = np.full(len(close_ms), np.nan)
    nothing.flags.writeable = False  # shared by every feature without data
    return {name: known.get(name, nothing) for name in EXTERNAL_FEATURES}


def interactions(values: dict) -> dict:
    """Products of features computed above (arrays in batch, floats live)."""
    return {
        "rsi_x_natr": (values["rsi_14"] - 0.5) * values["natr_14"],
        "adx_x_macd_hist": values["adx_14"] * values["macd_hist"],
        "trend_x_vol": values["sma_ratio_50"] * values["realized_vol_30"],
        "london_x_spread": values["session_london"] * values["spread_zscore_100"],
    }


FAMILIES = (_trend, _momentum, _volatility, _volume, _candle, _patterns, _fibonacci, _returns)
"""The families computed from bar arrays alone (the rest need the clock, other timeframes or external data)."""


def compute_features(
    bars: pl.DataFrame,
    tf: Timeframe,
    boundary: DayBoundary = DayBoundary.UTC,
    external: ExternalData | None = None,
    tail: int | None = None,
) -> pl.DataFrame:
    """One row per bar (one symbol, one timeframe, sorted by ts): ids and every feature.

    ``tail`` keeps only the last rows: indicators still run over every bar given, but the
    per-row work (clock, context joins, the output frame) is done for those rows alone. The
    live path asks for one.
    """
    frame = bars.select("symbol", "timeframe", "ts", bar_close_expr(pl.col("ts"), tf, boundary).alias("close_ts"))
    if bars.is_empty():
        return frame.with_columns(pl.lit(None, dtype=pl.Float64).alias(n) for n in FEATURE_NAMES)
    keep = slice(-tail, None) if tail else slice(None)
    rows = frame[keep]
    b = BarArrays(BarArrays.columns_of(bars))
    values: dict[str, np.ndarray] = {}
    with np.errstate(**QUIET):
        for family in FAMILIES:
            values |= {name: column[keep] for name, column in family(b).items()}
    values |= clock_features(rows)
    values |= _context(bars, rows, tf, boundary)
    values |= external_features(rows["close_ts"].dt.epoch("ms").to_numpy(), external)
    values |= interactions(values)
    return rows.with_columns(
        pl.Series(name, values[name], dtype=pl.Float64, nan_to_null=True) for name in FEATURE_NAMES
    )
