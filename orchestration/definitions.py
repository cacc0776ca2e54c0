"""The Dagster code location: assets, checks, jobs, schedules and resources."""

from __future__ import annotations

from datetime import timedelta

from dagster import (
    AssetSelection,
    Definitions,
    RunRequest,
    ScheduleEvaluationContext,
    define_asset_job,
    schedule,
)

from assets.backtests import backtest
from assets.broker import BROKER_ASSETS
from assets.external import (
    external_commodity_prices,
    external_economic_calendar,
    external_fred_indicators,
    external_update,
)
from assets.features import ml_features
from assets.market_data import aggregates, market_ticks, vendor_candles
from assets.model_backtests import model_backtest
from assets.partitions import SYMBOLS, day_symbol_key
from assets.training import champion_model, trained_model
from orchestration.resources import resources_from_env
from sensors.backtests import backtest_models, backtest_new_challengers
from sensors.broker_data import drain_broker_data
from sensors.labels import labels_follow_candles
from sensors.ledger import drain_ledger
from sensors.training import retrain_on_new_features, sync_model_specs, train_models, weekly_retrain

ingest_market_data = define_asset_job(
    "ingest_market_data",
    selection=AssetSelection.assets(market_ticks, vendor_candles, aggregates),
    description="Ticks of symbol-days from their vendors (gaps filled from backups), vendor bars where ticks lack, then "
                "candles; a range of days runs as one run.",
)
ingest_fred = define_asset_job("ingest_fred", selection=AssetSelection.assets(external_fred_indicators))
ingest_commodities = define_asset_job("ingest_commodities", selection=AssetSelection.assets(external_commodity_prices))
ingest_calendar = define_asset_job("ingest_calendar", selection=AssetSelection.assets(external_economic_calendar))


def _range_tags(first: str, last: str) -> dict[str, str]:
    """One run over a partition range (the assets' single-run backfill policy)."""
    return {"dagster/asset_partition_range_start": first, "dagster/asset_partition_range_end": last}


@schedule(cron_schedule="15 0 * * *", job=ingest_market_data, execution_timezone="UTC")
def daily_market_data(context: ScheduleEvaluationContext):
    """Shortly after each UTC day closes, ingest it for every registered symbol."""
    day = (context.scheduled_execution_time - timedelta(days=1)).date()
    for symbol in context.instance.get_dynamic_partitions(SYMBOLS.name):
        yield RunRequest(run_key=f"{day.isoformat()}|{symbol}", partition_key=day_symbol_key(day, symbol))


@schedule(cron_schedule="0 6 * * 1", job=ingest_fred, execution_timezone="UTC")
def weekly_fred(context: ScheduleEvaluationContext):
    """Monday 06:00 UTC: the week (Sunday to Sunday) that just ended, every release in it."""
    today = context.scheduled_execution_time.date()
    week = (today - timedelta(days=(today.weekday() + 1) % 7 + 7)).isoformat()
    return RunRequest(run_key=week, partition_key=week)


@schedule(cron_schedule="0 6 * * *", job=ingest_commodities, execution_timezone="UTC")
def daily_commodities(context: ScheduleEvaluationContext):
    """06:00 UTC: yesterday's closes, settled after midnight New York."""
    day = (context.scheduled_execution_time - timedelta(days=1)).date().isoformat()
    return RunRequest(run_key=day, partition_key=day)


@schedule(cron_schedule="20 0 * * *", job=ingest_calendar, execution_timezone="UTC")
def daily_calendar(context: ScheduleEvaluationContext):
    """00:20 UTC: yesterday (its actuals) through the coming week (schedule and forecasts)."""
    now = context.scheduled_execution_time
    first = (now - timedelta(days=1)).date().isoformat()
    last = (now + timedelta(days=6)).date().isoformat()
    return RunRequest(run_key=f"{first}..{last}", tags=_range_tags(first, last))


defs = Definitions(
    assets=[market_ticks, vendor_candles, aggregates, ml_features,
            external_fred_indicators, external_commodity_prices, external_economic_calendar, external_update,
            backtest,
            *BROKER_ASSETS, trained_model, champion_model,
            model_backtest],
    jobs=[ingest_market_data, ingest_fred, ingest_commodities, ingest_calendar, train_models,
          backtest_models],
    schedules=[daily_market_data, weekly_fred, daily_commodities, daily_calendar, weekly_retrain],
    sensors=[labels_follow_candles, retrain_on_new_features, sync_model_specs,
             backtest_new_challengers, drain_broker_data, drain_ledger],
    resources=resources_from_env(),
)
