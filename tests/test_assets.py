"""The Dagster assets end to end: real Dagster runs, the real embedded ClickHouse engine."""

from __future__ import annotations

import random
from datetime import UTC, date, datetime, timedelta

import polars as pl
import pytest
from dagster import (
    AssetCheckSeverity,
    DagsterInstance,
    Definitions,
    build_schedule_context,
    instance_for_test,
    materialize,
)

from assets.market_data import aggregates, market_ticks
from assets.partitions import SYMBOLS, DaySymbol
from models.market.candles import aggregate_ticks
from models.market.synthetic import SyntheticMarketConfig, generate_ticks
from models.market.timeframes import DayBoundary, Timeframe
from resources.conventions import MarketConventionsResource
from resources.market_data import MarketDataResource, SyntheticMarketResource
from resources.warehouse import WarehouseResource
from resources.warehouse.market import read_bars, read_quarantine, read_ticks

SCALE = 0.25  # fewer ticks per day keeps the suite quick; the logic is the same


class DamagedFeed(SyntheticMarketResource):
    """A vendor whose payloads carry the faults real feeds have: synthetic ticks with the
    vendor's sequence numbers, then crossed, NaN, negative, twice-sent (same sequence number),
    misdated and shuffled rows, and a silent hour."""

    seed: int = 7

    def fetch_ticks(self, symbol: str, start: datetime, end: datetime) -> pl.DataFrame:
        ticks = generate_ticks(symbol, start.date(), SyntheticMarketConfig(self.seed, SCALE))
        ticks = ticks.with_columns(pl.int_range(pl.len(), dtype=pl.Int64).alias("vendor_seq"))
        hole = (pl.col("ts") >= start + timedelta(hours=10)) & (pl.col("ts") < start + timedelta(hours=11))
        ticks = ticks.filter(~hole)
        bad = pl.concat([
            ticks.slice(100, 1).with_columns(ask=pl.col("bid") * 0.999),  # crossed
            ticks.slice(200, 1).with_columns(bid=pl.lit(float("nan"))),
            ticks.slice(300, 1).with_columns(ask=pl.lit(-1.0)),
            ticks.slice(400, 2),  # rows 400-401 sent again: their sequence numbers repeat
            ticks.slice(500, 1).with_columns(pl.col("ts") + timedelta(days=1)),  # belongs to tomorrow
        ])
        return pl.concat([ticks, bad]).sample(fraction=1.0, shuffle=True, seed=1)


@pytest.fixture
def instance() -> DagsterInstance:
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(SYMBOLS.name, ["EURUSD", "XAUUSD", "BTCUSD", "GBPJPY"])
    return instance


def resources(warehouse: WarehouseResource, boundary: DayBoundary = DayBoundary.UTC, vendor=None) -> dict:
    return {
        "warehouse": warehouse,
        "market_data": MarketDataResource(synthetic=vendor or SyntheticMarketResource(seed=7, tick_rate_scale=SCALE)),
        "conventions": MarketConventionsResource(day_boundary=boundary),
    }


def run(partition: DaySymbol, instance, res, selection=(market_ticks, aggregates), raise_on_error=True):
    return materialize(list(selection), partition_key=partition.key, instance=instance, resources=res,
                       raise_on_error=raise_on_error)


def expected_ticks(symbol: str, day: date) -> pl.DataFrame:
    return generate_ticks(symbol, day, SyntheticMarketConfig(7, SCALE))


def test_partition_materializes_with_metadata_and_passing_checks(warehouse, instance):
    partition = DaySymbol("EURUSD", date(2024, 3, 6))
    result = run(partition, instance, resources(warehouse))
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    expected = expected_ticks("EURUSD", partition.day)
    assert meta["market_ticks"]["dagster/row_count"].value == expected.height
    assert meta["market_ticks"]["quarantined_rows"].value == 0
    assert meta["market_ticks"]["first_ts"].value == expected["ts"].min().isoformat()
    assert meta["aggregates"]["bars_M1"].value == expected["ts"].dt.truncate("1m").n_unique()
    assert meta["aggregates"]["bars_D1"].value == 1
    assert meta["aggregates"]["duration_seconds"].value > 0
    checks = {(e.asset_key.to_user_string(), e.check_name): e.passed for e in result.get_asset_check_evaluations()}
    assert len(checks) == 9 and all(checks.values()), checks
    stored = read_ticks(warehouse, "EURUSD", partition.start, partition.end)
    assert stored.drop("seq").equals(expected)


def test_rematerializing_replaces_and_never_duplicates(warehouse, instance):
    partition = DaySymbol("XAUUSD", date(2024, 3, 6))
    res = resources(warehouse, vendor=DamagedFeed())
    for _ in range(3):
        run(partition, instance, res)
    counts = warehouse.query_frame(
        "SELECT (SELECT count() FROM market_ticks) AS ticks, (SELECT count() FROM market_ticks_quarantine) AS bad, "
        "(SELECT count() FROM aggregates) AS bars, (SELECT uniqExact(timeframe, ts) FROM aggregates) AS distinct_bars"
    ).row(0, named=True)
    clean = expected_ticks("XAUUSD", partition.day)
    # raw counts, hidden rows included: the superseded batches are gone, nothing is doubled
    assert counts["ticks"] == clean.filter(~pl.col("ts").dt.hour().is_in([10])).height
    assert counts["bad"] == 6
    assert counts["bars"] == counts["distinct_bars"] > 0


def test_bad_vendor_rows_are_quarantined_with_reasons_and_checks_warn(warehouse, instance):
    partition = DaySymbol("EURUSD", date(2024, 3, 6))
    result = run(partition, instance, resources(warehouse, vendor=DamagedFeed()))
    quarantine = read_quarantine(warehouse, "EURUSD", partition.day)
    assert sorted(quarantine["reason"].to_list()) == sorted(
        ["crossed_quote", "non_finite_price", "non_positive_price", "duplicate", "duplicate", "outside_partition"]
    )
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    for name in ("quotes_not_crossed_or_locked", "prices_finite_and_positive", "no_duplicate_ticks",
                 "timestamps_in_partition_and_sorted", "no_gaps_in_trading_hours"):
        assert not checks[name].passed, name
        assert checks[name].severity == AssetCheckSeverity.WARN
        if name != "no_gaps_in_trading_hours":
            assert checks[name].metadata["stored_violations"].value == 0
    assert checks["plausible_spreads"].passed
    gaps = checks["no_gaps_in_trading_hours"].metadata
    assert gaps["gaps"].value == 1 and 59 <= gaps["open_minutes_missing"].value <= 61
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert meta["out_of_order_rows"].value > 1000  # the feed arrived shuffled and was sorted
    stored = read_ticks(warehouse, "EURUSD", partition.start, partition.end)
    assert stored["ts"].is_sorted() and stored["seq"].to_list() == list(range(stored.height))
    # Candles are built from the clean ticks only, and every clean tick is in a bar.
    assert all(e.passed for e in result.get_asset_check_evaluations() if e.asset_key.to_user_string() == "aggregates")


def test_partitions_in_any_order_give_the_candles_of_the_whole_history(warehouse, instance):
    """W1 bars and New York D1/H4 bars span day partitions; built day by day in scrambled
    order they must equal candles computed over all the ticks at once."""
    days = [date(2024, 3, 7) + timedelta(days=i) for i in range(6)]
    res = resources(warehouse, DayBoundary.NEW_YORK_17)
    for day in days:  # ingest first, as a backfill of market_ticks would
        run(DaySymbol("BTCUSD", day), instance, res, selection=[market_ticks])
    for day in random.Random(3).sample(days, len(days)):
        run(DaySymbol("BTCUSD", day), instance, res, selection=[aggregates])
    ticks = read_ticks(warehouse, "BTCUSD", datetime(2024, 3, 1, tzinfo=UTC), datetime(2024, 3, 20, tzinfo=UTC))
    expected = aggregate_ticks(ticks.drop("seq"), boundary=DayBoundary.NEW_YORK_17).sort("timeframe", "ts")
    stored = read_bars(warehouse, "BTCUSD").drop("covered_until").sort("timeframe", "ts")
    assert stored.height == expected.height
    exact = [c for c in expected.columns if c not in ("vwap", "spread_mean")]
    assert stored.select(exact).equals(expected.select(exact))
    for column in ("vwap", "spread_mean"):
        assert (stored[column] - expected[column]).abs().max() < 1e-6
    assert set(stored.filter(pl.col("timeframe") == "W1")["ts"]) == {
        datetime(2024, 3, 3, 22, tzinfo=UTC), datetime(2024, 3, 10, 21, tzinfo=UTC)
    }


@pytest.mark.parametrize(("downstream", "upstream"), [("aggregates", "market_ticks"), ("ml_features", "aggregates")])
def test_a_partition_without_its_input_fails_clearly(warehouse, instance, downstream, upstream):
    from assets.features import ml_features

    asset_def = {"aggregates": aggregates, "ml_features": ml_features}[downstream]
    partition = DaySymbol("EURUSD", date(2024, 3, 12))
    result = run(partition, instance, resources(warehouse), selection=[asset_def], raise_on_error=False)
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert f"{upstream} has no materialization for EURUSD 2024-03-12" in str(failure.event_specific_data.error)


def test_a_new_symbol_needs_no_code(warehouse, instance):
    partition = DaySymbol("GBPJPY", date(2024, 3, 6))
    result = run(partition, instance, resources(warehouse))
    assert result.success
    ticks = read_ticks(warehouse, "GBPJPY", partition.start, partition.end)
    assert ticks.height > 5_000 and 150 < ticks["bid"].median() < 250


def test_definitions_load_and_the_schedule_covers_every_symbol():
    from orchestration.definitions import defs

    Definitions.validate_loadable(defs)
    assert {a.key.to_user_string() for a in defs.resolve_all_asset_specs()} == {
        "market_ticks", "vendor_candles", "aggregates", "ml_features",
        "external_fred_indicators", "external_commodity_prices", "external_economic_calendar", "backtest",
        "external_update",  # new external rows for running live runners, on the bus
        # broker data (MT5 slice); model_predictions is the training slice's table, declared as its input
        "broker_quotes_m1", "broker_vs_vendor", "predictions_vs_user_trades",
        "trained_model", "champion_model",
        "model_backtest",  # a registered model version over its out-of-sample folds
    }

    with instance_for_test() as persistent:  # schedules read symbols from a stored instance
        persistent.add_dynamic_partitions(SYMBOLS.name, ["EURUSD", "GBPJPY"])

        def requests_of(name: str, at: datetime) -> list:
            context = build_schedule_context(persistent, scheduled_execution_time=at, repository_def=defs.get_repository_def())
            return list(defs.resolve_schedule_def(name).evaluate_tick(context).run_requests)

        requests = requests_of("daily_market_data", datetime(2024, 3, 7, 0, 15, tzinfo=UTC))
        fred = requests_of("weekly_fred", datetime(2024, 3, 11, 6, tzinfo=UTC))
        commodities = requests_of("daily_commodities", datetime(2024, 3, 7, 6, tzinfo=UTC))
        (calendar,) = requests_of("daily_calendar", datetime(2024, 3, 7, 0, 20, tzinfo=UTC))
    assert sorted(r.partition_key for r in requests) == ["2024-03-06|EURUSD", "2024-03-06|GBPJPY"]
    assert len({r.run_key for r in requests}) == 2
    assert [r.partition_key for r in fred] == ["2024-03-03"]  # Monday morning: the Sunday-to-Sunday week just ended
    assert [r.partition_key for r in commodities] == ["2024-03-06"]
    assert calendar.tags["dagster/asset_partition_range_start"] == "2024-03-06"
    assert calendar.tags["dagster/asset_partition_range_end"] == "2024-03-13"  # yesterday's actuals to next week's schedule


def test_ml_features_partitions_with_checks_and_labels_that_fill_in(warehouse, instance):
    from assets.features import ml_features
    from models.features.registry import feature_set_version
    from models.market.timeframes import Timeframe
    from resources.warehouse.features import read_features

    res = resources(warehouse)
    res["conventions"] = MarketConventionsResource(feature_timeframes=["M5", "H1"])
    days = [date(2024, 3, 1) + timedelta(days=i) for i in range(7)]
    for day in days:
        run(DaySymbol("BTCUSD", day), instance, res)
    last = DaySymbol("BTCUSD", days[-1])
    result = run(last, instance, res, selection=[ml_features])
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert all(e.passed for e in checks.values()), {k: e.metadata for k, e in checks.items()}
    assert checks["no_lookahead"].metadata["cuts"].value == 16
    meta = result.get_asset_materialization_events()[0].materialization.metadata
    assert meta["rows_M5"].value == 288 and meta["rows_H1"].value == 24
    assert meta["feature_set"].value == feature_set_version()
    rows = read_features(warehouse, "BTCUSD", Timeframe.M5, last.start, last.end)
    assert rows.height == 288 and rows["warm"].sum() == 288  # six earlier days gave the warm-up
    assert rows["fwd_ret_1d"].null_count() == 288  # tomorrow is not in the warehouse yet
    # The next day lands; re-materializing fills the labels and replaces, never duplicates.
    run(DaySymbol("BTCUSD", days[-1] + timedelta(days=1)), instance, res)
    run(last, instance, res, selection=[ml_features])
    rows = read_features(warehouse, "BTCUSD", Timeframe.M5, last.start, last.end)
    assert rows.height == 288 and rows["fwd_ret_1d"].null_count() == 0
    stored = warehouse.query_frame("SELECT count() AS n FROM ml_features WHERE timeframe = 'M5'")["n"][0]
    assert stored == 288


class GarbledFeed(SyntheticMarketResource):
    """A vendor that answers with something that is not ticks at all."""

    def fetch_ticks(self, symbol: str, start: datetime, end: datetime) -> pl.DataFrame:
        return pl.DataFrame({"symbol": [symbol], "time": ["yesterday"], "bid": ["1.1"]})


def test_a_payload_that_is_not_ticks_fails_once_and_says_why(warehouse, instance):
    partition = DaySymbol("EURUSD", date(2024, 3, 6))
    result = run(partition, instance, resources(warehouse, vendor=GarbledFeed()), selection=[market_ticks],
                 raise_on_error=False)
    assert not result.success
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert len(failures) == 1 and not any(e.event_type_value == "STEP_UP_FOR_RETRY" for e in result.all_events)
    assert "lacks required column(s) ['ts']" in str(failures[0].event_specific_data.error)
    assert read_ticks(warehouse, "EURUSD", partition.start, partition.end).is_empty()


def test_features_follow_new_candles_without_waiting_for_external_data(warehouse):
    """Declarative automation: a new day of candles requests its features (and the vendor
    candles step), although no external partition was ever materialized: external data is
    optional and its dependencies are ignored by the condition."""
    from dagster import evaluate_automation_conditions

    from resources.external.calendar import EconomicCalendarResource
    from resources.external.fred import FredResource
    from resources.external.yahoo import YahooFinanceResource

    from assets.external import external_commodity_prices, external_economic_calendar, external_fred_indicators
    from assets.features import ml_features
    from assets.market_data import vendor_candles

    now = datetime(2024, 3, 8, 1, tzinfo=UTC)
    everything = [market_ticks, vendor_candles, aggregates, ml_features,
                  external_fred_indicators, external_commodity_prices, external_economic_calendar]
    external = {"fred": FredResource(api_key="unused"), "yahoo": YahooFinanceResource(), "calendar": EconomicCalendarResource()}
    graph = Definitions(assets=everything, resources={**resources(warehouse), **external})
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(SYMBOLS.name, ["EURUSD"])
        first = evaluate_automation_conditions(defs=graph, instance=instance, evaluation_time=now)
        partition = DaySymbol("EURUSD", date(2024, 3, 7))  # the latest complete day at `now`
        assert run(partition, instance, resources(warehouse)).success
        later = evaluate_automation_conditions(defs=graph, instance=instance, evaluation_time=now, cursor=first.cursor)
    requested = {result.key.to_user_string(): {str(k) for k in result.true_subset.expensively_compute_partition_keys()}
                 for result in later.results if result.true_subset.size}
    assert requested.get("ml_features") == {str(partition.key)}
    assert requested.get("vendor_candles") == {str(partition.key)}
    assert "external_fred_indicators" not in requested


def test_a_day_runs_again_when_the_next_day_lands_and_its_labels_fill_in(warehouse):
    """When the candles of Mar 7 land, automation requests the features of Mar 7 and the
    labels sensor those of Mar 6 again (their 1-day labels needed Mar 7); a day that never had
    features is not requested, nor is one requested twice. Running what was requested fills
    the labels."""
    from dagster import build_sensor_context, evaluate_automation_conditions

    from assets.features import ml_features
    from assets.market_data import vendor_candles
    from assets.partitions import parse_key
    from models.market.timeframes import Timeframe
    from orchestration.runs import run_days
    from resources.warehouse.features import read_features
    from sensors.labels import labels_follow_candles

    res = resources(warehouse)
    graph = Definitions(assets=[market_ticks, vendor_candles, aggregates, ml_features], resources=res)
    previous, newest = DaySymbol("BTCUSD", date(2024, 3, 6)), DaySymbol("BTCUSD", date(2024, 3, 7))
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(SYMBOLS.name, ["BTCUSD", "EURUSD"])
        run(DaySymbol("EURUSD", date(2024, 3, 6)), instance, res)  # candles, never features: left alone
        for day in (date(2024, 3, 5), previous.day):
            run(DaySymbol("BTCUSD", day), instance, res, selection=[market_ticks, aggregates, ml_features])
        labels = read_features(warehouse, "BTCUSD", Timeframe.M5, previous.start, previous.end)["fwd_ret_1d"]
        assert labels.null_count() == 288  # Mar 7 is not in the warehouse yet
        first = evaluate_automation_conditions(defs=graph, instance=instance, evaluation_time=datetime(2024, 3, 7, 1, tzinfo=UTC))
        quiet = labels_follow_candles.evaluate_tick(build_sensor_context(instance=instance))
        # Mar 5 ran before Mar 6's candles existed: it is stale already (Mar 6 is not: nothing after it yet)
        assert [parse_key(r.tags["dagster/asset_partition_range_start"]) for r in quiet.run_requests] == [
            DaySymbol("BTCUSD", date(2024, 3, 5))]
        run(newest, instance, res)  # the candles of Mar 7 land (and of EURUSD Mar 7, whose Mar 6 has no features)
        run(DaySymbol("EURUSD", date(2024, 3, 7)), instance, res)
        later = evaluate_automation_conditions(defs=graph, instance=instance, evaluation_time=datetime(2024, 3, 8, 1, tzinfo=UTC),
                                               cursor=first.cursor)
        automated = next(r for r in later.results if r.key.to_user_string() == "ml_features")
        assert {str(k) for k in automated.true_subset.expensively_compute_partition_keys()} == {
            str(newest.key), str(DaySymbol("EURUSD", date(2024, 3, 7)).key)}
        sensed = labels_follow_candles.evaluate_tick(build_sensor_context(instance=instance, cursor=quiet.cursor))
        (request,) = sensed.run_requests
        ranged = {tag: parse_key(request.tags[f"dagster/asset_partition_range_{tag}"]) for tag in ("start", "end")}
        assert ranged["start"] == ranged["end"] == previous
        again = labels_follow_candles.evaluate_tick(build_sensor_context(instance=instance, cursor=sensed.cursor))
        assert not again.run_requests  # the cursor moved on: asked once
        assert run_days(instance, res, [ml_features], "BTCUSD", previous.day, newest.day).success
    labels = read_features(warehouse, "BTCUSD", Timeframe.M5, previous.start, previous.end)["fwd_ret_1d"]
    assert labels.null_count() == 0 and labels.len() == 288


class TapeFeed(SyntheticMarketResource):
    """A futures-like trade tape without ids: bursts of identical prints (same millisecond,
    price and size), as an exchange prints one aggressive order filling several resting ones."""

    def fetch_ticks(self, symbol: str, start: datetime, end: datetime) -> pl.DataFrame:
        rows = []
        for k in range(600):
            ts = start + timedelta(hours=1, seconds=7 * k)
            rows += [{"symbol": symbol, "ts": ts, "price": 2150.0 + (k % 13) * 0.1, "size": 2.0, "source": "tape"}] * (1 + k % 4)
        return pl.DataFrame(rows)


def test_a_tape_of_identical_prints_keeps_every_print_and_conserves_volume(warehouse, instance):
    partition = DaySymbol("XAUUSD", date(2024, 3, 6))
    result = run(partition, instance, resources(warehouse, vendor=TapeFeed()))
    prints = TapeFeed().fetch_ticks("XAUUSD", partition.start, partition.end)
    stored = read_ticks(warehouse, "XAUUSD", partition.start, partition.end)
    assert stored.height == prints.height == sum(1 + k % 4 for k in range(600))  # 1,500 fills, none a "duplicate"
    assert read_quarantine(warehouse, "XAUUSD", partition.day).is_empty()
    for timeframe in ("M1", "H1", "D1"):
        bars = read_bars(warehouse, "XAUUSD", Timeframe(timeframe), partition.start, partition.end)
        assert int(bars["tick_count"].sum()) == prints.height, timeframe
        assert bars["volume"].sum() == pytest.approx(prints["size"].sum(), rel=1e-12), timeframe
    meta = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    assert meta["market_ticks"]["received_rows"].value == meta["market_ticks"]["dagster/row_count"].value == prints.height
