"""Vendor resources against local stub servers in each vendor's wire format.

The real client libraries do the HTTP: ``massive`` (Polygon) with its urllib3 retries and
pagination, ``fredapi``, and requests for Dukascopy, Yahoo and the calendar feed.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest

from models.market.synthetic import SyntheticMarketConfig, generate_ticks
from models.market.ticks import conform_ticks
from resources.external.calendar import EconomicCalendarResource
from resources.external.fred import FredResource
from resources.external.yahoo import YahooFinanceResource
from resources.vendors.base import VendorPayloadError, VendorRequestError, VendorUnavailableError
from resources.vendors.dukascopy import DukascopyResource, dukascopy_instrument
from resources.vendors.files import FileImportResource, detect_layout
from resources.vendors.polygon import PolygonResource, polygon_ticker, symbol_from_polygon
from tests.stubs import (
    CalendarStub,
    DukascopyStub,
    FredStub,
    PolygonStub,
    Reply,
    StubServer,
    YahooStub,
    fred_rate_limited,
    server_error,
    stall,
    too_many_requests,
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
        vendor = PolygonResource(api_key="test-key", base_url=stub.url, page_limit=500)
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
        slow = PolygonResource(api_key="test-key", base_url=stub.url, retries=1, read_timeout_s=0.3)
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


def test_yahoo_daily_closes_are_known_after_the_day_ends():
    app = YahooStub()
    app.days["GC=F"] = [
        (datetime(2024, 3, 5, 5, tzinfo=UTC), 2120.0, 2140.0, 2110.0, 2130.0, 1e5),  # 00:00 New York
        (datetime(2024, 3, 6, 5, tzinfo=UTC), 2130.0, 2160.0, 2125.0, 2150.0, 1.2e5),
    ]
    with StubServer(app) as stub:
        stub.faults = [server_error()]
        yahoo = YahooFinanceResource(base_url=stub.url, backoff_s=0)
        rows = yahoo.daily("gold", date(2024, 3, 5), date(2024, 3, 7))
        with pytest.raises(VendorRequestError, match="delisted"):
            YahooFinanceResource(base_url=stub.url, tickers={"nope": "NOPE"}).daily("nope", date(2024, 3, 5), date(2024, 3, 7))
    assert stub.requests[-2].path == "/v8/finance/chart/GC=F"
    assert rows["date"].to_list() == [date(2024, 3, 5), date(2024, 3, 6)] and rows["close"].to_list() == [2130.0, 2150.0]
    # midnight New York (EST, UTC-5) after the trading day
    assert rows["known_at"].to_list() == [datetime(2024, 3, 6, 5, tzinfo=UTC), datetime(2024, 3, 7, 5, tzinfo=UTC)]


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
