"""Yahoo Finance daily prices of commodities and indices (gold, oil, the dollar index, ...),
read through ``yfinance``.

Yahoo has no official API: its chart endpoint lets a client through with a cookie
(``fc.yahoo.com``), a crumb (``/v1/test/getcrumb``) and a browser's TLS fingerprint, all of
which yfinance handles (its default session is curl_cffi impersonating Chrome). This module
drives yfinance's public ``Ticker.history``, one request per ticker for a whole range, and
adds what unattended ingestion needs:

- errors, not empty frames: yfinance's ``hide_exceptions`` is turned off while it runs, so a
  failure raises instead of returning an empty frame that would read as a holiday; each is
  mapped onto the vendor error kinds, by the HTTP status of yfinance's last answer where the
  exception does not say (a 503 page and a broken 200 both end as a JSON error in yfinance);
- a bounded retry budget: yfinance gives its cookie and crumb requests 30 s each and its
  time-zone lookup 10 s, and retries a refused request once with its other cookie strategy.
  The session it is handed caps every request's timeout at what is left of the budget, and
  the retries around it are ours (yfinance's own stay off). yfinance memoises answers for
  past ranges, an error page included, so the memo is cleared before each try;
- only completed days: a day is known at the next midnight at the exchange.

yfinance keeps state per process (one session, cookie and crumb; a cookie and time-zone cache
on disk, by default under the user's cache folder): the client hands it one session and
keeps it for all its tickers.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import date, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import polars as pl
import requests
import yfinance as yf
from curl_cffi import requests as curl_requests
from dagster import ConfigurableResource
from pydantic import Field, PrivateAttr
from yfinance.data import YfData
from yfinance.exceptions import YFDataException, YFException, YFPricesMissingError, YFRateLimitError, YFTzMissingError

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

DEFAULT_TICKERS = {
    "gold": "GC=F", "silver": "SI=F", "wti": "CL=F", "brent": "BZ=F", "natgas": "NG=F", "copper": "HG=F",
    "dxy": "DX-Y.NYB", "spx": "^GSPC", "vix": "^VIX",
}
DAILY_SCHEMA: dict[str, pl.DataType] = {
    "name": pl.String(), "ticker": pl.String(), "date": pl.Date(), "open": pl.Float64(), "high": pl.Float64(),
    "low": pl.Float64(), "close": pl.Float64(), "volume": pl.Float64(), "currency": pl.String(),
    "known_at": pl.Datetime("ms", "UTC"),
}
_YFINANCE_LOCK = threading.Lock()  # yfinance's settings and session are process-wide


class _Budgeted:
    """A requests-compatible session under the retry budget: each request's timeout is capped
    at what is left of the budget, and the last answer's status and Retry-After are kept
    (yfinance does not hand them on with its errors)."""

    last_status: int | None = None
    last_retry_after: float | None = None

    def request(self, method: str, url: str, *args: Any, **kwargs: Any) -> Any:
        limit = kwargs.get("timeout")
        capped = attempt_timeout(limit if isinstance(limit, (int, float)) else None)
        if capped is not None:
            kwargs["timeout"] = capped
        self.last_status, self.last_retry_after = None, None
        response = super().request(method, url, *args, **kwargs)  # type: ignore[misc]
        self.last_status = response.status_code
        self.last_retry_after = parse_retry_after(response.headers.get("Retry-After"))
        return response


class YahooSession(_Budgeted, requests.Session):
    """A plain requests session under the budget: mount an adapter on it to reach Yahoo
    through a mirror or a test stub, and hand it to the resource (``YahooFinanceResource.session``)."""


class BrowserSession(_Budgeted, curl_requests.Session):
    """yfinance's own transport, curl_cffi impersonating Chrome (the TLS fingerprint Yahoo's
    client checks expect), under the budget: the production session."""

    def __init__(self, proxy: str = "") -> None:
        super().__init__(impersonate="chrome")
        if proxy:
            self.proxies = {"http": proxy, "https": proxy}


@contextmanager
def _yfinance(session: Any) -> Iterator[None]:
    """yfinance set up for one try: errors raised, its own retries off, no stale memo."""
    with _YFINANCE_LOCK:
        saved = (yf.config.debug.hide_exceptions, yf.config.network.retries)
        yf.config.debug.hide_exceptions, yf.config.network.retries = False, 0
        YfData.cache_get.cache_clear()  # a memoised answer (even a 503 page) would stand in for the retry
        try:
            yield
        finally:
            yf.config.debug.hide_exceptions, yf.config.network.retries = saved


class YahooFinanceClient:
    """Daily bars of named tickers through yfinance, within a retry budget per ticker."""

    def __init__(
        self, tickers: dict[str, str], *, budget: RetryBudget = RetryBudget(), timeout_s: float = 10.0, session: Any = None
    ) -> None:
        self.tickers, self.budget, self.timeout_s = tickers, budget, timeout_s
        self.session = session if session is not None else BrowserSession()

    def daily(self, name: str, start: date, end: date) -> pl.DataFrame:
        """Completed trading days ``start <= date < end`` of ``tickers[name]``, one request
        for the range (a day either side: exchange days are not UTC days).

        A day is known at the next midnight in the exchange's time zone: after its close and
        settlement, never before.
        """
        ticker = self.tickers[name]
        what = f"Yahoo {ticker} {start}..{end}"
        history, meta = with_retries(
            lambda: self._history(ticker, start - timedelta(days=1), end + timedelta(days=1), what), budget=self.budget, what=what
        )
        return _frame(history, meta, name, ticker, start, end, what)

    def _history(self, ticker: str, first: date, last: date, what: str) -> tuple[Any, dict[str, Any]]:
        with _yfinance(self.session):
            try:
                handle = yf.Ticker(ticker, session=self.session)
                history = handle.history(
                    start=first.isoformat(), end=last.isoformat(), interval="1d", auto_adjust=False, actions=False, timeout=self.timeout_s
                )
                meta = handle.history_metadata  # read key by key: listing it fetches intraday trading periods
                return history, {k: meta.get(k) for k in ("currency", "exchangeTimezoneName")}
            except BudgetSpent:
                raise
            except YFPricesMissingError as exc:
                self._judge_status(what, exc)
                if exc.yahoo_reason:
                    raise VendorRequestError(f"{what}: Yahoo has no data: {exc.yahoo_reason}") from None
                if not handle.history_metadata.get("exchangeTimezoneName"):  # not even the chart's meta came back
                    raise VendorPayloadError(f"{what}: Yahoo's answer holds no chart result") from None
                return None, {}  # a range without bars
            except YFTzMissingError as exc:
                self._judge_status(what, exc)
                raise VendorRequestError(f"{what}: Yahoo knows no time zone for {ticker!r}: an unknown or delisted ticker") from None
            except YFRateLimitError as exc:
                raise Transient(f"HTTP 429: {exc}", retry_after=self.session.last_retry_after) from None
            except YFDataException as exc:  # "Yahoo! Finance is currently down"
                raise Transient(str(exc)) from None
            except (requests.RequestException, OSError, json.JSONDecodeError) as exc:  # curl_cffi's errors are OSErrors
                self._judge_status(what, exc)
                if isinstance(exc, json.JSONDecodeError):
                    raise VendorPayloadError(f"{what}: Yahoo's answer is not JSON ({exc.msg} at {exc.pos}): {exc.doc[:80]!r}") from None
                raise Transient(f"{type(exc).__name__}: {exc}") from None
            except (YFException, KeyError, IndexError, TypeError, ValueError) as exc:
                self._judge_status(what, exc)
                raise VendorPayloadError(f"{what}: not a chart answer ({type(exc).__name__}: {exc})") from None

    def _judge_status(self, what: str, exc: BaseException) -> None:
        """Raise by the status of yfinance's last answer when it was an error: 429/5xx are
        transient, a 404 is an unknown ticker, any other refusal is final."""
        status = getattr(self.session, "last_status", None)
        if status is None or status < 400:
            return
        if status == 429 or status >= 500:
            raise Transient(f"HTTP {status} ({type(exc).__name__}: {exc})", retry_after=self.session.last_retry_after)
        if status == 404:
            raise VendorRequestError(f"{what}: Yahoo knows no such ticker (HTTP 404); check YahooFinanceResource.tickers")
        raise refused("Yahoo", status, f"{type(exc).__name__}: {exc}", setting="YAHOO_PROXY")


def _frame(history: Any, meta: dict[str, Any], name: str, ticker: str, start: date, end: date, what: str) -> pl.DataFrame:
    """yfinance's frame (index: the exchange-local day) as typed rows with ``known_at``."""
    if history is None or len(history) == 0:
        return pl.DataFrame(schema=DAILY_SCHEMA)
    try:
        zone = ZoneInfo(str(meta.get("exchangeTimezoneName") or history.index.tz))
        raw = pl.from_pandas(history.reset_index()).select(
            pl.col("Date").dt.replace_time_zone(None).dt.date().alias("date"),
            *(pl.col(c).cast(pl.Float64).alias(c.lower()) for c in ("Open", "High", "Low", "Close", "Volume")),
        )
    except (KeyError, ValueError, TypeError, ZoneInfoNotFoundError, pl.exceptions.PolarsError) as exc:
        raise VendorPayloadError(f"{what}: yfinance's frame is not daily OHLCV ({type(exc).__name__}: {exc})") from None
    known = (pl.col("date").cast(pl.Datetime("ms")) + pl.duration(days=1)).dt.replace_time_zone(zone.key).dt.convert_time_zone("UTC")
    return raw.with_columns(known.alias("known_at")).filter(
        (pl.col("date") >= start) & (pl.col("date") < end) & pl.col("close").is_not_null()
    ).unique("date", keep="last").sort("date").select(
        pl.lit(name).alias("name"), pl.lit(ticker).alias("ticker"), "date", "open", "high", "low", "close", "volume",
        pl.lit(str(meta.get("currency") or "")).alias("currency"), pl.col("known_at").cast(pl.Datetime("ms", "UTC")),
    )


class YahooFinanceResource(ConfigurableResource):
    """Daily bars from Yahoo Finance through yfinance, one request per ticker and range.

    Production hands yfinance a curl_cffi session impersonating Chrome (through ``proxy``
    if set). To reach Yahoo another way (a mirror, a corporate proxy with its own CA, a test
    stub), subclass and override :meth:`session`, returning a :class:`YahooSession` with an
    adapter mounted (any requests or curl_cffi session works; these two keep the budget).
    """

    tickers: dict[str, str] = Field(default=DEFAULT_TICKERS, description="our name -> Yahoo ticker")
    attempts: int = attempts_field()
    retry_budget_s: float = budget_field()
    backoff_s: float = backoff_field(2.0)
    timeout_s: float = Field(default=10.0, gt=0, description="timeout of the chart request (every request capped by the budget)")
    proxy: str = Field(default="", description="HTTP(S) proxy for Yahoo, e.g. http://user:pass@proxy:3128 (YAHOO_PROXY)")
    _client: YahooFinanceClient | None = PrivateAttr(default=None)

    @property
    def budget(self) -> RetryBudget:
        return RetryBudget(self.attempts, self.retry_budget_s, self.backoff_s)

    def session(self) -> Any:
        """The HTTP session yfinance uses; override to hand it another."""
        return BrowserSession(self.proxy)

    def get_client(self) -> YahooFinanceClient:
        """One client (one session, so one cookie and crumb at Yahoo) for this resource's life."""
        if self._client is None:
            self._client = YahooFinanceClient(self.tickers, budget=self.budget, timeout_s=self.timeout_s, session=self.session())
        return self._client

    def daily(self, name: str, start: date, end: date) -> pl.DataFrame:
        """:meth:`YahooFinanceClient.daily` on this resource's client."""
        return self.get_client().daily(name, start, end)
