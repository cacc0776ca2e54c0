"""Timeframes and the rule that assigns a timestamp to the bar that contains it.

A bar is labelled by its open time and covers ``[open, next open)``. Intraday bars up to H1
are aligned to the UTC epoch. H4, D1 and W1 are aligned to the trading-day boundary: UTC
midnight, or 17:00 New York (the FX day, DST-aware), where a day is 23 or 25 hours long on
the DST switches. Weeks start on Sunday at the day boundary, as MetaTrader's W1 bars do, so
the FX Sunday open belongs to the new week.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from enum import StrEnum
from zoneinfo import ZoneInfo

import polars as pl

NEW_YORK = "America/New_York"


class Timeframe(StrEnum):
    M1 = "M1"
    M5 = "M5"
    M15 = "M15"
    M30 = "M30"
    H1 = "H1"
    H4 = "H4"
    D1 = "D1"
    W1 = "W1"

    @property
    def minutes(self) -> int:
        """Nominal length; bars aligned to a DST-aware boundary can differ by an hour."""
        return _MINUTES[self]

    @property
    def every(self) -> str:
        """The polars duration string of the nominal length."""
        return f"{self.minutes}m"


_MINUTES = {
    Timeframe.M1: 1,
    Timeframe.M5: 5,
    Timeframe.M15: 15,
    Timeframe.M30: 30,
    Timeframe.H1: 60,
    Timeframe.H4: 240,
    Timeframe.D1: 1440,
    Timeframe.W1: 10080,
}

ALL_TIMEFRAMES: tuple[Timeframe, ...] = tuple(Timeframe)


class DayBoundary(StrEnum):
    """Where the trading day (and so H4, D1 and W1 bars) starts."""

    UTC = "utc"
    NEW_YORK_17 = "new_york_17"

    @property
    def tz(self) -> str:
        return "UTC" if self is DayBoundary.UTC else NEW_YORK

    @property
    def offset(self) -> timedelta:
        return timedelta(0) if self is DayBoundary.UTC else timedelta(hours=17)


def _boundary_aligned(tf: Timeframe) -> bool:
    return tf in (Timeframe.H4, Timeframe.D1, Timeframe.W1)


def bar_open_expr(ts: pl.Expr, tf: Timeframe, boundary: DayBoundary) -> pl.Expr:
    """Open time (UTC) of the bar containing each timestamp of ``ts`` (a UTC datetime)."""
    if not _boundary_aligned(tf) or (boundary is DayBoundary.UTC and tf is not Timeframe.W1):
        return ts.dt.truncate(tf.every)
    # Wall-clock arithmetic in the boundary's zone: shift so the day starts at local
    # midnight, truncate, shift back, and localise. 17:00 New York never falls in a DST gap.
    offset = boundary.offset
    wall = ts.dt.convert_time_zone(boundary.tz).dt.replace_time_zone(None) - offset
    if tf is Timeframe.W1:
        # polars weeks start on Monday; weeks here start on Sunday.
        opened = (wall + timedelta(days=1)).dt.truncate("1w") - timedelta(days=1)
    else:
        opened = wall.dt.truncate(tf.every)
    return (
        (opened + offset)
        .dt.replace_time_zone(boundary.tz, ambiguous="earliest")
        .dt.convert_time_zone("UTC")
    )


_EPOCH = datetime(1970, 1, 1, tzinfo=ZoneInfo("UTC"))
_FIRST_SUNDAY = datetime(1970, 1, 4, tzinfo=ZoneInfo("UTC"))


def bar_open_at(moment: datetime, tf: Timeframe, boundary: DayBoundary) -> datetime:
    """Scalar form of :func:`bar_open_expr` (the same wall-clock arithmetic in plain Python:
    the live path calls it once per higher bar), for partition windows and look-backs."""
    if boundary is DayBoundary.UTC or not _boundary_aligned(tf):
        anchor = _FIRST_SUNDAY if tf is Timeframe.W1 else _EPOCH
        length = timedelta(minutes=tf.minutes)
        return anchor + ((moment - anchor) // length) * length
    zone = ZoneInfo(boundary.tz)
    wall = moment.astimezone(zone).replace(tzinfo=None) - boundary.offset
    midnight = wall.replace(hour=0, minute=0, second=0, microsecond=0)
    if tf is Timeframe.W1:
        opened = midnight - timedelta(days=(midnight.weekday() + 1) % 7)  # weeks start on Sunday
    elif tf is Timeframe.D1:
        opened = midnight
    else:
        opened = midnight + timedelta(minutes=(wall - midnight) // timedelta(minutes=tf.minutes) * tf.minutes)
    local = (opened + boundary.offset).replace(tzinfo=zone, fold=0)  # fold 0: the earlier of a repeated hour
    return local.astimezone(ZoneInfo("UTC"))


def bar_close_at(open_time: datetime, tf: Timeframe, boundary: DayBoundary) -> datetime:
    """The exclusive end of the bar that opens at ``open_time``: the next bar's open."""
    if not _boundary_aligned(tf) or boundary is DayBoundary.UTC:
        return open_time + timedelta(minutes=tf.minutes)
    zone = ZoneInfo(boundary.tz)
    wall = open_time.astimezone(zone).replace(tzinfo=None) + timedelta(minutes=tf.minutes)
    return wall.replace(tzinfo=zone).astimezone(ZoneInfo("UTC"))


def bar_close_expr(opened: pl.Expr, tf: Timeframe, boundary: DayBoundary) -> pl.Expr:
    """The exclusive end of each bar that opens at ``opened``: vectorised :func:`bar_close_at`."""
    length = timedelta(minutes=tf.minutes)
    if not _boundary_aligned(tf) or boundary is DayBoundary.UTC:
        return opened + length
    wall = opened.dt.convert_time_zone(boundary.tz).dt.replace_time_zone(None) + length
    return wall.dt.replace_time_zone(boundary.tz, ambiguous="earliest").dt.convert_time_zone("UTC")
