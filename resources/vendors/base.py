"""The one interface every market-data vendor implements, and the errors it may raise.

A vendor returns ticks (columns of :data:`models.market.ticks.TICK_SCHEMA`, optional ones may be
missing) and, where it has them, one-minute candles (:data:`VENDOR_M1_SCHEMA`). Rows may be
bad; validation and quarantine happen downstream, the same for every vendor. What a vendor
must not do is hide a failure: an error is raised as one of three kinds, which decide
whether Dagster retries.
"""

from __future__ import annotations

import time
from abc import abstractmethod
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeVar

import polars as pl
import requests
from dagster import ConfigurableResource
from pydantic import Field

from models.market.ticks import TS


class VendorError(Exception):
    """Base of the vendor errors; never a ``ValueError`` (client libraries swallow those)."""


class VendorUnavailableError(VendorError):
    """Transient: network failure, timeout, rate limit or server error after the client's own
    retries. The asset's RetryPolicy runs the partition again later."""


class VendorPayloadError(VendorError):
    """The vendor answered with something that is not its documented format. A retry would
    read the same bytes: fail once, with the reason."""


class VendorRequestError(VendorError):
    """The vendor refused the request (bad key, unknown symbol, no entitlement): fix the
    configuration; retrying will not help."""


VENDOR_M1_SCHEMA: dict[str, pl.DataType] = {
    "ts": TS,
    "open": pl.Float64(),
    "high": pl.Float64(),
    "low": pl.Float64(),
    "close": pl.Float64(),
    "volume": pl.Float64(),
    "vwap": pl.Float64(),
    "tick_count": pl.UInt32(),
}
"""One-minute candles as a vendor sends them; ``ts`` is the minute's open."""


def empty_m1() -> pl.DataFrame:
    return pl.DataFrame(schema=VENDOR_M1_SCHEMA)


class MarketDataVendor(ConfigurableResource):
    """A source of ticks, and of one-minute candles where the vendor has them."""

    @property
    @abstractmethod
    def source(self) -> str:
        """The name stored in every row's ``source`` column (``polygon``, ``dukascopy``, ...)."""

    @abstractmethod
    def fetch_ticks(self, symbol: str, start: datetime, end: datetime) -> pl.DataFrame:
        """Ticks of ``symbol`` with ``start <= ts < end`` as the vendor sent them."""

    def fetch_m1_bars(self, symbol: str, start: datetime, end: datetime) -> pl.DataFrame | None:
        """One-minute candles opening in ``[start, end)``; ``None`` if the vendor has none."""
        return None

    def fetch_bars(self, symbol: str, start: datetime, end: datetime) -> pl.DataFrame | None:
        """Bars opening in ``[start, end)`` at the vendor's own timeframe (a ``timeframe``
        column, then :data:`VENDOR_M1_SCHEMA`'s); ``None`` if the vendor has none. Network
        vendors serve their one-minute candles; files serve whatever interval they hold."""
        bars = self.fetch_m1_bars(symbol, start, end)
        return None if bars is None else bars.with_columns(pl.lit("M1").alias("timeframe"))

    def serves_ticks(self, symbol: str) -> bool:
        """Whether this vendor has ticks of ``symbol`` at all (a bars-only file import has
        none: a day without ticks is then no gap)."""
        return True

    def fetch_days(self, symbol: str) -> int:
        """How many days one fetch may span in a range run: one for network vendors (a day of
        quotes is pages enough), more for local files."""
        return 1


# -- retry budgets ----------------------------------------------------------------------------
#
# One request to a vendor (a page, a series, a ticker's range) may be tried a few times, but
# within a bounded budget: at most ``attempts`` tries and ``seconds`` of wall-clock from its
# first try, every try's timeout, backoff wait and Retry-After included. A wait that would end
# past the budget is not waited: the request gives up at once with VendorUnavailableError (the
# asset's RetryPolicy may run the partition again later). The budget's deadline lives in a
# context variable, so the transports below it (requests, urllib3, urlopen, yfinance's session)
# cap each try's timeout at what is left without being handed it.

T = TypeVar("T")

_DEADLINE: ContextVar[float | None] = ContextVar("vendor_request_deadline", default=None)


@dataclass(frozen=True)
class RetryBudget:
    """How hard to try one request: ``attempts`` tries within ``seconds``; waits start at
    ``backoff_s`` and double, and a server's Retry-After is honoured when it fits."""

    attempts: int = 4
    seconds: float = 30.0
    backoff_s: float = 1.0

    def wait_before(self, attempt: int, retry_after: float | None = None) -> float:
        """The wait before try ``attempt + 1``: the backoff, or longer if the server asks."""
        return max(self.backoff_s * 2 ** (attempt - 1), retry_after or 0.0)

    def describe(self) -> str:
        return f"budget {self.attempts} attempts / {self.seconds:g} s"


def attempts_field(default: int = 4) -> Any:
    return Field(default=default, ge=1, description="tries per request on timeouts, 429 and 5xx (the first included)")


def budget_field(default: float = 30.0) -> Any:
    return Field(default=default, gt=0, description="seconds one request may take in all: tries, backoff waits and Retry-After")


def backoff_field(default: float = 1.0) -> Any:
    return Field(default=default, ge=0, description="first wait between tries; doubles each time")


class BudgetSpent(TimeoutError):
    """The request's budget has no time left for another try. A ``TimeoutError``, so client
    libraries that swallow transient network errors (yfinance) treat it as one."""


def time_left() -> float | None:
    """Seconds left of the current request's budget; ``None`` outside a budget."""
    deadline = _DEADLINE.get()
    return None if deadline is None else deadline - time.monotonic()


def attempt_timeout(limit_s: float | None) -> float | None:
    """The timeout of one try: ``limit_s``, or what is left of the budget if that is less."""
    left = time_left()
    if left is None:
        return limit_s
    if left <= 0:
        raise BudgetSpent("no time left in the retry budget")
    return left if limit_s is None else min(limit_s, left)


@contextmanager
def budget_window(seconds: float) -> Iterator[None]:
    """Run the body as one request of ``seconds`` at most (an enclosing, earlier deadline wins)."""
    deadline = time.monotonic() + seconds
    outer = _DEADLINE.get()
    token = _DEADLINE.set(deadline if outer is None else min(outer, deadline))
    try:
        yield
    finally:
        _DEADLINE.reset(token)


def start_request(seconds: float) -> None:
    """Start a new request's budget in this context (for loops where a ``with`` per item costs
    too much, e.g. a paginating iterator: set it before each ``next``); ``budget_window``
    around the loop restores the outer value."""
    _DEADLINE.set(time.monotonic() + seconds)


class Transient(Exception):
    """A request that may succeed when made again (timeout, connection reset, 429, 5xx):
    :func:`with_retries` tries again within the budget; other errors pass straight through.
    ``retry_after`` is the server's Retry-After in seconds, if it sent one."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After as seconds (a number of seconds or an HTTP date); ``None`` if absent or odd."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, (when - datetime.now(when.tzinfo)).total_seconds())


def refused(
    vendor: str, status: int, detail: str, *, key_env: str | None = None, setting: str | None = None, bad_key: bool = False
) -> VendorRequestError:
    """The error for an answer that retrying cannot change; a refused credential (401/403,
    or ``bad_key`` where the vendor says so otherwise) names the variable that holds it."""
    detail = " ".join(detail.split())[:200]
    if (status in (401, 403) or bad_key) and key_env:
        return VendorRequestError(f"{vendor} refused the API key (HTTP {status}: {detail}): check {key_env}")
    if status in (401, 403):
        where = f"check {setting} and any proxy in between" if setting else "check any proxy in between"
        return VendorRequestError(f"{vendor} refused access (HTTP {status}: {detail}); it needs no key: {where}")
    return VendorRequestError(f"{vendor} answered HTTP {status}: {detail}")


def http_get(url: str, *, timeout_s: float, params: dict | None = None, headers: dict | None = None) -> requests.Response:
    """GET for the vendors without a client of their own, each try's timeout capped by the
    budget: network failures, timeouts, 429 and 5xx raise :class:`Transient` (with the
    server's Retry-After); any other answer is returned for the caller to judge."""
    try:
        response = requests.get(url, params=params, timeout=attempt_timeout(timeout_s), headers=headers or {"User-Agent": "tradeforge"})
    except (requests.Timeout, requests.ConnectionError) as exc:
        raise Transient(f"{type(exc).__name__}: {exc}") from None
    if response.status_code == 429 or response.status_code >= 500:
        raise Transient(f"HTTP {response.status_code}", retry_after=parse_retry_after(response.headers.get("Retry-After")))
    return response


def with_retries(
    call: Callable[[], T],
    *,
    budget: RetryBudget,
    what: str,
    transient: tuple[type[BaseException], ...] = (Transient,),
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Run ``call`` as one request within ``budget``: on a ``transient`` error wait and try
    again while tries and time remain, then raise :class:`VendorUnavailableError` naming
    ``what``, the last error, the tries made and the time spent. ``call`` should take each
    try's timeout from :func:`attempt_timeout`.

    For clients without retries of their own; the Dagster RetryPolicy is the outer loop.
    """
    started = time.monotonic()
    with budget_window(budget.seconds):
        for attempt in range(1, budget.attempts + 1):
            try:
                return call()
            except BudgetSpent as exc:
                error, why = exc, "no time left"
            except transient as exc:
                error = exc
                wait = budget.wait_before(attempt, getattr(exc, "retry_after", None))
                left = budget.seconds - (time.monotonic() - started)
                if attempt == budget.attempts:
                    why = "no tries left"
                elif wait >= left:
                    why = f"the next try would start after the budget ({wait:.1f} s wait, {max(left, 0):.1f} s left)"
                else:
                    sleep(wait)
                    continue
            elapsed = time.monotonic() - started
            label = "" if isinstance(error, Transient) else f"{type(error).__name__}: "
            raise VendorUnavailableError(
                f"{what}: {label}{error} (gave up after {attempt} attempt{'s' if attempt > 1 else ''} "
                f"in {elapsed:.1f} s, {why}; {budget.describe()})"
            ) from None
    raise AssertionError("unreachable")
