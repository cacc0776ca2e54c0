"""Polygon (now Massive) REST: forex quotes, crypto trades and minute aggregates.

The official client (``massive``, the renamed ``polygon-api-client``) does the HTTP work:
pagination through ``next_url``, and retries with backoff on 429/5xx and on timeouts
(urllib3 ``Retry``, honouring ``Retry-After``). This module adds what the client lacks for
unattended ingestion: symbol mapping, a JSON decoder that refuses a malformed page instead
of silently ending the pagination (the client logs and stops on a ``ValueError``), and the
mapping of every failure onto the three vendor error kinds.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import urllib3
from massive import RESTClient
from massive.exceptions import BadResponse
from pydantic import Field

from models.market.instruments import AssetClass, instrument
from models.market.ticks import TS
from resources.vendors.base import (
    VENDOR_M1_SCHEMA,
    MarketDataVendor,
    VendorPayloadError,
    VendorRequestError,
    VendorUnavailableError,
    empty_m1,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_QUOTE_FIELDS = {"participant_timestamp": pl.Int64(), "bid_price": pl.Float64(), "ask_price": pl.Float64(),
                 "bid_size": pl.Float64(), "ask_size": pl.Float64()}
_TRADE_FIELDS = {"participant_timestamp": pl.Int64(), "price": pl.Float64(), "size": pl.Float64()}
_AGG_FIELDS = {"timestamp": pl.Int64(), "open": pl.Float64(), "high": pl.Float64(), "low": pl.Float64(),
               "close": pl.Float64(), "volume": pl.Float64(), "vwap": pl.Float64(), "transactions": pl.Int64()}


def polygon_ticker(symbol: str) -> str:
    """``EURUSD`` -> ``C:EURUSD`` (forex and metals), ``BTCUSD`` -> ``X:BTCUSD`` (crypto)."""
    spec = instrument(symbol)
    return f"{'X' if spec.asset_class is AssetClass.CRYPTO else 'C'}:{spec.symbol}"


def symbol_from_polygon(ticker: str) -> str:
    """``C:EURUSD`` / ``X:BTCUSD`` -> the symbol as stored (validated)."""
    prefix, _, name = ticker.partition(":")
    if prefix not in ("C", "X") or not name:
        raise ValueError(f"not a Polygon forex/crypto ticker: {ticker!r}")
    return instrument(name).symbol


class _StrictJson:
    """``json`` for the client: a body that is not JSON, or an error status, raises a vendor
    error the client cannot swallow (it catches ``ValueError`` and stops paginating)."""

    @staticmethod
    def loads(text: str) -> Any:
        try:
            decoded = json.loads(text)
        except ValueError as exc:
            raise VendorPayloadError(f"Polygon sent a body that is not JSON ({exc}): {text[:120]!r}") from None
        if not isinstance(decoded, dict):
            raise VendorPayloadError(f"Polygon sent JSON that is not an object: {text[:120]!r}")
        if decoded.get("status") == "ERROR":
            raise VendorRequestError(f"Polygon refused the request: {decoded.get('error') or decoded.get('message')}")
        results = decoded.get("results")
        if results is not None and not (isinstance(results, list) and all(isinstance(r, dict) for r in results)):
            raise VendorPayloadError(f"Polygon 'results' is not a list of objects: {str(results)[:120]}")
        return decoded


class PolygonResource(MarketDataVendor):
    """Polygon/Massive REST. ``api_key`` comes from ``EnvVar('POLYGON_API_KEY')``."""

    api_key: str = Field(description="Polygon/Massive API key (set POLYGON_API_KEY; never logged)")
    base_url: str = Field(default="https://api.massive.com", description="REST root; api.polygon.io works too")
    page_limit: int = Field(default=50_000, ge=1, le=50_000, description="rows per page (the API's maximum is 50,000)")
    retries: int = Field(default=5, ge=0, description="client retries on 429/5xx/timeouts, with backoff")
    connect_timeout_s: float = Field(default=10.0, gt=0)
    read_timeout_s: float = Field(default=30.0, gt=0)

    @property
    def source(self) -> str:
        return "polygon"

    def _client(self) -> RESTClient:
        return RESTClient(
            api_key=self.api_key,
            base=self.base_url.rstrip("/"),
            retries=self.retries,
            connect_timeout=self.connect_timeout_s,
            read_timeout=self.read_timeout_s,
            custom_json=_StrictJson,
        )

    def fetch_ticks(self, symbol: str, start: datetime, end: datetime) -> pl.DataFrame:
        """Forex/metal quotes (bid/ask) or crypto trades (price/size), ascending by time."""
        client, ticker = self._client(), polygon_ticker(symbol)
        # integer nanoseconds: the client's own datetime conversion goes through a float and
        # moves a sub-second bound by up to a microsecond
        window = {"timestamp_gte": _ns(start), "timestamp_lt": _ns(end), "limit": self.page_limit, "sort": "timestamp", "order": "asc"}
        if instrument(symbol).asset_class is AssetClass.CRYPTO:
            rows = _columns(self._drain(client.list_trades(ticker, **window), ticker), _TRADE_FIELDS)
            renamed = rows.select(pl.col("price"), pl.col("size"))
        else:
            rows = _columns(self._drain(client.list_quotes(ticker, **window), ticker), _QUOTE_FIELDS)
            renamed = rows.select(
                pl.col("bid_price").alias("bid"), pl.col("ask_price").alias("ask"), pl.col("bid_size"), pl.col("ask_size")
            )
        ts = pl.from_epoch(rows["participant_timestamp"], time_unit="ns").dt.replace_time_zone("UTC").cast(TS)
        return renamed.with_columns(ts.alias("ts"), pl.lit(symbol).alias("symbol"), pl.lit(self.source).alias("source"))

    def fetch_m1_bars(self, symbol: str, start: datetime, end: datetime) -> pl.DataFrame:
        """Minute aggregates; Polygon's window is inclusive, so the end minute is dropped here."""
        client, ticker = self._client(), polygon_ticker(symbol)
        aggs = client.list_aggs(ticker, 1, "minute", _ns(start) // 1_000_000, _ns(end) // 1_000_000, adjusted=True, sort="asc", limit=self.page_limit)
        rows = _columns(self._drain(aggs, ticker), _AGG_FIELDS)
        if rows.is_empty():
            return empty_m1()
        ts = pl.from_epoch(rows["timestamp"], time_unit="ms").dt.replace_time_zone("UTC").cast(TS)
        frame = rows.with_columns(ts.alias("ts"), pl.col("transactions").fill_null(1).alias("tick_count"))
        return frame.select(list(VENDOR_M1_SCHEMA)).cast(VENDOR_M1_SCHEMA).filter((pl.col("ts") >= start) & (pl.col("ts") < end))  # type: ignore[arg-type]

    def _drain(self, results: Iterator[Any], ticker: str) -> list[dict[str, Any]]:
        """Every page of an iterator of model objects, with failures mapped to vendor errors."""
        try:
            return [vars(item) for item in results]
        except (urllib3.exceptions.MaxRetryError, urllib3.exceptions.HTTPError) as exc:
            raise VendorUnavailableError(f"Polygon {ticker}: {type(exc).__name__}: {exc}") from None
        except BadResponse as exc:
            raise VendorRequestError(f"Polygon {ticker}: {str(exc)[:200]}") from None
        except (TypeError, AttributeError) as exc:
            raise VendorPayloadError(f"Polygon {ticker}: unreadable result row ({exc})") from None


def _ns(moment: datetime) -> int:
    """Exact nanoseconds since the epoch (no float on the way)."""
    return (moment - _EPOCH) // timedelta(microseconds=1) * 1_000


def _columns(rows: list[dict[str, Any]], fields: dict[str, pl.DataType]) -> pl.DataFrame:
    """Rows of the client's model objects as typed columns; a field of the wrong type is a
    payload error, a missing one is null (the row is then quarantined downstream)."""
    try:
        return pl.from_dicts(rows, schema=fields, strict=False) if rows else pl.DataFrame(schema=fields)
    except (pl.exceptions.PolarsError, TypeError) as exc:
        raise VendorPayloadError(f"Polygon rows do not fit {list(fields)}: {exc}") from None
