"""Local HTTP servers that answer in the vendors' documented wire formats.

The real client code (``massive``, ``fredapi``, ``yfinance``, requests) talks to them over
TCP; nothing in the code under test is patched (yfinance, whose hosts are fixed, is handed a
session whose transport reroutes every host to the stub). Each stub serves data it was given, pages it the way
the vendor does, and can be told to misbehave: a scripted list of faults is served first
(429 with Retry-After, 5xx, a stall longer than the client's timeout, a malformed body).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse, urlsplit, urlunsplit

import polars as pl
from requests import PreparedRequest, Response
from requests.adapters import HTTPAdapter

from resources.external.yahoo import YahooFinanceResource, YahooSession


@dataclass
class Request:
    path: str
    query: dict[str, str]
    headers: dict[str, str]


@dataclass
class Reply:
    status: int = 200
    body: Any = b""  # bytes, str, or anything JSON-serialisable
    headers: dict[str, str] = field(default_factory=dict)
    delay_s: float = 0.0

    def payload(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        return json.dumps(self.body).encode()


def too_many_requests() -> Reply:
    return Reply(429, {"status": "ERROR", "error": "too many requests"}, {"Retry-After": "0"})


def server_error() -> Reply:
    return Reply(503, "<html>Service Unavailable</html>")


def stall(seconds: float) -> Reply:
    return Reply(200, b"{}", delay_s=seconds)


class StubServer:
    """A threaded HTTP server on 127.0.0.1 around ``app(request) -> Reply``.

    ``faults`` are answered first, one per request, matching ``fault_paths`` if given.
    ``requests`` records every request in order.
    """

    def __init__(self, app: Callable[[Request], Reply]) -> None:
        self.app = app
        self.faults: list[Reply] = []
        self.fault_when: Callable[[Request], bool] = lambda request: True
        self.requests: list[Request] = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                parsed = urlparse(self.path)
                request = Request(
                    unquote(parsed.path),
                    {k: v[-1] for k, v in parse_qs(parsed.query, keep_blank_values=True).items()},
                    dict(self.headers.items()),
                )
                stub.requests.append(request)
                reply = stub.faults.pop(0) if stub.faults and stub.fault_when(request) else stub.app(request)
                if reply.delay_s:
                    time.sleep(reply.delay_s)
                body = reply.payload()
                try:
                    self.send_response(reply.status)
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (a timeout test)
                    pass

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> StubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def _ns(ts: pl.Series) -> list[int]:
    return (ts.dt.epoch("ns")).to_list()


def _in_window(frame: pl.DataFrame | None, request: Request) -> pl.DataFrame:
    """Rows of ``frame`` in the request's ``timestamp.gte`` / ``timestamp.lt`` window (ns),
    with ``row``: each row's position in the whole frame (its ids derive from it)."""
    if frame is None:
        return pl.DataFrame(schema={"row": pl.UInt32, "ts": pl.Datetime("ms", "UTC"), "bid": pl.Float64, "ask": pl.Float64,
                                    "price": pl.Float64, "size": pl.Float64})
    ns = frame["ts"].dt.epoch("ns")
    low, high = int(request.query.get("timestamp.gte", 0)), int(request.query.get("timestamp.lt", 2**63 - 1))
    return frame.with_row_index("row").filter((ns >= low) & (ns < high))


CRYPTO_EXCHANGES = (1, 2, 6, 23)  # Polygon's ids of Coinbase, Bitfinex, Bitstamp, Kraken
TRADE_ID_BASE = 512_000_000


def stub_sequence_number(row: int) -> int:
    """Increasing and unique per ticker, not always consecutive (Polygon's wording)."""
    return 1_000 + row + row // 7


def stub_trade_id(row: int) -> tuple[int, str]:
    """(exchange, id) of the stub's ``row``-th trade: ids count up per exchange, so the same
    id occurs on every exchange, as real venues' ids do."""
    return CRYPTO_EXCHANGES[row % len(CRYPTO_EXCHANGES)], str(TRADE_ID_BASE + row // len(CRYPTO_EXCHANGES))


class PolygonStub:
    """``/v3/quotes/{ticker}``, ``/v3/trades/{ticker}``, ``/v2/aggs/ticker/{ticker}/range/1/minute/{from}/{to}``.

    Rows come from ``ticks``/``bars`` per Polygon ticker; pages of ``limit`` rows chain by
    ``next_url`` with an opaque cursor, as the API does. A wrong key gets Polygon's 401.
    Forex quotes carry no id and crypto trades an ``exchange`` and its trade ``id``, as
    Polygon sends them; ``sequence_numbers`` adds the ``sequence_number`` its stock feeds
    carry. ``repeat_page = n`` serves the n-th page twice (its ``next_url`` points at itself
    once), as a flaky cursor would.
    """

    def __init__(self, api_key: str = "test-key") -> None:
        self.api_key = api_key
        self.quotes: dict[str, pl.DataFrame] = {}
        self.trades: dict[str, pl.DataFrame] = {}
        self.aggs: dict[str, pl.DataFrame] = {}
        self.rewrite_page: Callable[[int, dict], Any] | None = None  # (page number, body) -> body
        self.sequence_numbers = False
        self.repeat_page: int | None = None
        self.pages_served = 0

    def __call__(self, request: Request) -> Reply:
        if request.headers.get("Authorization") != f"Bearer {self.api_key}":
            return Reply(401, {"status": "ERROR", "request_id": "x", "error": "Unknown API Key"})
        parts = request.path.strip("/").split("/")
        limit = int(request.query.get("limit", 10))
        offset = int(request.query.get("cursor", 0))
        if parts[:2] == ["v3", "quotes"]:
            rows = self._quotes(parts[2], request)
        elif parts[:2] == ["v3", "trades"]:
            rows = self._trades(parts[2], request)
        elif parts[:3] == ["v2", "aggs", "ticker"]:
            rows = self._aggs(parts[3], int(parts[7]), int(parts[8]))
        else:
            return Reply(404, {"status": "NOT_FOUND", "message": "no such route"})
        page = rows[offset : offset + limit]
        body: dict[str, Any] = {"status": "OK", "request_id": f"req-{self.pages_served}"}
        if page:
            body["results"] = page
        following = offset + limit
        if self.repeat_page is not None and offset // limit + 1 == self.repeat_page:
            following, self.repeat_page = offset, None
        if following < len(rows):
            body["next_url"] = f"http://{request.headers['Host']}{request.path}?cursor={following}&limit={limit}&" + "&".join(
                f"{k}={v}" for k, v in request.query.items() if k not in ("cursor", "limit")
            )
        self.pages_served += 1
        if self.rewrite_page is not None:
            return Reply(200, self.rewrite_page(self.pages_served, body))
        return Reply(200, body)

    def _quotes(self, ticker: str, request: Request) -> list[dict]:
        part = _in_window(self.quotes.get(ticker), request)
        rows = [
            {"ask_exchange": 48, "ask_price": a, "bid_exchange": 48, "bid_price": b, "participant_timestamp": t}
            for t, b, a in zip(_ns(part["ts"]), part["bid"].to_list(), part["ask"].to_list(), strict=True)
        ]
        if self.sequence_numbers:
            for row, position in zip(rows, part["row"].to_list(), strict=True):
                row["sequence_number"] = stub_sequence_number(position)
        return rows

    def _trades(self, ticker: str, request: Request) -> list[dict]:
        part = _in_window(self.trades.get(ticker), request)
        rows = []
        for position, t, p, s in zip(part["row"].to_list(), _ns(part["ts"]), part["price"].to_list(), part["size"].to_list(), strict=True):
            exchange, trade_id = stub_trade_id(position)
            row = {"conditions": [1], "exchange": exchange, "id": trade_id, "participant_timestamp": t, "price": p, "size": s}
            if self.sequence_numbers:
                row["sequence_number"] = stub_sequence_number(position)
            rows.append(row)
        return rows

    def _aggs(self, ticker: str, start_ms: int, end_ms: int) -> list[dict]:
        frame = self.aggs.get(ticker)
        if frame is None:
            return []
        ms = frame["ts"].dt.epoch("ms")
        part = frame.filter((ms >= start_ms) & (ms <= end_ms))  # Polygon's range is inclusive
        return [
            {"v": v, "vw": vw, "o": o, "c": c, "h": h, "l": lo, "t": t, "n": n}
            for t, o, h, lo, c, v, vw, n in zip(
                part["ts"].dt.epoch("ms").to_list(), *(part[k].to_list() for k in ("open", "high", "low", "close", "volume", "vwap", "tick_count")),
                strict=True,
            )
        ]


class DukascopyStub:
    """``index.php?path=chart/json3``: JSONP pages of rows from ``last_update`` on (inclusive),
    ``limit`` rows each; tick volumes sent in units, as the feed does."""

    def __init__(self) -> None:
        self.ticks: dict[str, pl.DataFrame] = {}  # by instrument name, e.g. "EUR/USD"
        self.minutes: dict[str, pl.DataFrame] = {}
        self.raw_body: Callable[[Request], str] | None = None

    def __call__(self, request: Request) -> Reply:
        q = request.query
        if q.get("path") != "chart/json3":
            return Reply(404, "not found")
        callback, cursor, limit = q["jsonp"], int(q["last_update"]), int(q.get("limit", 30_000))
        if self.raw_body is not None:
            return Reply(200, self.raw_body(request))
        if q["interval"] == "TICK":
            frame = self.ticks.get(q["instrument"])
            columns = ("bid", "ask", "bid_size", "ask_size")
            scale = (1.0, 1.0, 1e6, 1e6)
        else:
            frame = self.minutes.get(q["instrument"])
            columns = ("open", "high", "low", "close", "volume")
            scale = (1.0,) * 5
        rows: list[list[float]] = []
        if frame is not None:
            ms = frame["ts"].dt.epoch("ms")
            part = frame.filter(ms >= cursor).head(limit)
            stamps = part["ts"].dt.epoch("ms").to_list()
            values = [[v * s for v in part[c].fill_null(0).to_list()] for c, s in zip(columns, scale, strict=True)]
            rows = [[t, *row] for t, *row in zip(stamps, *values, strict=True)]
        return Reply(200, f"{callback}({json.dumps(rows)});")


def fred_xml(rows: list[tuple[str, str, str, str]]) -> str:
    """FRED's observations XML: (realtime_start, realtime_end, date, value) per row."""
    body = "".join(
        f'<observation realtime_start="{rs}" realtime_end="{re}" date="{d}" value="{v}"/>' for rs, re, d, v in rows
    )
    return (f'<?xml version="1.0" encoding="utf-8" ?><observations realtime_start="x" realtime_end="y" '
            f'observation_start="1776-07-04" observation_end="9999-12-31" units="lin" output_type="2" '
            f'file_type="xml" order_by="observation_date" sort_order="asc" count="{len(rows)}" offset="0" '
            f'limit="100000">{body}</observations>')


class FredStub:
    """``/fred/series/observations``: the vintages of a series that overlap the requested
    real-time window, in FRED's XML, each real-time period clipped to the window as ALFRED
    does; FRED's XML errors for a bad series or a rate limit."""

    def __init__(self, api_key: str = "fred-key") -> None:
        self.api_key = api_key
        self.vintages: dict[str, list[tuple[str, str, str, float]]] = {}  # series -> (realtime_start, realtime_end, date, value)

    def __call__(self, request: Request) -> Reply:
        q = request.query
        if q.get("api_key") != self.api_key:
            return Reply(400, '<?xml version="1.0" encoding="utf-8" ?><error code="400" message="Bad Request.  The value for variable api_key is not registered."/>')
        series = q.get("series_id", "")
        if series not in self.vintages:
            return Reply(400, '<?xml version="1.0" encoding="utf-8" ?><error code="400" message="Bad Request.  The series does not exist."/>')
        start, end = q.get("realtime_start", "1776-07-04"), q.get("realtime_end", "9999-12-31")
        rows = [(max(rs, start), min(re, end), d, f"{v}") for rs, re, d, v in self.vintages[series] if rs <= end and re >= start]
        return Reply(200, fred_xml(rows))


def fred_rate_limited() -> Reply:
    return Reply(429, '<?xml version="1.0" encoding="utf-8" ?><error code="429" message="Too Many Requests.  Exceeded Rate Limit"/>')


YAHOO_COOKIE = "A3"
YAHOO_COOKIE_VALUE = "d=AQABBLi5mGYCEKn3xKpoVIDkPNYzH1Hq4zoFEgEBAQHsmWaiZtwQ0iMA_eMAAA&S=AQAAAhN9yDy0gnRPMWqUXXv2Ui8"
YAHOO_CRUMB = "tq0X1Zr7u.b"  # Yahoo's crumbs are 11 characters of [A-Za-z0-9./]


def _yahoo_set_cookie() -> str:
    """Yahoo's A3 cookie: a year's life, on every Yahoo host, HTTPS only."""
    expires = formatdate(time.time() + 31_557_600, usegmt=True)
    return (f"{YAHOO_COOKIE}={YAHOO_COOKIE_VALUE}; Expires={expires}; Max-Age=31557600; "
            "Domain=.yahoo.com; Path=/; SameSite=None; Secure; HttpOnly")


def _has_yahoo_cookie(request: Request) -> bool:
    return f"{YAHOO_COOKIE}={YAHOO_COOKIE_VALUE}" in request.headers.get("Cookie", "")


class YahooStub:
    """Yahoo Finance as yfinance 1.7 meets it, every host on one server, routed by the Host
    header (which :class:`RerouteAdapter` keeps):

    - ``fc.yahoo.com``: a 404 page that sets the ``A3`` cookie on ``.yahoo.com`` (how Yahoo
      hands out its cookie);
    - ``query1``/``query2.finance.yahoo.com/v1/test/getcrumb``: the crumb as text/plain, to a
      request carrying the cookie (401 otherwise);
    - ``query2.finance.yahoo.com/v8/finance/chart/{ticker}``: daily bars in the chart JSON
      (``period1``/``period2``, or ``range=1d``: yfinance's time-zone lookup); without the
      cookie, or with a wrong crumb, Yahoo's 401; an unknown ticker, Yahoo's 404 "No data
      found, symbol may be delisted"; a range without bars, a result without quotes;
    - ``guce.yahoo.com/consent``: yfinance's other cookie strategy, a page without a consent
      form (as outside the EU); ``/v10/finance/quoteSummary``: 404 (yfinance's last resort
      for a time zone).
    """

    def __init__(self) -> None:
        self.days: dict[str, list[tuple[datetime, float, float, float, float, float]]] = {}  # ticker -> (bar time, o, h, l, c, v)

    @staticmethod
    def is_range(request: Request) -> bool:
        """A chart request for a date range (not yfinance's time-zone lookup)."""
        return request.path.startswith("/v8/finance/chart/") and "period1" in request.query

    def __call__(self, request: Request) -> Reply:
        host = request.headers.get("Host", "").split(":")[0]
        if host == "fc.yahoo.com":
            return Reply(404, "<html><body>404 Not Found</body></html>", {"Set-Cookie": _yahoo_set_cookie(), "Content-Type": "text/html"})
        if host == "guce.yahoo.com":
            return Reply(200, "<html><body>Yahoo</body></html>", {"Content-Type": "text/html"})
        if not host.endswith("finance.yahoo.com"):
            return Reply(404, "<html>no such host</html>")
        if request.path == "/v1/test/getcrumb":
            if not _has_yahoo_cookie(request):
                return Reply(401, {"finance": {"result": None, "error": {"code": "Unauthorized", "description": "Invalid Cookie"}}})
            return Reply(200, YAHOO_CRUMB, {"Content-Type": "text/plain;charset=utf-8"})
        if request.path.startswith("/v10/finance/quoteSummary/"):
            symbol = request.path.rsplit("/", 1)[-1]
            return Reply(404, {"quoteSummary": {"result": None, "error": {"code": "Not Found", "description": f"Quote not found for symbol: {symbol}"}}})
        if request.path.startswith("/v8/finance/chart/"):
            return self._chart(request.path.rsplit("/", 1)[-1], request)
        return Reply(404, "<html>not found</html>")

    def _chart(self, ticker: str, request: Request) -> Reply:
        crumb = request.query.get("crumb")
        if not _has_yahoo_cookie(request) or (crumb is not None and crumb != YAHOO_CRUMB):
            reason = "Invalid Cookie" if not _has_yahoo_cookie(request) else "Invalid Crumb"
            return Reply(401, {"chart": {"result": None, "error": {"code": "Unauthorized", "description": reason}}})
        if ticker not in self.days:
            return Reply(404, {"chart": {"result": None, "error": {"code": "Not Found", "description": "No data found, symbol may be delisted"}}})
        rows = sorted(self.days[ticker])
        if "period1" in request.query:
            p1, p2 = int(request.query["period1"]), int(request.query["period2"])
            rows = [r for r in rows if p1 <= r[0].timestamp() < p2]
        else:
            rows = rows[-1:]
        meta = {
            "currency": "USD", "symbol": ticker, "exchangeName": "CMX", "fullExchangeName": "COMEX", "instrumentType": "FUTURE",
            "firstTradeDate": 967608000, "hasPrePostMarketData": False, "gmtoffset": -18000, "timezone": "EST",
            "exchangeTimezoneName": "America/New_York", "priceHint": 2, "dataGranularity": "1d",
            "range": request.query.get("range", ""),
            "validRanges": ["1d", "5d", "1mo", "3mo", "6mo", "1y", "2y", "5y", "10y", "ytd", "max"],
        }
        result: dict[str, Any] = {"meta": meta, "indicators": {"quote": [{}], "adjclose": [{}]}}
        if rows:
            result["timestamp"] = [int(r[0].timestamp()) for r in rows]
            result["indicators"] = {
                "quote": [{k: [r[i] for r in rows] for i, k in enumerate(("open", "high", "low", "close", "volume"), start=1)}],
                "adjclose": [{"adjclose": [r[4] for r in rows]}],
            }
        return Reply(200, {"chart": {"result": [result], "error": None}}, {"Content-Type": "application/json;charset=utf-8"})


class RerouteAdapter(HTTPAdapter):
    """A requests transport that sends every request, whatever its host, to one local stub
    server over plain HTTP, keeping the original host in the Host header (the stub routes by
    it, as a virtual-hosting server does). The session it is mounted on keeps cookies,
    redirects and URLs as if it had talked to the real hosts, so a client library handed the
    session (yfinance) runs its real requests unchanged in front of the stub."""

    def __init__(self, target_url: str) -> None:
        super().__init__(max_retries=0)
        self.target = urlsplit(target_url)

    def send(self, request: PreparedRequest, **kwargs: Any) -> Response:  # type: ignore[override]
        original = urlsplit(request.url or "")
        rerouted = request.copy()
        rerouted.url = urlunsplit((self.target.scheme, self.target.netloc, original.path or "/", original.query, ""))
        rerouted.headers["Host"] = original.netloc
        response = super().send(rerouted, **kwargs)
        response.url, response.request = request.url or "", request
        return response


class CalendarStub:
    """The weekly calendar JSON export: a list of events with ISO dates carrying offsets."""

    def __init__(self, events: list[dict] | None = None) -> None:
        self.events = events or []

    def __call__(self, request: Request) -> Reply:
        return Reply(200, self.events)


def yahoo_session(stub_url: str) -> YahooSession:
    """A budgeted requests session whose every Yahoo host is the stub: what a test (or a
    mirror user) hands yfinance."""
    session = YahooSession()
    session.mount("https://", RerouteAdapter(stub_url))
    session.mount("http://", RerouteAdapter(stub_url))
    return session


class StubYahooResource(YahooFinanceResource):
    """The Yahoo resource as configured in production, but handing yfinance a session to the
    stub at ``stub_url`` (the resource's documented extension point)."""

    stub_url: str

    def session(self) -> YahooSession:
        return yahoo_session(self.stub_url)
