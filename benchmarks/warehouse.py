"""Tick insert/read throughput on the embedded ClickHouse engine (chDB via clickhouse-connect).

tradeforge writes Arrow batches (``insert_arrow``); the baseline is clickhouse-connect's
row-oriented ``insert`` of Python rows, the route a naive integration takes.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import timedelta

import polars as pl

from benchmarks.common import best_of, synthetic_ticks
from resources.warehouse import WarehouseResource
from resources.warehouse.market import TICK_COLUMNS, read_ticks, write_ticks


def bench_warehouse(quick: bool = False) -> dict[str, float]:
    rows = 200_000 if quick else 1_000_000
    ticks = synthetic_ticks("EURUSD", rows).with_row_index("seq").with_columns(pl.col("seq").cast(pl.UInt32))
    start, end = ticks["ts"].min(), ticks["ts"].max() + timedelta(milliseconds=1)
    quarantine = ticks.head(0).with_columns(reason=pl.lit("x"))
    root = tempfile.mkdtemp(prefix="tradeforge-bench-")
    try:
        warehouse = WarehouseResource(embedded_path=root)
        warehouse.migrate()
        arrow_s = best_of(lambda: write_ticks(warehouse, "EURUSD", start, end, ticks, quarantine))
        read_s = best_of(lambda: read_ticks(warehouse, "EURUSD", start, end))
        assert read_ticks(warehouse, "EURUSD", start, end).height == rows
        python_rows = ticks.select(TICK_COLUMNS).rows()
        baseline_rows = python_rows[: rows // 5]

        def row_insert() -> None:
            with warehouse.connect() as client:
                client.command("TRUNCATE TABLE market_ticks")
                client.insert("market_ticks", baseline_rows, column_names=TICK_COLUMNS)

        rows_s = best_of(row_insert, repeat=2)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    arrow_rate, row_rate = rows / arrow_s, len(baseline_rows) / rows_s
    print(f"warehouse (embedded chDB): {rows:,} ticks")
    print(f"  replace partition, Arrow insert {arrow_rate / 1e6:8.2f} M rows/s")
    print(f"  read back to polars             {rows / read_s / 1e6:8.2f} M rows/s")
    print(f"  baseline: row insert            {row_rate / 1e6:8.2f} M rows/s  ({len(baseline_rows):,} rows)")
    print(f"  Arrow vs row insert             {arrow_rate / row_rate:8.1f} x")
    return {
        "ticks": rows,
        "arrow_insert_rows_per_second": round(arrow_rate),
        "read_rows_per_second": round(rows / read_s),
        "row_insert_rows_per_second": round(row_rate),
        "speedup_vs_row_insert": round(arrow_rate / row_rate, 1),
    }
