"""The user's broker data: its quotes per minute (kept after the raw quotes expire), its
spread and prices against the data vendor's, and the user's trades against the system's
predictions. Thin: read the tables, call :mod:`models.broker.analysis`, report."""


from datetime import UTC, datetime, timedelta

import polars as pl
from dagster import AssetExecutionContext, AutomationCondition, Config, MaterializeResult, MetadataValue, asset

from models.broker.analysis import predictions_vs_trades, price_deviation, quote_minutes, spread_by_hour
from models.market.instruments import instrument
from models.market.timeframes import Timeframe
from resources.warehouse.commits import visible
from resources.warehouse import WarehouseResource
from resources.warehouse.broker import read_quote_minutes, read_quotes, read_trades, write_quote_minutes
from resources.warehouse.market import read_bars

GROUP = "broker"


class BrokerWindow(Config):
    days: int = 30  # how far back the comparison looks


class PredictionWindow(Config):
    days: int = 90
    stale_bars: int = 2  # a prediction older than this many of its bars does not count for a trade


def _md(frame: pl.DataFrame, digits: int = 6) -> MetadataValue:
    if frame.is_empty():
        return MetadataValue.md("_no rows_")
    rounded = frame.with_columns(pl.col(pl.Float64).round(digits))
    head = "| " + " | ".join(rounded.columns) + " |\n|" + "---|" * len(rounded.columns) + "\n"
    return MetadataValue.md(head + "\n".join("| " + " | ".join("" if v is None else str(v) for v in row) + " |"
                                             for row in rounded.iter_rows()))


@asset(group_name=GROUP, automation_condition=AutomationCondition.on_cron("*/30 * * * *"),
       description="The broker's quotes per minute (last bid/ask, spread mean and max): rolled up from broker_quotes "
                   "before they expire (24 h); the most complete version of each minute wins.")
def broker_quotes_m1(context: AssetExecutionContext, warehouse: WarehouseResource) -> MaterializeResult:
    minutes = quote_minutes(read_quotes(warehouse))
    written = write_quote_minutes(warehouse, minutes)
    return MaterializeResult(metadata={
        "dagster/row_count": written, "symbols": MetadataValue.json(sorted(minutes["symbol"].unique().to_list())),
        "first_minute": str(minutes["ts"].min()) if written else "", "last_minute": str(minutes["ts"].max()) if written else "",
    })


def _vendor_minutes(warehouse: WarehouseResource, symbols: list[str], start: datetime, end: datetime) -> pl.DataFrame:
    frames = [read_bars(warehouse, s, Timeframe.M1, start, end) for s in symbols]
    frames = [f for f in frames if not f.is_empty()]
    return pl.concat(frames) if frames else pl.DataFrame(schema={"symbol": pl.String, "ts": pl.Datetime("ms", "UTC"),
                                                                  "close": pl.Float64, "spread_mean": pl.Float64})


@asset(group_name=GROUP, deps=[broker_quotes_m1, "aggregates"], automation_condition=AutomationCondition.eager(),
       description="The broker's spread against the vendor's (aggregates.spread_mean, M1) by UTC hour of day, on the "
                   "minutes both have, and the broker's mid against the vendor's close.")
def broker_vs_vendor(context: AssetExecutionContext, config: BrokerWindow, warehouse: WarehouseResource) -> MaterializeResult:
    end = datetime.now(UTC)
    start = end - timedelta(days=config.days)
    broker = read_quote_minutes(warehouse, start, end)
    symbols = sorted(broker["symbol"].unique().to_list())
    vendor = _vendor_minutes(warehouse, symbols, start, end)
    hours = spread_by_hour(broker, vendor)
    deviation = price_deviation(broker, vendor, {s: instrument(s).pip for s in symbols})
    overall = {}
    for symbol in symbols:
        rows = hours.filter(pl.col("symbol") == symbol)
        if rows.height:
            weights = rows["minutes"]
            overall[symbol] = float((rows["ratio"] * weights).sum() / weights.sum())
    context.log.info("broker/vendor spread ratio per symbol: %s", overall)
    return MaterializeResult(metadata={
        "minutes_compared": int(hours["minutes"].sum()) if hours.height else 0,
        "spread_ratio": MetadataValue.json({s: round(r, 4) for s, r in overall.items()}),
        "spread_by_hour": _md(hours), "price_deviation": _md(deviation, 8),
    })


@asset(group_name=GROUP, deps=["trained_model"], automation_condition=AutomationCondition.on_cron("0 * * * *"),
       description="The user's trades (broker_trades) against the system's predictions known when each opened: aligned "
                   "or divergent, win rates, the prediction's hit rate.")
def predictions_vs_user_trades(context: AssetExecutionContext, config: PredictionWindow,
                               warehouse: WarehouseResource) -> MaterializeResult:
    end = datetime.now(UTC)
    start = end - timedelta(days=config.days)
    trades = read_trades(warehouse, start, end)
    exists = warehouse.query_frame("SELECT count() AS n FROM system.tables WHERE database = currentDatabase() "
                                   "AND name = 'model_predictions'")["n"][0]
    if not exists or trades.is_empty():
        reason = "no model_predictions table yet (train a model)" if not exists else "no trades in the window"
        return MaterializeResult(metadata={"trades": 0, "note": reason})
    symbols = sorted(trades["symbol"].unique().to_list())
    predictions = warehouse.query_frame(
        "SELECT model_name, model_version, symbol, timeframe, ts, close_ts, fold, target, prediction, prob_up, feature_set "
        "FROM model_predictions WHERE symbol IN {symbols:Array(String)} AND close_ts >= {start:DateTime('UTC')} "
        f"AND close_ts < {{end:DateTime('UTC')}} AND {visible('model_predictions')}",
        {"symbols": symbols, "start": start - timedelta(days=1), "end": end},
    )
    if predictions.is_empty():
        return MaterializeResult(metadata={"trades": trades.height, "note": "no predictions for the traded symbols"})
    predictions = predictions.with_columns(
        pl.from_epoch(pl.col(c).cast(pl.Int64), time_unit="s").dt.replace_time_zone("UTC")
        for c in ("ts", "close_ts") if predictions[c].dtype.is_integer())
    per_trade, summary = predictions_vs_trades(trades, predictions, config.stale_bars)
    return MaterializeResult(metadata={"trades": per_trade.height, "summary": _md(summary, 4),
                                       "by_trade": _md(per_trade.head(50), 5)})


BROKER_ASSETS = [broker_quotes_m1, broker_vs_vendor, predictions_vs_user_trades]
