"""Trading hours and market sessions, DST-aware, as polars expressions over UTC timestamps.

FX trades from Sunday 17:00 to Friday 17:00 New York time (21:00/22:00 UTC with DST).
Metals follow the CME Globex week: Sunday 18:00 to Friday 17:00 New York, with a daily
break 17:00-18:00. Crypto trades around the clock. Sessions: Tokyo 09:00-18:00 JST,
London 08:00-17:00 London time, New York 08:00-17:00 New York time.
"""

from __future__ import annotations

import polars as pl

from models.market.instruments import AssetClass
from models.market.timeframes import NEW_YORK

_FRIDAY, _SATURDAY, _SUNDAY = 5, 6, 7
_17H, _18H = 17 * 60, 18 * 60


def _local_minute_of_day(ts: pl.Expr, tz: str) -> pl.Expr:
    local = ts.dt.convert_time_zone(tz)
    return local.dt.hour().cast(pl.Int32) * 60 + local.dt.minute().cast(pl.Int32)


def trading_open(ts: pl.Expr, asset_class: AssetClass) -> pl.Expr:
    """True where the market of ``asset_class`` is open at ``ts``."""
    if asset_class is AssetClass.CRYPTO:
        return pl.lit(True)
    weekday = ts.dt.convert_time_zone(NEW_YORK).dt.weekday()
    minute = _local_minute_of_day(ts, NEW_YORK)
    closed = (weekday == _SATURDAY) | ((weekday == _FRIDAY) & (minute >= _17H))
    if asset_class is AssetClass.FX:
        closed = closed | ((weekday == _SUNDAY) & (minute < _17H))
    else:
        closed = closed | ((weekday == _SUNDAY) & (minute < _18H))
        closed = closed | ((weekday < _FRIDAY) & (minute >= _17H) & (minute < _18H))
    return ~closed


def tokyo_session(ts: pl.Expr) -> pl.Expr:
    return _local_minute_of_day(ts, "Asia/Tokyo").is_between(9 * 60, _18H, closed="left")


def london_session(ts: pl.Expr) -> pl.Expr:
    return _local_minute_of_day(ts, "Europe/London").is_between(8 * 60, _17H, closed="left")


def new_york_session(ts: pl.Expr) -> pl.Expr:
    return _local_minute_of_day(ts, NEW_YORK).is_between(8 * 60, _17H, closed="left")


def minutes_after_rollover(ts: pl.Expr) -> pl.Expr:
    """Minutes since the last 17:00 New York rollover (0..1439)."""
    return (_local_minute_of_day(ts, NEW_YORK) - _17H) % 1440
