"""The one interface every market-data vendor implements, and the errors it may raise.

A vendor returns ticks (columns of :data:`models.market.ticks.TICK_SCHEMA`, optional ones may be
missing) and, where it has them, one-minute candles (:data:`VENDOR_M1_SCHEMA`). Rows may be
bad; validation and quarantine happen downstream, the same for every vendor. What a vendor
must not do is hide a failure: an error is raised as one of three kinds, which decide
whether Dagster retries.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from datetime import datetime
from typing import TypeVar

import polars as pl
import requests
from dagster import ConfigurableResource

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

    @property
    def max_fetch_days(self) -> int:
        """How many days one fetch may span in a range run: one for network vendors (a day of
        quotes is pages enough), more for local files."""
        return 1


T = TypeVar("T")


class Transient(Exception):
    """A request that may succeed when made again (timeout, connection reset, 429, 5xx):
    :func:`with_retries` tries again; other errors pass straight through."""


def http_get(url: str, *, timeout_s: float, params: dict | None = None, headers: dict | None = None) -> requests.Response:
    """GET for the vendors without a client of their own: network failures, timeouts, 429 and
    5xx raise :class:`Transient`; any other answer is returned for the caller to judge."""
    try:
        response = requests.get(url, params=params, timeout=timeout_s, headers=headers or {"User-Agent": "tradeforge"})
    except (requests.Timeout, requests.ConnectionError) as exc:
        raise Transient(f"{type(exc).__name__}: {exc}") from None
    if response.status_code == 429 or response.status_code >= 500:
        raise Transient(f"HTTP {response.status_code}")
    return response


def with_retries(
    call: Callable[[], T],
    *,
    attempts: int,
    what: str,
    transient: tuple[type[BaseException], ...] = (Transient,),
    backoff_s: float = 0.5,
    sleep: Callable[[float], None] | None = None,
) -> T:
    """Run ``call``; on a ``transient`` error wait (exponential backoff) and try again, up to
    ``attempts`` times, then raise :class:`VendorUnavailableError` naming ``what``.

    For clients without retries of their own; the Dagster RetryPolicy is the outer loop.
    """
    import time

    wait = sleep or time.sleep
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except transient as exc:
            if attempt == attempts:
                raise VendorUnavailableError(f"{what}: {type(exc).__name__}: {exc} (after {attempts} attempts)") from exc
            wait(backoff_s * 2 ** (attempt - 1))
    raise AssertionError("unreachable")
