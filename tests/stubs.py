"""Local HTTP servers that answer in the vendors' documented wire formats.

The real client code (``massive``, ``fredapi``, requests) talks to them over TCP; nothing
in the code under test is patched. Each stub serves data it was given, pages it the way
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
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlparse

import polars as pl


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
    """Rows of ``frame`` in the request's ``timestamp.gte`` / ``timestamp.lt`` window (ns)."""
    if frame is None:
        return pl.DataFrame(schema={"ts": pl.Datetime("ms", "UTC"), "bid": pl.Float64, "ask": pl.Float64,
                                    "price": pl.Float64, "size": pl.Float64})
    ns = frame["ts"].dt.epoch("ns")
    low, high = int(request.query.get("timestamp.gte", 0)), int(request.query.get("timestamp.lt", 2**63 - 1))
    return frame.filter((ns >= low) & (ns < high))


class PolygonStub:
    """``/v3/quotes/{ticker}``, ``/v3/trades/{ticker}``, ``/v2/aggs/ticker/{ticker}/range/1/minute/{from}/{to}``.

    Rows come from ``ticks``/``bars`` per Polygon ticker; pages of ``limit`` rows chain by
    ``next_url`` with an opaque cursor, as the API does. A wrong key gets Polygon's 401.
    """

    def __init__(self, api_key: str = "test-key") -> None:
        self.api_key = api_key
        self.quotes: dict[str, pl.DataFrame] = {}
        self.trades: dict[str, pl.DataFrame] = {}
        self.aggs: dict[str, pl.DataFrame] = {}
        self.rewrite_page: Callable[[int, dict], Any] | None = None  # (page number, body) -> body
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
        if offset + limit < len(rows):
            body["next_url"] = f"http://{request.headers['Host']}{request.path}?cursor={offset + limit}&limit={limit}&" + "&".join(
                f"{k}={v}" for k, v in request.query.items() if k not in ("cursor", "limit")
            )
        self.pages_served += 1
        if self.rewrite_page is not None:
            return Reply(200, self.rewrite_page(self.pages_served, body))
        return Reply(200, body)

    def _quotes(self, ticker: str, request: Request) -> list[dict]:
        part = _in_window(self.quotes.get(ticker), request)
        return [
            {"ask_exchange": 48, "ask_price": a, "bid_exchange": 48, "bid_price": b, "participant_timestamp": t}
            for t, b, a in zip(_ns(part["ts"]), part["bid"].to_list(), part["ask"].to_list(), strict=True)
        ]

    def _trades(self, ticker: str, request: Request) -> list[dict]:
        part = _in_window(self.trades.get(ticker), request)
        return [
            {"conditions": [1], "exchange": 1, "id": str(i), "participant_timestamp": t, "price": p, "size": s}
            for i, (t, p, s) in enumerate(zip(_ns(part["ts"]), part["price"].to_list(), part["size"].to_list(), strict=True))
        ]

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


class YahooStub:
    """``/v8/finance/chart/{ticker}``: daily bars, timestamps at the exchange's session open."""

    def __init__(self) -> None:
        self.days: dict[str, list[tuple[datetime, float, float, float, float, float]]] = {}  # ticker -> (open time, o, h, l, c, v)

    def __call__(self, request: Request) -> Reply:
        ticker = request.path.rsplit("/", 1)[-1]
        if ticker not in self.days:
            return Reply(404, {"chart": {"result": None, "error": {"code": "Not Found", "description": "No data found, symbol may be delisted"}}})
        p1, p2 = int(request.query["period1"]), int(request.query["period2"])
        rows = [r for r in self.days[ticker] if p1 <= r[0].timestamp() < p2]
        quote = {k: [r[i] for r in rows] for i, k in enumerate(("open", "high", "low", "close", "volume"), start=1)}
        return Reply(200, {"chart": {"result": [{
            "meta": {"currency": "USD", "symbol": ticker, "exchangeTimezoneName": "America/New_York", "timezone": "EST"},
            "timestamp": [int(r[0].timestamp()) for r in rows],
            "indicators": {"quote": [quote]},
        }], "error": None}})


class CalendarStub:
    """The weekly calendar JSON export: a list of events with ISO dates carrying offsets."""

    def __init__(self, events: list[dict] | None = None) -> None:
        self.events = events or []

    def __call__(self, request: Request) -> Reply:
        return Reply(200, self.events)
