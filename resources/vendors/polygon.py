"""Polygon (now Massive) REST: forex quotes, crypto trades and minute aggregates.

The official client (``massive``, the renamed ``polygon-api-client``) does the HTTP work:
pagination through ``next_url``, and retries on 429/5xx and timeouts through urllib3. This
module adds what the client lacks for unattended ingestion: symbol mapping, a JSON decoder
that refuses a malformed page instead of silently ending the pagination (the client logs and
stops on a ``ValueError``), urllib3 retries and timeouts held to the request's budget (the
client's own honour any Retry-After, however long, and retry a refused key), the vendor's
row ids as ``vendor_seq``, and the mapping of every failure onto the three vendor error kinds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import polars as pl
import urllib3
from massive import RESTClient
from massive.exceptions import BadResponse
from pydantic import Field
from urllib3.util.retry import Retry

from models.market.instruments import AssetClass, instrument
from models.market.ticks import TS
from resources.vendors.base import (
    VENDOR_M1_SCHEMA,
    BudgetSpent,
    MarketDataVendor,
    RetryBudget,
    VendorPayloadError,
    VendorRequestError,
    VendorUnavailableError,
    attempts_field,
    backoff_field,
    budget_field,
    budget_window,
    empty_m1,
    parse_retry_after,
    refused,
    start_request,
    time_left,
)

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_QUOTE_FIELDS = {"participant_timestamp": pl.Int64(), "bid_price": pl.Float64(), "ask_price": pl.Float64(),
                 "bid_size": pl.Float64(), "ask_size": pl.Float64(), "sequence_number": pl.Int64()}
_TRADE_FIELDS = {"participant_timestamp": pl.Int64(), "price": pl.Float64(), "size": pl.Float64(),
                 "sequence_number": pl.Int64(), "exchange": pl.Int64(), "id": pl.String()}
_RETRY_STATUSES = frozenset({413, 429, 499, 500, 502, 503, 504})  # the client's own list
_REFUSED_STATUSES = frozenset({401, 403})
_ID_BITS = 48  # a crypto trade id is unique per exchange: vendor_seq = exchange << 48 | id
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


class _BudgetRetry(Retry):
    """urllib3 retries held to the request's budget (see :mod:`resources.vendors.base`).

    One wait per retry, the backoff or the server's Retry-After if longer; a wait that would
    end past the budget gives up at once instead of sleeping (urllib3 alone would honour a
    Retry-After of an hour). A refused key (401/403) fails on the first answer, naming
    POLYGON_API_KEY, instead of falling through to the client's generic error.
    """

    budget = RetryBudget()

    def new(self, **kw: Any) -> _BudgetRetry:
        retry = super().new(**kw)
        retry.budget = self.budget
        return retry

    def is_retry(self, method: str, status_code: int, has_retry_after: bool = False) -> bool:
        return status_code in _REFUSED_STATUSES or super().is_retry(method, status_code, has_retry_after)

    def increment(self, method=None, url=None, response=None, error=None, _pool=None, _stacktrace=None) -> _BudgetRetry:  # type: ignore[override]
        if response is not None and response.status in _REFUSED_STATUSES:
            raise refused("Polygon", response.status, _error_text(response.data), key_env="POLYGON_API_KEY")
        attempt = len(self.history) + 1
        retry = super().increment(method, url, response, error, _pool, _stacktrace)  # MaxRetryError when tries are spent
        wait = self._wait(retry, response)
        left = time_left()
        if left is not None and wait >= left:
            last = error or f"HTTP {response.status if response is not None else '?'}"
            reason = BudgetSpent(
                f"{last}; gave up after {attempt} attempt{'s' if attempt > 1 else ''}, the next try would start after the "
                f"budget ({wait:.1f} s wait, {max(left, 0):.1f} s left; {self.budget.describe()})"
            )
            raise urllib3.exceptions.MaxRetryError(_pool, url, reason) from None  # type: ignore[arg-type]
        return retry

    def sleep(self, response=None) -> None:  # type: ignore[override]
        wait = self._wait(self, response)
        if wait > 0:
            time.sleep(wait)

    @staticmethod
    def _wait(retry: Retry, response: Any) -> float:
        retry_after = parse_retry_after(response.headers.get("Retry-After")) if response is not None else None
        return retry.budget.wait_before(max(len(retry.history), 1), retry_after)  # type: ignore[attr-defined]


class _BudgetTimeout(urllib3.Timeout):
    """Connect and read timeouts of one try, capped at what is left of the request's budget."""

    def clone(self) -> _BudgetTimeout:
        return _BudgetTimeout(connect=self._connect, read=self._read, total=self.total)

    @property
    def connect_timeout(self) -> Any:
        return _capped(super().connect_timeout)

    @property
    def read_timeout(self) -> Any:
        return _capped(super().read_timeout)


def _capped(timeout: Any) -> Any:
    left = time_left()
    if left is None or not isinstance(timeout, (int, float)):
        return timeout
    return max(min(timeout, left), 0.001)  # a spent budget times the try out at once


def _error_text(body: bytes) -> str:
    """Polygon's error JSON (``error`` or ``message``), or the body's start."""
    text = body.decode("utf-8", "replace")
    try:
        decoded = json.loads(text)
    except ValueError:
        return text[:200]
    if isinstance(decoded, dict):
        return str(decoded.get("error") or decoded.get("message") or decoded.get("status") or text[:200])
    return text[:200]


class PolygonResource(MarketDataVendor):
    """Polygon/Massive REST. ``api_key`` comes from ``EnvVar('POLYGON_API_KEY')``."""

    api_key: str = Field(description="Polygon/Massive API key (set POLYGON_API_KEY; never logged)")
    base_url: str = Field(default="https://api.massive.com", description="REST root; api.polygon.io works too")
    page_limit: int = Field(default=50_000, ge=1, le=50_000, description="rows per page (the API's maximum is 50,000)")
    attempts: int = attempts_field()
    retry_budget_s: float = budget_field()
    backoff_s: float = backoff_field(0.5)
    connect_timeout_s: float = Field(default=5.0, gt=0, description="connect timeout of one try (capped by the budget)")
    read_timeout_s: float = Field(default=20.0, gt=0, description="read timeout of one try (capped by the budget)")

    @property
    def source(self) -> str:
        return "polygon"

    @property
    def budget(self) -> RetryBudget:
        return RetryBudget(self.attempts, self.retry_budget_s, self.backoff_s)

    def _client(self) -> RESTClient:
        retry = _BudgetRetry(total=self.attempts - 1, status_forcelist=sorted(_RETRY_STATUSES), raise_on_status=True)
        retry.budget = self.budget
        return RESTClient(
            api_key=self.api_key,
            base=self.base_url.rstrip("/"),
            connect_timeout=self.connect_timeout_s,
            read_timeout=self.read_timeout_s,
            custom_json=_StrictJson,
            connection_pool_kw={
                "retries": retry,
                "timeout": _BudgetTimeout(connect=self.connect_timeout_s, read=self.read_timeout_s),
            },
        )

    def fetch_ticks(self, symbol: str, start: datetime, end: datetime) -> pl.DataFrame:
        """Forex/metal quotes (bid/ask) or crypto trades (price/size), ascending by time.

        ``vendor_seq`` (Int64) is the row's id at Polygon where it sends one: the
        ``sequence_number`` of a quote or trade, else a crypto trade's ``exchange`` and ``id``
        packed as ``exchange << 48 | id`` (an id is unique only on its exchange). Polygon's
        forex quotes carry neither: null.
        """
        client, ticker = self._client(), polygon_ticker(symbol)
        # integer nanoseconds: the client's own datetime conversion goes through a float and
        # moves a sub-second bound by up to a microsecond
        window = {"timestamp_gte": _ns(start), "timestamp_lt": _ns(end), "limit": self.page_limit, "sort": "timestamp", "order": "asc"}
        if instrument(symbol).asset_class is AssetClass.CRYPTO:
            rows = _columns(self._drain(client.list_trades(ticker, **window), ticker), _TRADE_FIELDS)
            packed = pl.col("exchange") * 2**_ID_BITS + pl.col("id").cast(pl.Int64, strict=False)
            fits = pl.col("exchange").is_between(0, 2 ** (63 - _ID_BITS) - 1) & pl.col("id").cast(pl.Int64, strict=False).is_between(0, 2**_ID_BITS - 1)
            seq = pl.coalesce(pl.col("sequence_number"), pl.when(fits).then(packed))
            renamed = rows.select(pl.col("price"), pl.col("size"), seq.alias("vendor_seq"))
        else:
            rows = _columns(self._drain(client.list_quotes(ticker, **window), ticker), _QUOTE_FIELDS)
            renamed = rows.select(
                pl.col("bid_price").alias("bid"), pl.col("ask_price").alias("ask"), pl.col("bid_size"), pl.col("ask_size"),
                pl.col("sequence_number").alias("vendor_seq"),
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
        """Every page of an iterator of model objects, with failures mapped to vendor errors.

        Each page is one request with its own budget: the budget restarts before every
        ``next`` (a page is fetched inside the ``next`` that finds the previous one spent)."""
        rows, seconds = [], self.retry_budget_s
        try:
            with budget_window(seconds):
                for item in _timed(results, seconds):
                    rows.append(vars(item))
            return rows
        except urllib3.exceptions.MaxRetryError as exc:
            reason = exc.reason if isinstance(exc.reason, BudgetSpent) else f"{exc.reason} (gave up after {self.attempts} attempts; {self.budget.describe()})"
            raise VendorUnavailableError(f"Polygon {ticker}: {reason}") from None
        except urllib3.exceptions.HTTPError as exc:
            raise VendorUnavailableError(f"Polygon {ticker}: {type(exc).__name__}: {exc}") from None
        except BadResponse as exc:
            raise VendorRequestError(f"Polygon {ticker}: {str(exc)[:200]}") from None
        except (TypeError, AttributeError) as exc:
            raise VendorPayloadError(f"Polygon {ticker}: unreadable result row ({exc})") from None


def _timed(results: Iterator[Any], seconds: float) -> Iterator[Any]:
    """``results`` with a fresh request budget started before each ``next``."""
    iterator = iter(results)
    while True:
        start_request(seconds)
        try:
            yield next(iterator)
        except StopIteration:
            return


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
