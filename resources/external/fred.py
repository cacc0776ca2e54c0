"""FRED / ALFRED through ``fredapi``: every vintage of a series, with its publication day.

``get_series_all_releases`` returns one row per (observation, vintage) with ALFRED's
``realtime_start``: the day that value became the published one. That is what makes a
point-in-time join possible: at time t only values whose vintage began by t are visible,
so a revision published later never reaches an earlier bar.

fredapi opens URLs without a timeout and turns HTTP errors into ``ValueError(message)``;
this resource bounds each call with a socket timeout and maps failures onto the vendor
error kinds (rate limits and server errors are transient; a bad key or series is not).
"""

from __future__ import annotations

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

from resources.vendors.base import Transient, VendorPayloadError, VendorRequestError, with_retries

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
_TRANSIENT_MESSAGES = ("rate limit", "too many requests", "internal server error", "service unavailable", "try again")


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
    attempts: int = Field(default=5, ge=1, description="tries per request on rate limits, 5xx and timeouts")
    backoff_s: float = Field(default=2.0, ge=0, description="first wait between tries; doubles (FRED allows 120 requests/min)")
    timeout_s: float = Field(default=30.0, gt=0)

    def vintages(self, series_id: str, realtime_start: date, realtime_end: date) -> pl.DataFrame:
        """Every (observation, vintage) of ``series_id`` whose vintage overlaps the window."""
        client = Fred(api_key=self.api_key)
        client.root_url = self.base_url.rstrip("/")
        what = f"FRED {series_id} {realtime_start}..{realtime_end}"

        def call():
            try:
                with _socket_timeout(self.timeout_s):
                    return client.get_series_all_releases(series_id, realtime_start.isoformat(), realtime_end.isoformat())
            except (urllib.error.URLError, TimeoutError, ConnectionError, ET.ParseError) as exc:
                raise Transient(f"{type(exc).__name__}: {exc}") from None  # a 5xx page is HTML: ParseError
            except ValueError as exc:
                message = str(exc)
                if any(m in message.lower() for m in _TRANSIENT_MESSAGES):
                    raise Transient(message) from None
                if "No data exists" in message:
                    return None
                if "could not convert" in message:
                    raise VendorPayloadError(f"{what}: a value is not a number: {message}") from None
                raise VendorRequestError(f"{what}: FRED refused: {message}") from None

        frame = with_retries(call, attempts=self.attempts, what=what, backoff_s=self.backoff_s)
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
