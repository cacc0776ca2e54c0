"""A separate OS process that uses the embedded warehouse (for the concurrency tests).

usage: python -m tests.warehouse_worker write PATH DATABASE SYMBOL FIRST_DAY DAYS
       python -m tests.warehouse_worker hold PATH DATABASE SECONDS
"""

from __future__ import annotations

import sys
import time
from datetime import UTC, date, datetime, timedelta

import polars as pl

from models.market.quality import validate_ticks
from models.market.synthetic import generate_ticks
from resources.warehouse import WarehouseResource
from resources.warehouse.market import write_ticks


def main(argv: list[str]) -> int:
    action, path, database = argv[:3]
    warehouse = WarehouseResource(embedded_path=path, database=database, lock_timeout_s=120)
    if action == "hold":
        with warehouse.connect() as client:
            client.command("SELECT 1")
            print("holding", flush=True)
            time.sleep(float(argv[3]))
        return 0
    symbol, first, days = argv[3], date.fromisoformat(argv[4]), int(argv[5])
    for offset in range(days):
        day = first + timedelta(days=offset)
        start = datetime(day.year, day.month, day.day, tzinfo=UTC)
        checked = validate_ticks(generate_ticks(symbol, day), symbol, start, start + timedelta(days=1))
        write_ticks(warehouse, symbol, [day], checked.clean, checked.quarantine.with_columns(pl.lit(day).alias("day")))
        print(f"{symbol} {day} {checked.clean.height}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
