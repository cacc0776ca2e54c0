"""Yahoo Finance daily prices of commodities and indices (gold, oil, the dollar index, ...).

Yahoo has no official API. ``yfinance`` reads the chart endpoint (``/v8/finance/chart``)
with a browser-imitating session and a hard-coded host that cannot be pointed at a test
server without patching several modules. This resource reads the same endpoint and JSON
directly, with a configurable root, timeouts and bounded retries, and only completed days.
"""

from __future__ import annotations

from datetime import date, datetime, time, timedelta, timezone
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import polars as pl
import requests
from dagster import ConfigurableResource
from pydantic import Field

from resources.vendors.base import VendorPayloadError, VendorRequestError, http_get, with_retries

DEFAULT_TICKERS = {
    "gold": "GC=F", "silver": "SI=F", "wti": "CL=F", "brent": "BZ=F", "natgas": "NG=F", "copper": "HG=F",
    "dxy": "DX-Y.NYB", "spx": "^GSPC", "vix": "^VIX",
}

class YahooFinanceResource(ConfigurableResource):
    """Daily bars from Yahoo's chart API, one request per ticker and window."""

    base_url: str = Field(default="https://query2.finance.yahoo.com", description="API root")
    tickers: dict[str, str] = Field(default=DEFAULT_TICKERS, description="our name -> Yahoo ticker")
    attempts: int = Field(default=4, ge=1)
    backoff_s: float = Field(default=2.0, ge=0)
    timeout_s: float = Field(default=20.0, gt=0)

    def daily(self, name: str, start: date, end: date) -> pl.DataFrame:
        """Completed trading days ``start <= date < end`` of ``tickers[name]``.

        A day is known at the next midnight in the exchange's time zone: after its close and
        settlement, never before.
        """
        ticker = self.tickers[name]
        params = {  # a day either side: exchange days are not UTC days
            "period1": int(datetime.combine(start - timedelta(days=1), time(), timezone.utc).timestamp()),
            "period2": int(datetime.combine(end + timedelta(days=1), time(), timezone.utc).timestamp()),
            "interval": "1d", "includePrePost": "false", "events": "div,splits",
        }
        what = f"Yahoo {ticker} {start}..{end}"
        body = with_retries(lambda: self._get(ticker, params), attempts=self.attempts, what=what, backoff_s=self.backoff_s)
        return _parse_chart(body, name, ticker, start, end, what)

    def _get(self, ticker: str, params: dict[str, Any]) -> Any:
        url = f"{self.base_url.rstrip('/')}/v8/finance/chart/{requests.utils.quote(ticker, safe='')}"
        response = http_get(url, params=params, timeout_s=self.timeout_s, headers={"User-Agent": "Mozilla/5.0 tradeforge"})
        try:
            body = response.json()
        except ValueError:
            raise VendorPayloadError(f"Yahoo {ticker}: HTTP {response.status_code}, body is not JSON: {response.text[:120]!r}") from None
        if response.status_code != 200:
            error = (body.get("chart") or {}).get("error") if isinstance(body, dict) else None
            raise VendorRequestError(f"Yahoo {ticker}: HTTP {response.status_code}: {error or response.text[:200]}")
        return body


def _parse_chart(body: Any, name: str, ticker: str, start: date, end: date, what: str) -> pl.DataFrame:
    try:
        chart = body["chart"]
        if chart.get("error"):
            raise VendorRequestError(f"{what}: {chart['error']}")
        result = chart["result"][0]
        meta = result["meta"]
        zone = ZoneInfo(meta.get("exchangeTimezoneName") or "America/New_York")
        stamps = result.get("timestamp") or []
        quote = result["indicators"]["quote"][0] if stamps else {}
        columns = {k: quote.get(k) or [None] * len(stamps) for k in ("open", "high", "low", "close", "volume")}
        if any(len(v) != len(stamps) for v in columns.values()):
            raise VendorPayloadError(f"{what}: quote arrays and timestamps differ in length")
    except (KeyError, IndexError, TypeError, ZoneInfoNotFoundError) as exc:
        raise VendorPayloadError(f"{what}: not a chart response ({type(exc).__name__}: {exc})") from None
    frame = pl.DataFrame({"epoch": stamps, **columns}, schema_overrides={k: pl.Float64 for k in columns}, strict=False)
    local = pl.from_epoch(pl.col("epoch").cast(pl.Int64), time_unit="s").dt.replace_time_zone("UTC").dt.convert_time_zone(zone.key)
    day = local.dt.date().alias("date")
    known = (day.cast(pl.Datetime("ms")) + pl.duration(days=1)).dt.replace_time_zone(zone.key).dt.convert_time_zone("UTC")
    return frame.with_columns(day, known.alias("known_at")).filter(
        (pl.col("date") >= start) & (pl.col("date") < end) & pl.col("close").is_not_null()
    ).unique("date", keep="last").sort("date").select(
        pl.lit(name).alias("name"), pl.lit(ticker).alias("ticker"), "date", "open", "high", "low", "close", "volume",
        pl.lit(meta.get("currency") or "").alias("currency"), pl.col("known_at").cast(pl.Datetime("ms", "UTC")),
    )
