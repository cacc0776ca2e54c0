"""FRED / ALFRED through ``fredapi``: every vintage of a series, with its publication day.

``get_series_all_releases`` returns one row per (observation, vintage) with ALFRED's
``realtime_start``: the day that value became the published one. That is what makes a
point-in-time join possible: at time t only values whose vintage began by t are visible,
so a revision published later never reaches an earlier bar.

fredapi opens URLs without a timeout, has no retries, and turns an HTTP error into
``ValueError(message)`` (or an XML ``ParseError`` when the error page is not FRED's XML),
raised while handling the ``HTTPError``: the status stays reachable as the exception's
context. This resource bounds each try with a socket timeout capped by the request's retry
budget, retries rate limits, server errors and network failures within that budget, and
fails at once on anything else: a refused key names FRED_API_KEY.
"""

from __future__ import annotations

import http.client
import socket
import threading
import urllib.error
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date

import polars as pl
from dagster import ConfigurableResource
from fredapi import Fred
from pydantic import Field

from resources.vendors.base import (
    BudgetSpent,
    RetryBudget,
    Transient,
    VendorPayloadError,
    VendorRequestError,
    attempt_timeout,
    attempts_field,
    backoff_field,
    budget_field,
    parse_retry_after,
    refused,
    with_retries,
)

DEFAULT_SERIES = [
    "DFF",  # effective federal funds rate, daily
    "DGS10",  # US 10-year Treasury yield, daily
    "CPIAUCSL",  # US CPI, monthly
    "UNRATE",  # US unemployment rate, monthly
    "GDPC1",  # US real GDP, quarterly
    "ECBDFR",  # ECB deposit facility rate
    "IRLTLT01DEM156N",  # Germany 10-year yield, monthly (OECD)
    "IRLTLT01GBM156N",  # UK 10-year yield, monthly (OECD)
    "IRLTLT01JPM156N",  # Japan 10-year yield, monthly (OECD)
    "DEXUSEU",  # USD per EUR, daily
]

VINTAGE_SCHEMA: dict[str, pl.DataType] = {
    "series_id": pl.String(),
    "observation_date": pl.Date(),
    "value": pl.Float64(),
    "realtime_start": pl.Date(),
}

_TIMEOUT_LOCK = threading.Lock()


@contextmanager
def _socket_timeout(seconds: float) -> Iterator[None]:
    """fredapi calls ``urlopen`` without a timeout; the default socket timeout bounds it."""
    with _TIMEOUT_LOCK:
        previous = socket.getdefaulttimeout()
        socket.setdefaulttimeout(seconds)
        try:
            yield
        finally:
            socket.setdefaulttimeout(previous)


class FredResource(ConfigurableResource):
    """FRED/ALFRED. ``api_key`` comes from ``EnvVar('FRED_API_KEY')``."""

    api_key: str = Field(description="FRED API key (set FRED_API_KEY; never logged)")
    base_url: str = Field(default="https://api.stlouisfed.org/fred", description="API root")
    series: list[str] = Field(default=DEFAULT_SERIES, description="FRED series ids to ingest")
    attempts: int = attempts_field()
    retry_budget_s: float = budget_field()
    backoff_s: float = backoff_field(2.0)  # FRED allows 120 requests a minute
    timeout_s: float = Field(default=15.0, gt=0, description="socket timeout of one try (capped by the budget)")

    @property
    def budget(self) -> RetryBudget:
        return RetryBudget(self.attempts, self.retry_budget_s, self.backoff_s)

    def vintages(self, series_id: str, realtime_start: date, realtime_end: date) -> pl.DataFrame:
        """Every (observation, vintage) of ``series_id`` whose vintage overlaps the window."""
        client = Fred(api_key=self.api_key)
        client.root_url = self.base_url.rstrip("/")
        what = f"FRED {series_id} {realtime_start}..{realtime_end}"

        def call():
            try:
                with _socket_timeout(attempt_timeout(self.timeout_s)):
                    return client.get_series_all_releases(series_id, realtime_start.isoformat(), realtime_end.isoformat())
            except BudgetSpent:
                raise
            except (ValueError, ET.ParseError) as exc:  # fredapi's message of an HTTP error, or an unreadable page
                page = exc.__context__ if isinstance(exc.__context__, urllib.error.HTTPError) else None
                message = str(exc)
                if page is None:
                    if isinstance(exc, ET.ParseError):
                        raise VendorPayloadError(f"{what}: the answer is not FRED's XML ({exc})") from None
                    if "No data exists" in message:
                        return None
                    if "could not convert" in message:
                        raise VendorPayloadError(f"{what}: a value is not a number: {message}") from None
                    raise VendorPayloadError(f"{what}: {message}") from None
                detail = message if isinstance(exc, ValueError) else f"{page.reason} (not FRED's XML)"
                if page.code == 429 or page.code >= 500:
                    raise Transient(f"HTTP {page.code}: {detail}", retry_after=parse_retry_after(page.headers.get("Retry-After"))) from None
                raise refused("FRED", page.code, detail, key_env="FRED_API_KEY", bad_key="api_key" in detail) from None
            except (urllib.error.URLError, http.client.HTTPException, TimeoutError, ConnectionError) as exc:
                raise Transient(f"{type(exc).__name__}: {exc}") from None

        frame = with_retries(call, budget=self.budget, what=what)
        if frame is None or len(frame) == 0:
            return pl.DataFrame(schema=VINTAGE_SCHEMA)
        try:
            rows = pl.from_pandas(frame.reset_index(drop=True).astype({"value": "float64"}))
            return rows.select(
                pl.lit(series_id).alias("series_id"),
                pl.col("date").cast(pl.Date).alias("observation_date"),
                pl.col("value").fill_nan(None),
                pl.col("realtime_start").cast(pl.Date),
            )
        except (pl.exceptions.PolarsError, KeyError, TypeError, ValueError) as exc:
            raise VendorPayloadError(f"{what}: observations do not read as (date, realtime_start, value): {exc}") from None
