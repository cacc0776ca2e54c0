"""Dukascopy: ticks and one-minute candles for FX, metals and crypto, the backup source.

``dukascopy-python`` reads Dukascopy's chart feed (``chart/json3``: JSONP pages of rows,
walked forward by a ``last_update`` cursor). Its ``fetch`` hard-codes the URL, sets no
timeout (a stalled server hangs the step for ever) and retries any exception, a malformed
page included, seven times. So this module speaks the same wire protocol itself, with the
library's instrument names and intervals, a configurable root URL (tests point it at a
local stub), timeouts, retries of transient failures only within a bounded budget, exact
paging (the library drops only the first repeated row of a page) and strict parsing.
"""

from __future__ import annotations

import json
import random
import string
from datetime import datetime
from typing import Any

import dukascopy_python as dk
import numpy as np
import polars as pl
from dukascopy_python import instruments as dk_instruments
from pydantic import Field

from models.market.instruments import instrument
from models.market.ticks import TS
from resources.vendors.base import (
    VENDOR_M1_SCHEMA,
    MarketDataVendor,
    RetryBudget,
    VendorPayloadError,
    VendorRequestError,
    attempts_field,
    backoff_field,
    budget_field,
    empty_m1,
    http_get,
    refused,
    with_retries,
)

_KNOWN_INSTRUMENTS = frozenset(
    value for name, value in vars(dk_instruments).items() if name.startswith("INSTRUMENT_") and isinstance(value, str)
)
_TICK_COLUMNS = ("ts_ms", "bid", "ask", "bid_size", "ask_size")
_BAR_COLUMNS = ("ts_ms", "open", "high", "low", "close", "volume")


def dukascopy_instrument(symbol: str) -> str:
    """``EURUSD`` -> ``EUR/USD``, as the library's instrument list names it."""
    base, quote = instrument(symbol).currencies
    name = f"{base}/{quote}"
    if name not in _KNOWN_INSTRUMENTS:
        raise VendorRequestError(f"Dukascopy has no instrument {name!r} for {symbol}")
    return name


class DukascopyResource(MarketDataVendor):
    """Dukascopy's public chart feed. No key needed."""

    base_url: str = Field(default="https://freeserv.dukascopy.com/2.0/index.php", description="chart feed endpoint")
    page_limit: int = Field(default=30_000, ge=1, le=30_000, description="rows per page (the feed's maximum is 30,000)")
    attempts: int = attempts_field()
    retry_budget_s: float = budget_field()
    backoff_s: float = backoff_field()
    timeout_s: float = Field(default=15.0, gt=0, description="connect and read timeout of one try (capped by the budget)")
    max_pages: int = Field(default=10_000, ge=1, description="guard against a cursor that never advances")

    @property
    def budget(self) -> RetryBudget:
        return RetryBudget(self.attempts, self.retry_budget_s, self.backoff_s)

    @property
    def source(self) -> str:
        return "dukascopy"

    def fetch_ticks(self, symbol: str, start: datetime, end: datetime) -> pl.DataFrame:
        """Bid/ask ticks; sizes in millions, as the library reports them."""
        rows = self._walk(dukascopy_instrument(symbol), dk.INTERVAL_TICK, start, end, _TICK_COLUMNS)
        return rows.with_columns(
            _ts(), pl.col("bid_size") / 1e6, pl.col("ask_size") / 1e6,
            pl.lit(symbol).alias("symbol"), pl.lit(self.source).alias("source"),
        ).drop("ts_ms")

    def fetch_m1_bars(self, symbol: str, start: datetime, end: datetime) -> pl.DataFrame:
        """Bid-side one-minute candles."""
        rows = self._walk(dukascopy_instrument(symbol), dk.INTERVAL_MIN_1, start, end, _BAR_COLUMNS)
        if rows.is_empty():
            return empty_m1()
        return rows.with_columns(_ts(), pl.col("close").alias("vwap"), pl.lit(1, pl.UInt32).alias("tick_count")).select(list(VENDOR_M1_SCHEMA))

    def _walk(self, name: str, interval: str, start: datetime, end: datetime, columns: tuple[str, ...]) -> pl.DataFrame:
        """Pages forward from ``start`` until a row reaches ``end`` or the feed runs dry.

        The feed has no row ids: a page starts at the cursor (the previous page's last
        millisecond) inclusive, so it first repeats the rows of that millisecond the previous
        page already delivered. Exactly that many are dropped, by count: several ticks in one
        millisecond at a page edge are each kept once, never lost and never doubled.
        """
        start_ms, end_ms = int(start.timestamp() * 1000), int(end.timestamp() * 1000)
        cursor, delivered_at_cursor, frames = start_ms, 0, []
        for _ in range(self.max_pages):
            page = self._page(name, interval, cursor, columns)
            if delivered_at_cursor:
                repeated = _leading_run(page["ts_ms"], cursor)
                if repeated < delivered_at_cursor:
                    raise VendorPayloadError(
                        f"Dukascopy {name} {interval}: the page from {cursor} repeats {repeated} row(s) of its first "
                        f"millisecond, the previous page delivered {delivered_at_cursor}: the feed changed under the cursor"
                    )
                page = page.slice(delivered_at_cursor)
            if page.is_empty():
                break
            frames.append(page.filter((pl.col("ts_ms") >= start_ms) & (pl.col("ts_ms") < end_ms)))
            last = int(page["ts_ms"][-1])
            if last >= end_ms:
                break
            at_last = _trailing_run(page["ts_ms"], last)
            if last == cursor:  # the whole page shares the cursor's millisecond: more of it follows
                delivered_at_cursor += at_last
                if delivered_at_cursor >= self.page_limit:
                    raise VendorPayloadError(
                        f"Dukascopy {name} {interval}: more than {self.page_limit} rows in the millisecond {cursor}; "
                        "a cursor page cannot get past them"
                    )
            else:
                cursor, delivered_at_cursor = last, at_last
        else:
            raise VendorPayloadError(f"Dukascopy {name} {interval}: more than {self.max_pages} pages for one window")
        return pl.concat(frames) if frames else pl.DataFrame(schema={c: pl.Float64() for c in columns}).cast({"ts_ms": pl.Int64})

    def _page(self, name: str, interval: str, cursor: int, columns: tuple[str, ...]) -> pl.DataFrame:
        callback = "_callbacks____" + "".join(random.choices(string.ascii_letters + string.digits, k=9))
        params = {
            "path": "chart/json3", "splits": "true", "stocks": "true", "time_direction": "N", "jsonp": callback,
            "last_update": str(cursor), "offer_side": dk.OFFER_SIDE_BID, "instrument": name, "interval": interval,
            "limit": str(self.page_limit),
        }
        what = f"Dukascopy {name} {interval} from {cursor}"
        body = with_retries(lambda: self._get(params), budget=self.budget, what=what)
        return _parse_page(body, callback, columns, what)

    def _get(self, params: dict[str, str]) -> str:
        response = http_get(self.base_url, params=params, timeout_s=self.timeout_s)
        if response.status_code != 200:
            raise refused("Dukascopy", response.status_code, response.text, setting="DUKASCOPY_URL")
        return response.text


def _parse_page(body: str, callback: str, columns: tuple[str, ...], what: str) -> pl.DataFrame:
    """``callback([[ts, v1, v2, ...], ...]);`` -> typed columns; anything else is a payload error."""
    text = body.strip()
    if not (text.startswith(f"{callback}(") and text.endswith(");")):
        raise VendorPayloadError(f"{what}: not a JSONP reply to {callback}: {text[:120]!r}")
    try:
        rows: Any = json.loads(text[len(callback) + 1 : -2])
    except ValueError as exc:
        raise VendorPayloadError(f"{what}: JSON inside the JSONP is broken ({exc})") from None
    if not isinstance(rows, list) or any(not isinstance(r, list) or len(r) != len(columns) for r in rows):
        raise VendorPayloadError(f"{what}: expected rows of {len(columns)} values {columns}: {text[:120]!r}")
    try:
        values = np.asarray(rows, dtype=np.float64).reshape(len(rows), len(columns))
    except (TypeError, ValueError) as exc:
        raise VendorPayloadError(f"{what}: a row holds a value that is not a number ({exc})") from None
    frame = pl.DataFrame(values, schema=list(columns), orient="row")
    return frame.with_columns(pl.col("ts_ms").cast(pl.Int64))


def _leading_run(ts_ms: pl.Series, value: int) -> int:
    """How many rows at the start of ``ts_ms`` equal ``value``."""
    differs = (ts_ms != value).arg_true()
    return ts_ms.len() if differs.is_empty() else int(differs[0])


def _trailing_run(ts_ms: pl.Series, value: int) -> int:
    """How many rows at the end of ``ts_ms`` equal ``value``."""
    return _leading_run(ts_ms.reverse(), value)


def _ts() -> pl.Expr:
    return pl.from_epoch(pl.col("ts_ms"), time_unit="ms").dt.replace_time_zone("UTC").cast(TS).alias("ts")
