"""How the user's broker compares with the data vendor, and the user's trades with the
system's predictions. Pure (polars in, polars out); the assets in ``assets/broker.py`` read
and report.

- :func:`quote_minutes`: the broker's quotes per minute (last bid/ask, spread mean and max),
  the form they are kept in once the raw quotes expire.
- :func:`spread_by_hour`: the broker's spread against the vendor's (``aggregates.spread_mean``
  of M1 bars) by hour of day (UTC), on the minutes both have, so quiet hours of one side do
  not weigh on the other.
- :func:`price_deviation`: the broker's mid at the end of each minute against the vendor's
  (the M1 bar's close, which is the mid), in price, pips and basis points.
- :func:`predictions_vs_trades`: each trade the user opened, beside the latest prediction
  known when it opened (a bar's prediction is known at its close, never before), aligned or
  divergent, and what the trade made.
"""

from __future__ import annotations

from collections.abc import Mapping

import polars as pl

from models.market.timeframes import Timeframe


def quote_minutes(quotes: pl.DataFrame) -> pl.DataFrame:
    """``server, symbol, ts, bid, ask`` -> one row per (server, symbol, minute): the minute's
    last bid/ask and mid, its mean and largest spread, the quotes counted."""
    if quotes.is_empty():
        return pl.DataFrame(schema={"server": pl.String, "symbol": pl.String, "ts": pl.Datetime("ms", "UTC"),
                                    "bid_close": pl.Float64, "ask_close": pl.Float64, "mid_close": pl.Float64,
                                    "spread_mean": pl.Float64, "spread_max": pl.Float64, "quotes": pl.UInt32})
    return (
        quotes.sort("server", "symbol", "ts")
        .with_columns((pl.col("ask") - pl.col("bid")).alias("spread"), pl.col("ts").dt.truncate("1m").alias("minute"))
        .group_by("server", "symbol", "minute", maintain_order=True)
        .agg(pl.col("bid").last().alias("bid_close"), pl.col("ask").last().alias("ask_close"),
             pl.col("spread").mean().alias("spread_mean"), pl.col("spread").max().alias("spread_max"),
             pl.len().cast(pl.UInt32).alias("quotes"))
        .with_columns(((pl.col("bid_close") + pl.col("ask_close")) / 2).alias("mid_close"))
        .rename({"minute": "ts"})
        .select("server", "symbol", "ts", "bid_close", "ask_close", "mid_close", "spread_mean", "spread_max", "quotes")
    )


def _matched(broker_m1: pl.DataFrame, vendor_m1: pl.DataFrame) -> pl.DataFrame:
    """Minutes both sides have: broker minute rows joined with the vendor's M1 bar of that minute."""
    vendor = vendor_m1.select("symbol", pl.col("ts").dt.cast_time_unit("ms").dt.replace_time_zone("UTC"),
                              pl.col("close").alias("vendor_mid"), pl.col("spread_mean").alias("vendor_spread"))
    broker = broker_m1.with_columns(pl.col("ts").dt.cast_time_unit("ms").dt.replace_time_zone("UTC"))
    return broker.join(vendor, on=["symbol", "ts"], how="inner")


def spread_by_hour(broker_m1: pl.DataFrame, vendor_m1: pl.DataFrame) -> pl.DataFrame:
    """Per symbol and UTC hour of day: the broker's mean spread (quote-weighted), the vendor's
    mean ``spread_mean``, their ratio and difference, over the minutes both sides have."""
    both = _matched(broker_m1, vendor_m1).filter(pl.col("vendor_spread").is_not_null())
    return (
        both.with_columns(pl.col("ts").dt.hour().alias("hour"))
        .group_by("symbol", "hour")
        .agg(((pl.col("spread_mean") * pl.col("quotes")).sum() / pl.col("quotes").sum()).alias("broker_spread"),
             pl.col("vendor_spread").mean().alias("vendor_spread"), pl.len().alias("minutes"))
        .with_columns((pl.col("broker_spread") / pl.col("vendor_spread")).alias("ratio"),
                      (pl.col("broker_spread") - pl.col("vendor_spread")).alias("difference"))
        .sort("symbol", "hour")
    )


def price_deviation(broker_m1: pl.DataFrame, vendor_m1: pl.DataFrame, pips: Mapping[str, float]) -> pl.DataFrame:
    """Per symbol: the broker's end-of-minute mid minus the vendor's M1 close, on the minutes
    both have: mean, mean absolute, 95th percentile and largest absolute, also in pips and bps."""
    both = _matched(broker_m1, vendor_m1).with_columns((pl.col("mid_close") - pl.col("vendor_mid")).alias("deviation"))
    pip = pl.col("symbol").replace_strict(dict(pips), default=None, return_dtype=pl.Float64)
    return (
        both.group_by("symbol")
        .agg(pl.len().alias("minutes"), pl.col("deviation").mean().alias("mean"), pl.col("deviation").abs().mean().alias("mean_abs"),
             pl.col("deviation").abs().quantile(0.95, "linear").alias("p95_abs"), pl.col("deviation").abs().max().alias("max_abs"),
             (pl.col("deviation").abs() / pl.col("vendor_mid")).mean().mul(1e4).alias("mean_abs_bps"))
        .with_columns((pl.col("mean") / pip).alias("mean_pips"), (pl.col("mean_abs") / pip).alias("mean_abs_pips"))
        .sort("symbol")
    )


_GROUP = ["model_name", "model_version", "timeframe", "target"]


def predictions_vs_trades(trades: pl.DataFrame, predictions: pl.DataFrame,
                          stale_bars: int = 2) -> tuple[pl.DataFrame, pl.DataFrame]:
    """The user's trades against the system's predictions.

    ``trades``: the deals of ``broker_trades`` (``deal, position_id, ts, symbol, side, entry,
    profit, commission, swap, fee``). A trade is a position: its opening deal (entry ``in`` or
    ``inout``) gives the time and direction, its closing deals (``out``, ``inout``,
    ``out_by``) the result (profit, commission, swap and fee summed; null while it is open).
    ``predictions``: ``model_predictions`` rows. Each trade meets, per model, the latest
    prediction whose bar had closed when the trade opened (``close_ts <= ts``), if that bar
    closed within ``stale_bars`` bars of it. Its side: ``prob_up`` above or below 0.5 where
    given, else the sign of ``prediction``.

    Returns (per trade and model, summary per model): ``aligned`` (the trade went the
    predicted way), ``won`` (net result > 0); the summary counts aligned and divergent trades,
    their win rates, and the prediction's hit rate on the closed trades (right when an aligned
    trade won or a divergent one lost)."""
    opens = (trades.filter(pl.col("entry").is_in(["in", "inout"]))
             .sort("ts", "deal").group_by("position_id", maintain_order=True)
             .agg(pl.col("ts").first(), pl.col("symbol").first(), pl.col("side").first(), pl.col("deal").first()))
    closes = (trades.filter(pl.col("entry").is_in(["out", "inout", "out_by"]))
              .with_columns((pl.col("profit") + pl.col("commission") + pl.col("swap") + pl.col("fee")).alias("net"))
              .group_by("position_id").agg(pl.col("net").sum().alias("close_net")))
    entry_costs = (trades.filter(pl.col("entry") == "in").group_by("position_id")
                   .agg((pl.col("commission") + pl.col("fee")).sum().alias("entry_costs")))
    positions = (opens.join(closes, on="position_id", how="left").join(entry_costs, on="position_id", how="left")
                 .with_columns((pl.col("close_net") + pl.col("entry_costs").fill_null(0.0)).alias("result"))
                 .drop("close_net", "entry_costs")
                 .with_columns(pl.col("ts").dt.cast_time_unit("ms").dt.replace_time_zone("UTC"))
                 .sort("ts"))
    preds = (predictions
             .with_columns(pl.col("close_ts").dt.cast_time_unit("ms").dt.replace_time_zone("UTC"),
                           pl.when(pl.col("prob_up").is_not_null())
                           .then(pl.when(pl.col("prob_up") > 0.5).then(1).when(pl.col("prob_up") < 0.5).then(-1).otherwise(0))
                           .otherwise(pl.col("prediction").sign()).cast(pl.Int8).alias("predicted_side"),
                           pl.col("timeframe").replace_strict({tf.value: tf.minutes for tf in Timeframe}, default=None,
                                                              return_dtype=pl.Int64).alias("tf_minutes"))
             .sort("close_ts"))
    rows = []
    for key, group in preds.group_by(_GROUP, maintain_order=True):
        joined = positions.join_asof(group.select("symbol", "close_ts", "ts", "prediction", "prob_up", "predicted_side",
                                                  "tf_minutes"),
                                     left_on="ts", right_on="close_ts", by="symbol", strategy="backward", suffix="_bar",
                                     check_sortedness=False)  # both sorted by time above
        joined = joined.filter(pl.col("close_ts").is_not_null()
                               & (pl.col("ts") - pl.col("close_ts") <= pl.duration(minutes=pl.col("tf_minutes") * stale_bars)))
        rows.append(joined.with_columns(*(pl.lit(v).alias(k) for k, v in zip(_GROUP, key))))
    schema_cols = [*_GROUP, "position_id", "deal", "symbol", "ts", "side", "close_ts", "prediction", "prob_up",
                   "predicted_side", "aligned", "result", "won"]
    if not rows or all(r.is_empty() for r in rows):
        empty = pl.DataFrame(schema={c: pl.Null for c in schema_cols})
        return empty, pl.DataFrame(schema={**{c: pl.String for c in _GROUP}, "trades": pl.UInt32})
    per_trade = (pl.concat([r for r in rows if not r.is_empty()], how="vertical_relaxed")
                 .filter(pl.col("predicted_side") != 0)
                 .with_columns((pl.col("predicted_side") == pl.col("side")).alias("aligned"),
                               pl.when(pl.col("result").is_null()).then(None).otherwise(pl.col("result") > 0).alias("won"))
                 .select(schema_cols).sort(*_GROUP, "ts"))
    closed = pl.col("won").is_not_null()
    summary = (per_trade.group_by(_GROUP, maintain_order=True)
               .agg(pl.len().alias("trades"), pl.col("aligned").sum().alias("aligned"), (~pl.col("aligned")).sum().alias("divergent"),
                    pl.col("won").filter(pl.col("aligned") & closed).mean().alias("win_rate_aligned"),
                    pl.col("won").filter(~pl.col("aligned") & closed).mean().alias("win_rate_divergent"),
                    (pl.col("aligned") == pl.col("won")).filter(closed).mean().alias("hit_rate"),
                    pl.col("result").filter(pl.col("aligned")).sum().alias("result_aligned"),
                    pl.col("result").filter(~pl.col("aligned")).sum().alias("result_divergent"))
               .with_columns((pl.col("aligned") / pl.col("trades")).alias("aligned_share")))
    return per_trade, summary
