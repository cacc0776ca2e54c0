"""The tick schema shared by vendors, validation, the warehouse and candle aggregation.

A tick is a quote (``bid``/``ask`` with optional sizes) or a trade (``price``/``size``), or
both at once (a trade printed with the prevailing quote). Its reference price is the trade
price where there is one, else the quote mid. ``vendor_seq`` is the vendor's own id or
sequence number of the row where it has one: the only thing that makes two rows duplicates
(identical prints at one timestamp are separate fills).
"""

from __future__ import annotations

import polars as pl

TS = pl.Datetime("ms", "UTC")

TICK_SCHEMA: dict[str, pl.DataType] = {
    "symbol": pl.String(),
    "ts": TS,
    "bid": pl.Float64(),
    "ask": pl.Float64(),
    "bid_size": pl.Float64(),
    "ask_size": pl.Float64(),
    "price": pl.Float64(),
    "size": pl.Float64(),
    "vendor_seq": pl.Int64(),
    "source": pl.String(),
}


class MalformedTicksError(ValueError):
    """A vendor payload that cannot be read as ticks at all (rows that can are validated)."""


def empty_ticks() -> pl.DataFrame:
    return pl.DataFrame(schema=TICK_SCHEMA)


def conform_ticks(frame: pl.DataFrame) -> pl.DataFrame:
    """Cast a vendor frame to :data:`TICK_SCHEMA`: missing optional columns become null.

    Raises :class:`MalformedTicksError` naming what is wrong: no timestamps or symbol, or a
    column that will not cast to its type.
    """
    missing = {"symbol", "ts"} - set(frame.columns)
    if missing:
        raise MalformedTicksError(f"tick frame lacks required column(s) {sorted(missing)}; has {frame.columns}")
    columns = []
    for name, dtype in TICK_SCHEMA.items():
        if name not in frame.columns:
            columns.append(pl.lit(None, dtype=dtype).alias(name))
        elif name == "ts":
            columns.append(_as_utc_ms(frame.schema["ts"]).alias("ts"))
        else:
            columns.append(pl.col(name).cast(dtype))
    try:
        return frame.select(columns)
    except pl.exceptions.PolarsError as exc:  # e.g. prices sent as text that is not a number
        raise MalformedTicksError(f"tick frame does not fit the tick schema: {exc}") from exc


def _as_utc_ms(dtype: pl.DataType) -> pl.Expr:
    ts = pl.col("ts")
    if isinstance(dtype, pl.Datetime):
        ts = ts.dt.replace_time_zone("UTC") if dtype.time_zone is None else ts.dt.convert_time_zone("UTC")
        return ts.dt.cast_time_unit("ms")
    raise MalformedTicksError(f"tick column 'ts' must be a datetime, got {dtype}")

