"""Ingestion end to end: real Dagster runs, the real client libraries against vendor stubs,
the embedded ClickHouse engine. Gap filling, vendor candles, resumable reruns and the
point-in-time path from FRED/Yahoo/calendar to the features."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest
from dagster import DagsterInstance, materialize

from assets.external import external_commodity_prices, external_economic_calendar, external_fred_indicators
from assets.features import ml_features
from assets.market_data import aggregates, market_ticks, vendor_candles
from assets.partitions import SYMBOLS, DaySymbol
from models.market.quality import trading_gaps
from models.market.instruments import AssetClass
from models.market.synthetic import SyntheticMarketConfig, generate_ticks
from models.market.timeframes import Timeframe
from resources.conventions import MarketConventionsResource
from resources.external.calendar import EconomicCalendarResource
from resources.external.fred import FredResource
from resources.market_data import MarketDataResource, SyntheticMarketResource
from resources.vendors.dukascopy import DukascopyResource
from resources.vendors.polygon import PolygonResource
from resources.warehouse.features import read_features
from resources.warehouse.market import read_bars, read_candle_quarantine, read_ticks, read_vendor_candles
from tests.stubs import CalendarStub, DukascopyStub, FredStub, PolygonStub, StubServer, StubYahooResource, YahooStub

DAY = date(2024, 3, 6)
PARTITION = DaySymbol("EURUSD", DAY)
HOLE = (PARTITION.start + timedelta(hours=10), PARTITION.start + timedelta(hours=11))


def day_ticks(seed: int, scale: float = 0.2) -> pl.DataFrame:
    """Synthetic quotes as a quote feed sends them: without sizes, so no two alike."""
    ticks = generate_ticks("EURUSD", DAY, SyntheticMarketConfig(seed, scale))
    return ticks.unique(["ts", "bid", "ask"], keep="first", maintain_order=True)


def with_hole(frame: pl.DataFrame) -> pl.DataFrame:
    return frame.filter((pl.col("ts") < HOLE[0]) | (pl.col("ts") >= HOLE[1]))


@pytest.fixture
def instance() -> DagsterInstance:
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(SYMBOLS.name, ["EURUSD", "BTCUSD"])
    return instance


def resources(warehouse, market_data: MarketDataResource, **extra) -> dict:
    return {"warehouse": warehouse, "market_data": market_data, "conventions": MarketConventionsResource(), **extra}


def checks_of(result) -> dict[str, bool]:
    return {f"{e.asset_key.to_user_string()}:{e.check_name}": e.passed for e in result.get_asset_check_evaluations()}


def test_a_gap_in_the_primary_is_filled_from_the_backup_with_sources_and_no_duplicates(warehouse, instance):
    primary, backup = with_hole(day_ticks(1)), day_ticks(2)
    polygon, dukascopy = PolygonStub(), DukascopyStub()
    polygon.quotes["C:EURUSD"] = primary
    dukascopy.ticks["EUR/USD"] = backup
    with StubServer(polygon) as p, StubServer(dukascopy) as d:
        market_data = MarketDataResource(
            polygon=PolygonResource(api_key="test-key", base_url=p.url, page_limit=2_000),
            dukascopy=DukascopyResource(base_url=d.url + "/2.0/index.php", page_limit=2_000, backoff_s=0),
            routes={"EURUSD": ["polygon", "dukascopy"]},
        )
        result = materialize([market_ticks], partition_key=PARTITION.key, instance=instance, resources=resources(warehouse, market_data))
        again = materialize([market_ticks], partition_key=PARTITION.key, instance=instance, resources=resources(warehouse, market_data))
    assert result.success and again.success
    stored = read_ticks(warehouse, "EURUSD", PARTITION.start, PARTITION.end)
    from_backup = stored.filter(pl.col("source") == "dukascopy")
    # exactly the backup's ticks strictly between the primary's last tick before the hole and first after it
    before, after = primary.filter(pl.col("ts") < HOLE[0])["ts"].max(), primary.filter(pl.col("ts") >= HOLE[1])["ts"].min()
    expected = backup.filter((pl.col("ts") > before) & (pl.col("ts") < after))
    assert from_backup["ts"].equals(expected["ts"]) and from_backup["bid"].equals(expected["bid"])
    assert stored.filter(pl.col("source") == "polygon").height == primary.height
    assert stored.height == primary.height + expected.height  # a rerun replaced, never duplicated
    assert stored.select(pl.struct("ts", "bid", "ask").is_duplicated().sum()).item() == 0
    assert trading_gaps(stored["ts"], PARTITION.start, PARTITION.end, AssetClass.FX, timedelta(minutes=5)).is_empty()
    metadata = result.asset_materializations_for_node("market_ticks")[0].metadata
    assert metadata["backup_rows_filled"].value == {"dukascopy": expected.height}
    assert metadata["rows_per_source"].value == {"polygon": primary.height, "dukascopy": expected.height}
    assert all(checks_of(result).values()), checks_of(result)


def candle_frame(ticks: pl.DataFrame) -> pl.DataFrame:
    """Polygon-like minute aggregates of a tick stream (mid prices)."""
    mid = ticks.with_columns(((pl.col("bid") + pl.col("ask")) / 2).alias("mid"), pl.col("ts").dt.truncate("1m").alias("minute"))
    return mid.group_by("minute").agg(
        pl.col("mid").first().alias("open"), pl.col("mid").max().alias("high"), pl.col("mid").min().alias("low"),
        pl.col("mid").last().alias("close"), pl.len().cast(pl.Float64).alias("volume"), pl.col("mid").mean().alias("vwap"),
        pl.len().alias("tick_count"),
    ).rename({"minute": "ts"}).sort("ts")


def test_vendor_candles_fill_minutes_without_ticks_and_a_failed_run_reruns_cleanly(warehouse, instance):
    full = day_ticks(1)
    polygon = PolygonStub()
    polygon.quotes["C:EURUSD"] = with_hole(full)
    polygon.aggs["C:EURUSD"] = candle_frame(full)
    with StubServer(polygon) as p:
        market_data = MarketDataResource(polygon=PolygonResource(api_key="test-key", base_url=p.url, page_limit=5_000), primary="polygon")
        res = resources(warehouse, market_data)
        # the candle endpoint sends garbage: the job stops at vendor_candles, once, with the reason
        polygon.rewrite_page = lambda n, body: {**body, "results": [1, 2]} if "/aggs/" in p.requests[-1].path else body
        failed = materialize([market_ticks, vendor_candles, aggregates], partition_key=PARTITION.key, instance=instance,
                             resources=res, raise_on_error=False)
        assert not failed.success
        failures = [e for e in failed.all_events if e.event_type_value == "STEP_FAILURE"]
        assert [e.step_key for e in failures] == ["vendor_candles"]
        assert "not a list of objects" in str(failures[0].event_specific_data.error)
        # the vendor recovers; the whole partition reruns and replaces what the first run wrote
        polygon.rewrite_page = None
        result = materialize([market_ticks, vendor_candles, aggregates], partition_key=PARTITION.key, instance=instance, resources=res)
    checks = checks_of(result)
    assert result.success and checks.pop("market_ticks:no_gaps_in_trading_hours") is False  # the ticks' hole stays visible
    assert all(checks.values()), checks  # candles, bars (every tick and candle in a bar) are consistent
    ticks = read_ticks(warehouse, "EURUSD", PARTITION.start, PARTITION.end)
    assert ticks.height == with_hole(full).height  # not twice
    candles = read_vendor_candles(warehouse, "EURUSD", PARTITION.start, PARTITION.end)
    tick_minutes = set(ticks["ts"].dt.truncate("1m").to_list())
    hole_minutes = [m for m in candle_frame(full)["ts"].to_list() if m not in tick_minutes]
    assert candles["ts"].to_list() == hole_minutes and len(hole_minutes) >= 55
    assert set(candles["source"]) == {"polygon:m1"}
    m1 = read_bars(warehouse, "EURUSD", Timeframe.M1, PARTITION.start, PARTITION.end)
    assert m1.height == len(tick_minutes) + len(hole_minutes) and m1["ts"].is_unique().all()
    h1 = read_bars(warehouse, "EURUSD", Timeframe.H1, PARTITION.start, PARTITION.end)
    by_hour = dict(zip(h1["ts"].dt.hour().to_list(), h1["source"].to_list(), strict=True))
    assert by_hour[10] == "polygon:m1" and by_hour[9] == "polygon" and by_hour[11] == "polygon"
    hole_bar = h1.filter(pl.col("ts") == HOLE[0]).row(0, named=True)
    in_hole = candle_frame(full).filter((pl.col("ts") >= HOLE[0]) & (pl.col("ts") < HOLE[1]))
    assert hole_bar["open"] == in_hole["open"][0] and hole_bar["close"] == in_hole["close"][-1]
    assert hole_bar["high"] == in_hole["high"].max() and hole_bar["tick_count"] == in_hole["tick_count"].sum()
    assert hole_bar["bid_close"] is None and hole_bar["spread_mean"] is None  # candles carry no quotes


def test_impossible_vendor_candles_are_quarantined_and_the_backup_fills_their_minutes(warehouse, instance):
    full = day_ticks(1)
    candles = candle_frame(full)
    broken_from, broken_to = HOLE[0] + timedelta(minutes=20), HOLE[0] + timedelta(minutes=40)
    broken = (pl.col("ts") >= broken_from) & (pl.col("ts") < broken_to)
    polygon, dukascopy = PolygonStub(), DukascopyStub()
    polygon.quotes["C:EURUSD"] = with_hole(full)
    polygon.aggs["C:EURUSD"] = candles.with_columns(  # 20 impossible minutes inside the hole
        pl.when(broken & (pl.col("ts") == broken_from)).then(None).otherwise(pl.col("open")).alias("open"),  # sent as null
        pl.when(broken & (pl.col("ts") == broken_from + timedelta(minutes=1))).then(0.0)
        .when(broken).then(pl.col("low") - 1e-4).otherwise(pl.col("high")).alias("high"),  # zero, or below the low
    )
    dukascopy.minutes["EUR/USD"] = candles
    with StubServer(polygon) as p, StubServer(dukascopy) as d:
        market_data = MarketDataResource(
            polygon=PolygonResource(api_key="test-key", base_url=p.url, page_limit=5_000),
            dukascopy=DukascopyResource(base_url=d.url + "/2.0/index.php", page_limit=5_000, backoff_s=0),
            primary="polygon", backups=["dukascopy"],
        )
        result = materialize([market_ticks, vendor_candles, aggregates], partition_key=PARTITION.key, instance=instance,
                             resources=resources(warehouse, market_data))
    assert result.success
    stored = read_vendor_candles(warehouse, "EURUSD", PARTITION.start, PARTITION.end)
    hole = candles.filter((pl.col("ts") >= HOLE[0]) & (pl.col("ts") < HOLE[1]))
    assert stored["ts"].to_list() == hole["ts"].to_list()  # every minute of the hole, once
    from_backup = stored.filter(pl.col("source") == "dukascopy:m1")
    assert from_backup["ts"].to_list() == hole.filter(broken)["ts"].to_list()
    assert from_backup["high"].to_list() == hole.filter(broken)["high"].to_list()
    quarantine = read_candle_quarantine(warehouse, "EURUSD", DAY)
    impossible = quarantine.filter(~pl.col("reason").str.starts_with("covered_by"))
    assert impossible.height == 20 and set(impossible["source"]) == {"polygon:m1"}
    assert dict(impossible.group_by("reason").len().iter_rows()) == {"missing_price": 1, "non_positive_price": 1, "inconsistent_ohlc": 18}
    # every candle read is used or quarantined: Polygon's minutes that have ticks, Dukascopy's
    # minutes Polygon already filled (Dukascopy is asked for the day, like Polygon)
    covered = dict(quarantine.filter(pl.col("reason").str.starts_with("covered_by")).group_by("source", "reason").len()
                   .select(pl.concat_str("source", pl.lit("/"), "reason"), "len").iter_rows())
    assert covered["polygon:m1/covered_by_ticks"] == candles.height - hole.height
    assert covered["dukascopy:m1/covered_by_ticks"] == candles.height - hole.height
    assert covered["dukascopy:m1/covered_by_earlier_vendor"] == hole.height - 20
    meta = next(e for e in result.get_asset_materialization_events() if e.asset_key.to_user_string() == "vendor_candles")
    received = meta.materialization.metadata["received_rows"].value
    assert received == 2 * candles.height == stored.height + quarantine.height
    check = next(e for e in result.get_asset_check_evaluations() if e.check_name == "candles_consistent")
    assert not check.passed and check.severity.value == "WARN"
    assert check.metadata["quarantined_impossible"].value == {"missing_price": 1, "non_positive_price": 1, "inconsistent_ohlc": 18}
    checks = checks_of(result)
    assert all(v for k, v in checks.items() if k.startswith("aggregates:")), checks
    h1 = read_bars(warehouse, "EURUSD", Timeframe.H1, PARTITION.start, PARTITION.end).filter(pl.col("ts") == HOLE[0])
    assert h1["high"][0] == hole["high"].max() and h1["low"][0] == hole["low"].min()


def test_external_data_reaches_features_only_from_when_it_was_known(warehouse, instance, tmp_path):
    fred, yahoo = FredStub(), YahooStub()
    fred.vintages["DFF"] = [
        ("2024-02-29", "9999-12-31", "2024-02-28", 5.30),  # stored by the week before; clipped into the next
        ("2024-03-05", "9999-12-31", "2024-03-04", 5.31),
        ("2024-03-06", "2024-03-06", "2024-03-05", 5.33),
        ("2024-03-07", "9999-12-31", "2024-03-05", 5.40),  # the revision, published a day later
    ]
    for series in ("DGS10", "CPIAUCSL"):
        fred.vintages[series] = []
    yahoo.days["GC=F"] = [(datetime(2024, 3, d, 5, tzinfo=UTC), 2100.0, 2160.0, 2090.0, 2100.0 + 10 * d, 1e5) for d in (4, 5, 6, 7)]
    (tmp_path / "calendar").mkdir()
    (tmp_path / "calendar" / "history.csv").write_text(
        "ts,currency,impact,title,actual,forecast,previous,known_at\n"
        "2024-03-07T13:30:00Z,USD,High,Jobless Claims,217K,200K,215K,2024-03-01T00:00:00Z\n"
        "2024-03-07T15:00:00Z,JPY,High,Not ours,1.0,1.0,1.0,2024-03-01T00:00:00Z\n"
    )
    btc = [DaySymbol("BTCUSD", date(2024, 3, 7)), DaySymbol("BTCUSD", date(2024, 3, 8))]
    synthetic = MarketDataResource(synthetic=SyntheticMarketResource(seed=7, tick_rate_scale=0.2))
    with StubServer(fred) as f, StubServer(yahoo) as y, StubServer(CalendarStub()) as c:
        res = resources(
            warehouse, synthetic,
            fred=FredResource(api_key="fred-key", base_url=f.url + "/fred", series=["DFF", "DGS10", "CPIAUCSL"]),
            yahoo=StubYahooResource(stub_url=y.url, tickers={"gold": "GC=F"}),  # yfinance, its session reaching the stub
            calendar=EconomicCalendarResource(directory=str(tmp_path / "calendar"), feed_url=""),
        )
        res["conventions"] = MarketConventionsResource(feature_timeframes=["M5"])
        for week in ("2024-02-25", "2024-03-03"):
            assert materialize([external_fred_indicators], partition_key=week, instance=instance, resources=res).success
        commodities = materialize([external_commodity_prices], instance=instance, resources=res, tags={
            "dagster/asset_partition_range_start": "2024-03-04", "dagster/asset_partition_range_end": "2024-03-07"})
        ranges = {(r.query["period1"], r.query["period2"]) for r in y.requests if YahooStub.is_range(r)}
        # one range asked for the whole backfill, not one per day (asked twice when yfinance's
        # crumb from an earlier stub is refused and it fetches a fresh one, as against Yahoo)
        assert commodities.success and len(ranges) == 1
        assert materialize([external_economic_calendar], partition_key="2024-03-07", instance=instance, resources=res).success
        # the same event seen later in the weekly feed keeps the moment it was first known
        res["calendar"] = EconomicCalendarResource(directory=str(tmp_path / "calendar"), feed_url=c.url + "/ff.json")
        c_app: CalendarStub = c.app  # type: ignore[assignment]
        c_app.events = [{"title": "Jobless Claims", "country": "USD", "date": "2024-03-07T08:30:00-05:00", "impact": "High",
                         "forecast": "200K", "previous": "215K", "actual": "217K"}]
        assert materialize([external_economic_calendar], partition_key="2024-03-07", instance=instance, resources=res).success
        for partition in btc:
            assert materialize([market_ticks, aggregates], partition_key=partition.key, instance=instance, resources=res).success
        for partition in btc:
            features = materialize([ml_features], partition_key=partition.key, instance=instance, resources=res)
            assert features.success and all(checks_of(features).values()), checks_of(features)
    dff = warehouse.query_frame(
        "SELECT observation_date, value, realtime_start, week FROM external_fred_indicators WHERE series_id = 'DFF' "
        "ORDER BY observation_date, realtime_start")
    # the repeat of Feb 28 that ALFRED dates Mar 3 is not stored again: one row per publication
    assert dff.select("value", "week").rows() == [(5.30, date(2024, 2, 25)), (5.31, date(2024, 3, 3)),
                                                  (5.33, date(2024, 3, 3)), (5.40, date(2024, 3, 3))]
    stored_events = warehouse.query_frame("SELECT title, known_at FROM external_economic_calendar ORDER BY ts")
    assert stored_events.height == 2 and stored_events["known_at"][0] == int(datetime(2024, 3, 1, tzinfo=UTC).timestamp())
    rows = pl.concat([read_features(warehouse, "BTCUSD", Timeframe.M5, p.start, p.end) for p in btc])
    closes = rows["close_ts"]

    def at(hour: datetime, name: str) -> float | None:
        return rows.filter(closes == hour)[name][0]

    # DFF for Mar 5 published Mar 6 (New York) -> known from the end of that day: Mar 7 05:00 UTC
    assert at(datetime(2024, 3, 7, 4, 55, tzinfo=UTC), "fred_fedfunds") == 5.31
    assert at(datetime(2024, 3, 7, 5, 0, tzinfo=UTC), "fred_fedfunds") == 5.33
    assert at(datetime(2024, 3, 7, 5, 0, tzinfo=UTC), "fred_fedfunds_change") == pytest.approx(0.02)
    # the revision is published Mar 7: no bar before Mar 8 05:00 UTC sees it
    before_revision = rows.filter(closes < datetime(2024, 3, 8, 5, tzinfo=UTC))
    assert 5.40 not in before_revision["fred_fedfunds"].to_list()
    assert at(datetime(2024, 3, 8, 5, 0, tzinfo=UTC), "fred_fedfunds") == 5.40
    assert at(datetime(2024, 3, 8, 5, 0, tzinfo=UTC), "fred_fedfunds_change") == pytest.approx(0.09)
    # gold closed Mar 6 at 2160 after 2150: known at midnight New York, Mar 7 05:00 UTC
    assert at(datetime(2024, 3, 7, 4, 55, tzinfo=UTC), "commodity_gold_ret_1d") == pytest.approx(2150 / 2140 - 1)
    assert at(datetime(2024, 3, 7, 5, 0, tzinfo=UTC), "commodity_gold_ret_1d") == pytest.approx(2160 / 2150 - 1)
    # the USD event at 13:30 (the JPY one is not BTCUSD's); its surprise is known from its release
    assert at(datetime(2024, 3, 7, 12, 30, tzinfo=UTC), "event_hours_to_next") == pytest.approx(1.0)
    assert at(datetime(2024, 3, 7, 13, 25, tzinfo=UTC), "event_last_surprise") is None
    assert at(datetime(2024, 3, 7, 14, 30, tzinfo=UTC), "event_hours_since_last") == pytest.approx(1.0)
    assert at(datetime(2024, 3, 7, 14, 30, tzinfo=UTC), "event_last_surprise") == pytest.approx(0.085)
    assert at(datetime(2024, 3, 7, 14, 30, tzinfo=UTC), "event_hours_to_next") is None  # nothing else announced
