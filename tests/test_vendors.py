"""Vendor resources against local stub servers in each vendor's wire format.

The real client libraries do the HTTP: ``massive`` (Polygon) with its urllib3 retries and
pagination, ``fredapi``, ``yfinance`` (handed a session whose transport reaches the stub),
and requests for Dukascopy and the calendar feed. Retry budgets are measured against the
stubs with small budgets: tries counted, elapsed time bounded by the budget.
"""

from __future__ import annotations

import socket
import time
from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest

from models.market.synthetic import SyntheticMarketConfig, generate_ticks
from models.market.ticks import conform_ticks
from resources.external.calendar import EconomicCalendarResource
from resources.external.fred import FredResource
from resources.external.yahoo import YahooFinanceClient
from resources.vendors.base import RetryBudget, VendorPayloadError, VendorRequestError, VendorUnavailableError
from resources.vendors.dukascopy import DukascopyResource, dukascopy_instrument
from resources.vendors.files import FileImportResource, detect_layout
from resources.vendors.polygon import PolygonResource, polygon_ticker, symbol_from_polygon
from tests.stubs import (
    YAHOO_CRUMB,
    CalendarStub,
    DukascopyStub,
    FredStub,
    PolygonStub,
    Reply,
    Request,
    StubServer,
    YahooStub,
    fred_rate_limited,
    server_error,
    stall,
    stub_sequence_number,
    stub_trade_id,
    too_many_requests,
    yahoo_session,
)

DAY = date(2024, 3, 6)
START = datetime(2024, 3, 6, tzinfo=UTC)
END = START + timedelta(days=1)


def ticks(symbol: str, scale: float = 0.02) -> pl.DataFrame:
    return generate_ticks(symbol, DAY, SyntheticMarketConfig(3, scale))


# -- Polygon ----------------------------------------------------------------------------------


def test_symbols_map_to_polygon_tickers_and_back():
    assert [polygon_ticker(s) for s in ("EURUSD", "XAUUSD", "BTCUSD")] == ["C:EURUSD", "C:XAUUSD", "X:BTCUSD"]
    assert symbol_from_polygon("C:GBPJPY") == "GBPJPY" and symbol_from_polygon("X:ETHUSD") == "ETHUSD"
    with pytest.raises(ValueError):
        symbol_from_polygon("AAPL")


def test_polygon_quotes_page_through_429_and_5xx_to_the_exact_day():
    expected = ticks("EURUSD")
    app = PolygonStub()
    app.quotes["C:EURUSD"] = expected
    with StubServer(app) as stub:
        stub.faults = [too_many_requests(), server_error()]
        vendor = PolygonResource(api_key="test-key", base_url=stub.url, page_limit=500, backoff_s=0.05)
        got = conform_ticks(vendor.fetch_ticks("EURUSD", START, END))
    pages = -(-expected.height // 500)
    assert len(stub.requests) == pages + 2  # every page once, plus the two refused tries
    assert stub.requests[0].path == "/v3/quotes/C:EURUSD" and stub.requests[0].query["timestamp.gte"] == str(int(START.timestamp() * 1e9))
    assert got.height == expected.height
    assert got["ts"].equals(expected["ts"]) and got["bid"].equals(expected["bid"]) and got["ask"].equals(expected["ask"])
    assert set(got["source"]) == {"polygon"} and set(got["symbol"]) == {"EURUSD"}


def test_polygon_sub_second_windows_are_exact():
    """A gap window starts and ends on ticks' milliseconds: the first is in, the last is out."""
    expected = ticks("EURUSD")
    app = PolygonStub()
    app.quotes["C:EURUSD"] = expected
    first, last = expected["ts"][1000], expected["ts"][1400]
    with StubServer(app) as stub:
        got = PolygonResource(api_key="test-key", base_url=stub.url).fetch_ticks("EURUSD", first, last)
    assert got["ts"].min() == first and got["ts"].max() < last
    assert got.height == expected.filter((pl.col("ts") >= first) & (pl.col("ts") < last)).height


def test_polygon_crypto_comes_from_trades():
    trades = ticks("BTCUSD").with_columns(price=(pl.col("bid") + pl.col("ask")) / 2, size=pl.lit(0.01))
    app = PolygonStub()
    app.trades["X:BTCUSD"] = trades
    with StubServer(app) as stub:
        got = conform_ticks(PolygonResource(api_key="test-key", base_url=stub.url, page_limit=1000).fetch_ticks("BTCUSD", START, END))
    assert stub.requests[0].path == "/v3/trades/X:BTCUSD"
    assert got["price"].equals(trades["price"]) and got["bid"].null_count() == got.height == trades.height


def test_polygon_malformed_page_fails_instead_of_truncating():
    """The client logs and stops paginating on undecodable JSON; our decoder refuses it."""
    app = PolygonStub()
    app.quotes["C:EURUSD"] = ticks("EURUSD")
    with StubServer(app) as stub:
        app.rewrite_page = lambda n, body: '{"results": [{"bid_price": 1.1' if n == 3 else body
        vendor = PolygonResource(api_key="test-key", base_url=stub.url, page_limit=500)
        with pytest.raises(VendorPayloadError, match="not JSON"):
            vendor.fetch_ticks("EURUSD", START, END)
        app.rewrite_page = lambda n, body: {**body, "results": "oops"}
        with pytest.raises(VendorPayloadError, match="not a list"):
            vendor.fetch_ticks("EURUSD", START, END)


def test_polygon_partial_rows_arrive_as_nulls_for_the_quarantine():
    app = PolygonStub()
    app.quotes["C:EURUSD"] = ticks("EURUSD").head(10)

    def drop_bid(n: int, body: dict) -> dict:
        body["results"][3].pop("bid_price")
        return body

    app.rewrite_page = drop_bid
    with StubServer(app) as stub:
        got = conform_ticks(PolygonResource(api_key="test-key", base_url=stub.url).fetch_ticks("EURUSD", START, END))
    assert got.height == 10 and got["bid"].null_count() == 1  # kept, then quarantined as no_price downstream


def test_polygon_timeouts_bad_keys_and_empty_days():
    app = PolygonStub()
    app.quotes["C:EURUSD"] = ticks("EURUSD").head(10)
    with StubServer(app) as stub:
        stub.faults = [stall(1.5), stall(1.5)]
        slow = PolygonResource(api_key="test-key", base_url=stub.url, attempts=2, backoff_s=0, read_timeout_s=0.3)
        with pytest.raises(VendorUnavailableError, match="Polygon C:EURUSD"):
            slow.fetch_ticks("EURUSD", START, END)
        with pytest.raises(VendorRequestError, match="Unknown API Key"):
            PolygonResource(api_key="wrong", base_url=stub.url).fetch_ticks("EURUSD", START, END)
        empty = PolygonResource(api_key="test-key", base_url=stub.url).fetch_ticks("GBPUSD", START, END)
    assert empty.is_empty() and conform_ticks(empty).is_empty()


def test_polygon_minute_aggregates_are_half_open():
    minutes = pl.datetime_range(START, END, "1m", closed="both", time_unit="ms", time_zone="UTC", eager=True)
    bars = pl.DataFrame({"ts": minutes}).with_columns(
        open=pl.lit(1.1), high=pl.lit(1.2), low=pl.lit(1.0), close=pl.lit(1.15), volume=pl.lit(30.0), vwap=pl.lit(1.12),
        tick_count=pl.lit(30),
    )
    app = PolygonStub()
    app.aggs["C:EURUSD"] = bars
    with StubServer(app) as stub:
        got = PolygonResource(api_key="test-key", base_url=stub.url, page_limit=1000).fetch_m1_bars("EURUSD", START, END)
    assert got.height == 1440 and got["ts"].max() == END - timedelta(minutes=1)  # the inclusive end minute is dropped
    assert got["tick_count"].to_list()[:2] == [30, 30] and got["vwap"][0] == 1.12


def test_polygon_refused_keys_fail_at_once_naming_the_variable():
    app = PolygonStub()
    app.quotes["C:EURUSD"] = ticks("EURUSD").head(10)
    with StubServer(app) as stub:
        with pytest.raises(VendorRequestError, match=r"HTTP 401: Unknown API Key.*check POLYGON_API_KEY"):
            PolygonResource(api_key="wrong", base_url=stub.url).fetch_ticks("EURUSD", START, END)
        assert len(stub.requests) == 1
        stub.requests.clear()
        stub.faults = [Reply(403, {"status": "NOT_AUTHORIZED", "request_id": "x", "message": "You are not entitled to this data."})]
        with pytest.raises(VendorRequestError, match=r"HTTP 403: You are not entitled.*POLYGON_API_KEY"):
            PolygonResource(api_key="test-key", base_url=stub.url).fetch_ticks("EURUSD", START, END)
        assert len(stub.requests) == 1


def test_polygon_retries_stay_within_the_budget():
    app = PolygonStub()
    app.quotes["C:EURUSD"] = ticks("EURUSD").head(10)
    with StubServer(app) as stub:
        stub.faults = [server_error()] * 20
        with pytest.raises(VendorUnavailableError, match="503.*after 3 attempts"):
            PolygonResource(api_key="test-key", base_url=stub.url, attempts=3, backoff_s=0.05).fetch_ticks("EURUSD", START, END)
        assert len(stub.requests) == 3
        # a Retry-After longer than the budget ends the request at once (urllib3 alone would sleep it)
        stub.requests.clear()
        stub.faults = [Reply(429, {"status": "ERROR", "error": "too many requests"}, {"Retry-After": "600"})] * 20
        started = time.monotonic()
        with pytest.raises(VendorUnavailableError, match=r"after 1 attempt.*600.0 s wait"):
            PolygonResource(api_key="test-key", base_url=stub.url, retry_budget_s=2.0).fetch_ticks("EURUSD", START, END)
        assert len(stub.requests) == 1 and time.monotonic() - started < 2.0
        # a stalled server: each try's timeouts are capped by what is left of the budget
        stub.requests.clear()
        stub.faults = [stall(4.0)] * 20
        started = time.monotonic()
        with pytest.raises(VendorUnavailableError, match="gave up"):
            PolygonResource(api_key="test-key", base_url=stub.url, retry_budget_s=1.5, read_timeout_s=10, backoff_s=0.05).fetch_ticks(
                "EURUSD", START, END)
        assert time.monotonic() - started < 1.5 + 1.0 and 1 <= len(stub.requests) <= 4
        # the budget is per page: a slow day of many pages is not cut short
        stub.requests.clear()
        stub.faults = []
        got = PolygonResource(api_key="test-key", base_url=stub.url, retry_budget_s=1.0, page_limit=2).fetch_ticks("EURUSD", START, END)
        assert got.height == 10 and len(stub.requests) == 5


def test_polygon_row_ids_become_vendor_seq_and_a_repeated_page_repeats_them():
    trades = ticks("BTCUSD").head(1_000).with_columns(price=(pl.col("bid") + pl.col("ask")) / 2, size=pl.lit(0.01))
    trades = pl.concat([trades, trades.head(3)]).sort("ts")  # identical prints: same time, price and size
    app = PolygonStub()
    app.trades["X:BTCUSD"] = trades
    with StubServer(app) as stub:
        vendor = PolygonResource(api_key="test-key", base_url=stub.url, page_limit=100)
        got = vendor.fetch_ticks("BTCUSD", START, END)
        expected = [exchange * 2**48 + int(trade_id) for exchange, trade_id in map(stub_trade_id, range(trades.height))]
        assert got["vendor_seq"].dtype == pl.Int64 and got["vendor_seq"].to_list() == expected
        assert got["vendor_seq"].is_unique().all()  # the same id on four exchanges stays four trades
        assert got.select(pl.struct("ts", "price", "size").is_duplicated().sum()).item() == 6  # identical prints, distinct ids
        # the cursor serves page 3 twice: its 100 rows come back with the ids they had
        app.repeat_page = 3
        twice = vendor.fetch_ticks("BTCUSD", START, END)
        assert twice.height == trades.height + 100
        repeated = twice.filter(pl.col("vendor_seq").is_duplicated())
        assert repeated.height == 200 and set(repeated["vendor_seq"]) == set(expected[200:300])
        # where Polygon sends a sequence_number (its stock feeds), it is the id
        app.sequence_numbers = True
        assert vendor.fetch_ticks("BTCUSD", START, END)["vendor_seq"].to_list() == [stub_sequence_number(i) for i in range(trades.height)]
    quotes = PolygonStub()
    quotes.quotes["C:EURUSD"] = ticks("EURUSD").head(50)
    with StubServer(quotes) as stub:
        vendor = PolygonResource(api_key="test-key", base_url=stub.url, page_limit=20)
        assert vendor.fetch_ticks("EURUSD", START, END)["vendor_seq"].null_count() == 50  # forex quotes carry no id
        quotes.sequence_numbers, quotes.repeat_page = True, 2
        seq = vendor.fetch_ticks("EURUSD", START, END)["vendor_seq"]
        assert seq.len() == 70 and sorted(seq.filter(seq.is_duplicated()).unique().to_list()) == [stub_sequence_number(i) for i in range(20, 40)]


# -- Dukascopy --------------------------------------------------------------------------------


def test_dukascopy_pages_by_cursor_through_faults_to_the_exact_day():
    expected = ticks("EURUSD").with_columns(bid_size=pl.lit(1.5), ask_size=pl.lit(2.25))
    app = DukascopyStub()
    app.ticks["EUR/USD"] = expected
    with StubServer(app) as stub:
        stub.faults = [too_many_requests(), server_error()]
        vendor = DukascopyResource(base_url=stub.url + "/2.0/index.php", page_limit=700, backoff_s=0)
        got = conform_ticks(vendor.fetch_ticks("EURUSD", START, END))
    assert dukascopy_instrument("XAUUSD") == "XAU/USD" and stub.requests[0].query["instrument"] == "EUR/USD"
    assert got["ts"].equals(expected["ts"]) and got["bid"].equals(expected["bid"]) and got["ask"].equals(expected["ask"])
    assert got["bid_size"].unique().to_list() == [1.5] and set(got["source"]) == {"dukascopy"}


def test_dukascopy_malformed_timeouts_and_unknown_instruments():
    app = DukascopyStub()
    with StubServer(app) as stub:
        vendor = DukascopyResource(base_url=stub.url + "/2.0/index.php", backoff_s=0, attempts=2, timeout_s=0.3)
        assert vendor.fetch_ticks("EURUSD", START, END).is_empty()  # an empty day
        app.raw_body = lambda request: "<html>maintenance</html>"
        with pytest.raises(VendorPayloadError, match="not a JSONP reply"):
            vendor.fetch_ticks("EURUSD", START, END)
        app.raw_body = lambda request: f"{request.query['jsonp']}([[1709683200000, 1.1, \"x\", 1, 1]]);"
        with pytest.raises(VendorPayloadError, match="not a number"):
            vendor.fetch_ticks("EURUSD", START, END)
        app.raw_body = None
        stub.faults = [stall(1.0), stall(1.0)]
        with pytest.raises(VendorUnavailableError, match="after 2 attempts"):
            vendor.fetch_ticks("EURUSD", START, END)
    with pytest.raises(VendorRequestError, match="no instrument"):
        dukascopy_instrument("SEKNOK")


def test_dukascopy_identical_ticks_at_page_edges_are_each_kept_once():
    """No ids and a time cursor: a page repeats its first millisecond's rows that the page
    before delivered; exactly those are dropped, so bursts of identical ticks in one
    millisecond straddling page edges come through once each."""
    base = datetime(2024, 3, 6, 10, tzinfo=UTC)
    stamps, burst_sizes = [], (7, 20, 24, 3)
    for n, size in enumerate(burst_sizes):
        stamps += [base + timedelta(seconds=n, milliseconds=k) for k in range(16)]  # distinct milliseconds
        stamps += [base + timedelta(seconds=n, milliseconds=500)] * size  # one burst of identical ticks
    frame = pl.DataFrame({"ts": stamps}).with_columns(
        pl.col("ts").cast(pl.Datetime("ms", "UTC")),
        bid=pl.when(pl.col("ts").dt.millisecond() == 500).then(1.085).otherwise(1.08 + pl.int_range(pl.len()) * 1e-5),
        bid_size=pl.lit(1.0), ask_size=pl.lit(1.0),
    ).with_columns(ask=pl.col("bid") + 0.0001)
    app = DukascopyStub()
    app.ticks["EUR/USD"] = frame
    with StubServer(app) as stub:
        vendor = DukascopyResource(base_url=stub.url + "/2.0/index.php", page_limit=25, backoff_s=0)
        got = vendor.fetch_ticks("EURUSD", START, END)
        cursors = [int(r.query["last_update"]) for r in stub.requests]
        assert got.height == frame.height
        assert got.select("ts", "bid", "ask").equals(frame.select("ts", "bid", "ask"))
        bursts = got.filter(pl.col("ts").dt.millisecond() == 500).group_by(pl.col("ts").dt.second()).len().sort("ts")
        assert bursts["len"].to_list() == list(burst_sizes)
        # pages did start inside bursts (the case under test), and the walk was not slowed to a row a page
        burst_ms = {int(t.timestamp() * 1000) for t in stamps if t.microsecond == 500_000}
        assert burst_ms & set(cursors[1:]) and len(stub.requests) <= -(-frame.height // 10)
        # more identical ticks in one millisecond than a page holds cannot be paged past: an error, not a loss
        app.ticks["EUR/USD"] = pl.concat([frame.head(5), frame.filter(pl.col("ts").dt.millisecond() == 500).head(1).select(pl.all().repeat_by(30).explode())])
        with pytest.raises(VendorPayloadError, match="more than 25 rows in the millisecond"):
            vendor.fetch_ticks("EURUSD", START, END)


def test_dukascopy_retries_stay_within_the_budget():
    app = DukascopyStub()
    app.ticks["EUR/USD"] = ticks("EURUSD").head(10)
    with StubServer(app) as stub:
        stub.faults = [server_error()] * 20
        with pytest.raises(VendorUnavailableError, match="HTTP 503 .*after 3 attempts"):
            DukascopyResource(base_url=stub.url, attempts=3, backoff_s=0.05).fetch_ticks("EURUSD", START, END)
        assert len(stub.requests) == 3
        stub.requests.clear()
        stub.faults = [stall(4.0)] * 20
        started = time.monotonic()
        with pytest.raises(VendorUnavailableError, match="gave up"):
            DukascopyResource(base_url=stub.url, retry_budget_s=1.5, timeout_s=10, backoff_s=0.05).fetch_ticks("EURUSD", START, END)
        assert time.monotonic() - started < 1.5 + 1.0 and len(stub.requests) <= 4
        stub.requests.clear()
        stub.faults = [Reply(403, "<html>Forbidden</html>")]
        with pytest.raises(VendorRequestError, match="HTTP 403.*needs no key: check DUKASCOPY_URL"):
            DukascopyResource(base_url=stub.url).fetch_ticks("EURUSD", START, END)
        assert len(stub.requests) == 1


# -- Files ------------------------------------------------------------------------------------


def test_file_layouts_are_recognised_and_times_land_in_utc(tmp_path):
    folder = tmp_path / "EURUSD"
    folder.mkdir()
    (folder / "mt5.csv").write_text(
        "<DATE>\t<TIME>\t<BID>\t<ASK>\t<LAST>\t<VOLUME>\t<FLAGS>\n"
        "2024.03.06\t10:00:00.250\t1.08500\t1.08510\t\t\t6\n"
        "2024.03.06\t10:00:01.000\t1.08505\t1.08512\t\t\t6\n"
    )
    (folder / "histdata.csv").write_text("20240306 050002000,1.085100,1.085200,0\n")  # 05:00 EST = 10:00 UTC
    (folder / "jforex.csv").write_text("Gmt time,Ask,Bid,AskVolume,BidVolume\n06.03.2024 10:00:03.500,1.08530,1.08520,1.2,0.9\n")
    (folder / "minutes.csv").write_text("20240306 050500;1.0851;1.0860;1.0850;1.0855;0\n")
    assert [detect_layout(folder / f) for f in ("mt5.csv", "histdata.csv", "jforex.csv", "minutes.csv")] == [
        "mt5_ticks", "histdata_ticks", "dukascopy_ticks", "histdata_m1"]
    vendor = FileImportResource(directory=str(tmp_path))
    got = conform_ticks(vendor.fetch_ticks("EURUSD", START, END))
    assert got["ts"].dt.strftime("%H:%M:%S%.3f").to_list() == ["10:00:00.250", "10:00:01.000", "10:00:02.000", "10:00:03.500"]
    assert got["bid"].to_list() == [1.085, 1.08505, 1.0851, 1.0852] and got["ask_size"][-1] == 1.2
    bars = vendor.fetch_bars("EURUSD", START, END)
    assert bars["ts"].to_list() == [datetime(2024, 3, 6, 10, 5, tzinfo=UTC)] and bars["close"][0] == 1.0855
    assert bars["timeframe"].to_list() == ["M1"]  # HistData's M1 format says so
    assert vendor.fetch_ticks("EURUSD", END, END + timedelta(days=1)).is_empty()  # the window filters


def test_custom_column_mapping_and_unreadable_files(tmp_path):
    (tmp_path / "XAUUSD").mkdir()
    (tmp_path / "XAUUSD" / "export.csv").write_text("when;b;a\n1709719200000;2150.1;2150.4\n")
    custom = FileImportResource(directory=str(tmp_path), layout="custom", columns={"ts": "when", "bid": "b", "ask": "a"},
                                ts_format="epoch_ms", separator=";")
    got = conform_ticks(custom.fetch_ticks("XAUUSD", START, END))
    assert got["ts"].to_list() == [datetime(2024, 3, 6, 10, tzinfo=UTC)] and got["ask"][0] == 2150.4
    (tmp_path / "XAUUSD" / "export.csv").write_text("ts,bid,ask\nnot-a-time,1,2\n")
    with pytest.raises(VendorPayloadError, match="do not parse"):
        FileImportResource(directory=str(tmp_path)).fetch_ticks("XAUUSD", START, END)
    (tmp_path / "XAUUSD" / "export.csv").write_text("foo,bar\n1,2\n")
    with pytest.raises(VendorPayloadError, match="unknown file layout"):
        FileImportResource(directory=str(tmp_path)).fetch_ticks("XAUUSD", START, END)


# -- FRED, Yahoo, calendar --------------------------------------------------------------------


def test_fred_vintages_through_a_rate_limit_and_clear_refusals():
    app = FredStub()
    app.vintages["CPIAUCSL"] = [
        ("2024-02-13", "2024-03-11", "2024-01-01", 308.417),
        ("2024-03-12", "9999-12-31", "2024-01-01", 308.5),  # revised with the next release
        ("2024-03-12", "9999-12-31", "2024-02-01", 309.685),
    ]
    with StubServer(app) as stub:
        stub.faults = [fred_rate_limited()]
        fred = FredResource(api_key="fred-key", base_url=stub.url + "/fred", backoff_s=0)
        rows = fred.vintages("CPIAUCSL", date(2024, 3, 10), date(2024, 3, 16))
        assert len(stub.requests) == 2 and stub.requests[-1].query["realtime_start"] == "2024-03-10"
        with pytest.raises(VendorRequestError, match="series does not exist"):
            fred.vintages("NOPE", date(2024, 3, 10), date(2024, 3, 16))
        with pytest.raises(VendorRequestError, match="api_key"):
            FredResource(api_key="bad", base_url=stub.url + "/fred").vintages("CPIAUCSL", date(2024, 3, 10), date(2024, 3, 16))
        stub.faults = [stall(1.0), stall(1.0)]
        with pytest.raises(VendorUnavailableError, match="after 2 attempts"):
            FredResource(api_key="fred-key", base_url=stub.url + "/fred", attempts=2, backoff_s=0, timeout_s=0.3).vintages(
                "CPIAUCSL", date(2024, 3, 10), date(2024, 3, 16))
    assert rows.sort("realtime_start", "observation_date").rows() == [
        ("CPIAUCSL", date(2024, 1, 1), 308.417, date(2024, 3, 10)),  # ALFRED clips the period to the request
        ("CPIAUCSL", date(2024, 1, 1), 308.5, date(2024, 3, 12)),
        ("CPIAUCSL", date(2024, 2, 1), 309.685, date(2024, 3, 12)),
    ]


def test_fred_gives_up_within_the_budget_and_names_its_key():
    app = FredStub()
    app.vintages["DFF"] = [("2024-03-01", "9999-12-31", "2024-02-29", 5.33)]
    window = (date(2024, 3, 3), date(2024, 3, 9))
    with StubServer(app) as stub:
        url = stub.url + "/fred"
        # a dead endpoint (nothing listens): refused connections, retried within the budget
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            dead = f"http://127.0.0.1:{probe.getsockname()[1]}/fred"
        started = time.monotonic()
        with pytest.raises(VendorUnavailableError, match="URLError.*after 3 attempts"):
            FredResource(api_key="fred-key", base_url=dead, attempts=3, backoff_s=0.05).vintages("DFF", *window)
        assert time.monotonic() - started < 2.0
        # server errors until the tries run out, then the rate limit's Retry-After past the budget
        stub.faults = [server_error()] * 20
        with pytest.raises(VendorUnavailableError, match="HTTP 503.*after 3 attempts"):
            FredResource(api_key="fred-key", base_url=url, attempts=3, backoff_s=0.05).vintages("DFF", *window)
        assert len(stub.requests) == 3
        stub.requests.clear()
        stub.faults = [Reply(429, fred_rate_limited().body, {"Retry-After": "60"})] * 20
        with pytest.raises(VendorUnavailableError, match=r"Exceeded Rate Limit.*after 1 attempt.*60.0 s wait"):
            FredResource(api_key="fred-key", base_url=url, retry_budget_s=5.0).vintages("DFF", *window)
        assert len(stub.requests) == 1
        # a stalled endpoint: every try's socket timeout is capped by the budget
        stub.requests.clear()
        stub.faults = [stall(4.0)] * 20
        started = time.monotonic()
        with pytest.raises(VendorUnavailableError, match="gave up"):
            FredResource(api_key="fred-key", base_url=url, retry_budget_s=1.5, timeout_s=10, backoff_s=0.05).vintages("DFF", *window)
        assert time.monotonic() - started < 1.5 + 1.0 and len(stub.requests) <= 4
        # 401/403 (a proxy's page, not FRED's XML) and FRED's own "api_key" 400: at once, naming the variable
        for fault in (Reply(401, "<html>Unauthorized</html>"), Reply(403, "<html>Forbidden</html>"), None):
            stub.requests.clear()
            stub.faults = [fault] if fault else []
            with pytest.raises(VendorRequestError, match="refused the API key.*check FRED_API_KEY"):
                FredResource(api_key="fred-key" if fault else "bad", base_url=url).vintages("DFF", *window)
            assert len(stub.requests) == 1
        stub.faults = [Reply(200, "<observations><observation")]
        with pytest.raises(VendorPayloadError, match="not FRED's XML"):
            FredResource(api_key="fred-key", base_url=url).vintages("DFF", *window)
        assert FredResource(api_key="fred-key", base_url=url).vintages("DFF", *window)["value"].to_list() == [5.33]


GOLD_DAYS = [
    (datetime(2024, 3, 5, 5, tzinfo=UTC), 2120.0, 2140.0, 2110.0, 2130.0, 1e5),  # 00:00 New York
    (datetime(2024, 3, 6, 5, tzinfo=UTC), 2130.0, 2160.0, 2125.0, 2150.0, 1.2e5),
]


def yahoo_client(stub: StubServer, **budget: float) -> YahooFinanceClient:
    """yfinance, unpatched, handed a session whose transport reaches the stub."""
    return YahooFinanceClient({"gold": "GC=F", "nope": "NOPE"}, budget=RetryBudget(**{"attempts": 3, "seconds": 5.0, "backoff_s": 0.05, **budget}),
                              session=yahoo_session(stub.url))


def range_requests(stub: StubServer) -> list[Request]:
    return [r for r in stub.requests if YahooStub.is_range(r)]


def test_yahoo_daily_closes_through_yfinance_are_known_after_the_day_ends():
    app = YahooStub()
    app.days["GC=F"] = GOLD_DAYS
    with StubServer(app) as stub:
        stub.fault_when = YahooStub.is_range  # faults hit the range request, not yfinance's time-zone lookup
        stub.faults = [server_error()]
        rows = yahoo_client(stub).daily("gold", date(2024, 3, 5), date(2024, 3, 7))
    chart = range_requests(stub)
    # yfinance's own second try (its other cookie strategy) got through the 503: one range, asked twice
    assert len(chart) == 2 and chart[-1].headers["Host"] == "query2.finance.yahoo.com" and chart[-1].path == "/v8/finance/chart/GC=F"
    # the stub answers the chart only with Yahoo's cookie and crumb, which yfinance fetched itself
    assert chart[-1].query["crumb"] == YAHOO_CRUMB and "A3=" in chart[-1].headers["Cookie"]
    assert chart[-1].query["interval"] == "1d" and int(chart[-1].query["period1"]) < int(datetime(2024, 3, 5, 5, tzinfo=UTC).timestamp())
    assert rows["date"].to_list() == [date(2024, 3, 5), date(2024, 3, 6)] and rows["close"].to_list() == [2130.0, 2150.0]
    assert rows["open"].to_list() == [2120.0, 2130.0] and rows["volume"].to_list() == [1e5, 1.2e5] and set(rows["currency"]) == {"USD"}
    # midnight New York (EST, UTC-5) after the trading day
    assert rows["known_at"].to_list() == [datetime(2024, 3, 6, 5, tzinfo=UTC), datetime(2024, 3, 7, 5, tzinfo=UTC)]


def test_yahoo_failures_are_vendor_errors_within_the_budget():
    app = YahooStub()
    app.days["GC=F"] = GOLD_DAYS
    with StubServer(app) as stub:
        stub.fault_when = YahooStub.is_range
        client = yahoo_client(stub)
        # 5xx until the tries run out: ours (3), each with yfinance's one retry inside
        stub.faults = [server_error()] * 20
        with pytest.raises(VendorUnavailableError, match="HTTP 503.*after 3 attempts"):
            client.daily("gold", date(2024, 3, 5), date(2024, 3, 7))
        assert len(range_requests(stub)) == 6
        # rate limited on yfinance's try and on its own retry: our next try gets through
        stub.requests.clear()
        stub.faults = [too_many_requests()] * 2
        assert client.daily("gold", date(2024, 3, 5), date(2024, 3, 7))["close"].to_list() == [2130.0, 2150.0]
        assert len(range_requests(stub)) == 3
        # a 429 whose Retry-After passes the budget: no sleeping into it
        stub.requests.clear()
        stub.faults = [Reply(429, "Too Many Requests", {"Retry-After": "120"})] * 20
        started = time.monotonic()
        with pytest.raises(VendorUnavailableError, match="after 1 attempt .*120.0 s wait"):
            client.daily("gold", date(2024, 3, 5), date(2024, 3, 7))
        assert time.monotonic() - started < 5.0 and len(range_requests(stub)) == 2
        # a stalled Yahoo: every request's timeout is capped by what is left of the budget
        stub.requests.clear()
        stub.faults = [stall(4.0)] * 20
        started = time.monotonic()
        with pytest.raises(VendorUnavailableError, match="gave up"):
            yahoo_client(stub, seconds=1.5).daily("gold", date(2024, 3, 5), date(2024, 3, 7))
        assert time.monotonic() - started < 1.5 + 1.0 and len(range_requests(stub)) <= 3
        # a broken body is not retried; an empty range is no rows; an unknown ticker is refused
        stub.requests.clear()
        stub.faults = [Reply(200, '{"chart": {"result": [{"meta": {"currency": "USD"')]
        with pytest.raises(VendorPayloadError, match="not JSON"):
            client.daily("gold", date(2024, 3, 5), date(2024, 3, 7))
        assert len(range_requests(stub)) == 1
        assert client.daily("gold", date(2024, 2, 5), date(2024, 2, 7)).is_empty()
        with pytest.raises(VendorRequestError, match="no such ticker"):
            client.daily("nope", date(2024, 3, 5), date(2024, 3, 7))


def test_calendar_feed_parses_figures_and_times():
    events = [
        {"title": "CPI m/m", "country": "USD", "date": "2024-03-12T08:30:00-04:00", "impact": "High", "forecast": "0.4%", "previous": "0.3%"},
        {"title": "Trade Balance", "country": "EUR", "date": "2024-03-12T06:00:00-04:00", "impact": "Low", "forecast": "12.5B", "previous": ""},
        {"title": "Non-Farm", "country": "USD", "date": "2024-03-08T08:30:00-05:00", "impact": "High", "forecast": "200K", "previous": "353K", "actual": "275K"},
    ]
    fetched = datetime(2024, 3, 4, tzinfo=UTC)
    with StubServer(CalendarStub(events)) as stub:
        rows = EconomicCalendarResource(feed_url=stub.url + "/ff_calendar_thisweek.json").feed(fetched).sort("ts")
        stub.faults = [Reply(200, "{not json")]
        with pytest.raises(VendorPayloadError, match="not JSON"):
            EconomicCalendarResource(feed_url=stub.url + "/x").feed(fetched)
    assert rows["ts"].to_list() == [datetime(2024, 3, 8, 13, 30, tzinfo=UTC), datetime(2024, 3, 12, 10, tzinfo=UTC),
                                    datetime(2024, 3, 12, 12, 30, tzinfo=UTC)]
    assert rows["impact"].to_list() == ["high", "low", "high"]
    assert rows["forecast"].to_list() == [200_000.0, 12.5e9, 0.4] and rows["actual"].to_list()[0] == 275_000.0
    assert rows["event_id"].n_unique() == 3 and set(rows["known_at"]) == {fetched}


def test_calendar_feed_retries_within_the_budget_and_refusals_fail_at_once():
    with StubServer(CalendarStub([])) as stub:
        feed = EconomicCalendarResource(feed_url=stub.url + "/ff.json", attempts=3, backoff_s=0.05)
        stub.faults = [server_error()] * 20
        with pytest.raises(VendorUnavailableError, match="HTTP 503 .*after 3 attempts"):
            feed.feed(datetime(2024, 3, 4, tzinfo=UTC))
        assert len(stub.requests) == 3
        stub.requests.clear()
        stub.faults = [Reply(403, "<html>Forbidden</html>")]
        with pytest.raises(VendorRequestError, match="HTTP 403.*needs no key: check CALENDAR_FEED_URL"):
            feed.feed(datetime(2024, 3, 4, tzinfo=UTC))
        assert len(stub.requests) == 1
