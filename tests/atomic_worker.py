"""A fork server for the crash test: imports everything once, then for each command forks a
child that re-materializes partitions through Dagster, so the test can kill -9 a child at a
random moment without paying the import for each of the twenty kills.

commands on stdin (one per line):
  once GEN   a child materializes generation GEN and exits; prints "done GEN" when it has
  loop GEN   a child materializes GEN, GEN+1, ... until killed; prints "child PID" at once
  quit
A generation is the synthetic market with seed 100 + GEN % 2: two different contents, so a
reader seeing one, the other, none or both can be told apart.
"""

from __future__ import annotations

import os
import signal
import sys
from datetime import date

from dagster import DagsterInstance

from assets.features import ml_features
from assets.market_data import aggregates, market_ticks
from assets.partitions import SYMBOLS
from orchestration.runs import run_days
from resources.conventions import MarketConventionsResource
from resources.market_data import MarketDataResource, SyntheticMarketResource
from resources.warehouse import WarehouseResource

SYMBOL, FIRST, LAST = "BTCUSD", date(2024, 3, 6), date(2024, 3, 7)


def materialize(path: str, database: str, generation: int) -> None:
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(SYMBOLS.name, [SYMBOL])
    resources = {
        "warehouse": WarehouseResource(embedded_path=path, database=database, lock_timeout_s=60),
        "market_data": MarketDataResource(synthetic=SyntheticMarketResource(seed=100 + generation % 2, tick_rate_scale=0.1)),
        "conventions": MarketConventionsResource(feature_timeframes=["M5"]),
    }
    report = run_days(instance, resources, [market_ticks, aggregates, ml_features], SYMBOL, FIRST, LAST)
    if not report.success:
        raise SystemExit(f"generation {generation} failed: {report.failure}")


def main(path: str, database: str) -> int:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    print("ready", flush=True)
    for line in sys.stdin:
        command, *rest = line.split()
        if command == "quit":
            return 0
        generation = int(rest[0])
        pid = os.fork()
        if pid == 0:  # the child: write, and never return into the server's loop
            try:
                if command == "once":
                    materialize(path, database, generation)
                    print(f"done {generation}", flush=True)
                else:
                    while True:
                        materialize(path, database, generation)
                        generation += 1
            finally:
                os._exit(0)
        if command == "loop":
            print(f"child {pid}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))
