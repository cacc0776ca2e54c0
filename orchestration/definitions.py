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

from assets.features import ml_features
from assets.market_data import aggregates, market_ticks
from assets.partitions import SYMBOLS, day_symbol_key
from orchestration.resources import resources_from_env

ingest_market_data = define_asset_job(
    "ingest_market_data",
    selection=AssetSelection.assets(market_ticks, aggregates),
    description="Ticks of one symbol-day from the vendor, validated, then its candles.",
)


@schedule(cron_schedule="15 0 * * *", job=ingest_market_data, execution_timezone="UTC")
def daily_market_data(context: ScheduleEvaluationContext):
    """Shortly after each UTC day closes, ingest it for every registered symbol."""
    day = (context.scheduled_execution_time - timedelta(days=1)).date()
    for symbol in context.instance.get_dynamic_partitions(SYMBOLS.name):
        yield RunRequest(run_key=f"{day.isoformat()}|{symbol}", partition_key=day_symbol_key(day, symbol))


defs = Definitions(
    assets=[market_ticks, aggregates, ml_features],
    jobs=[ingest_market_data],
    schedules=[daily_market_data],
    resources=resources_from_env(),
)
