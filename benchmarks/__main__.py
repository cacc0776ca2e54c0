"""Run every benchmark: ``python -m benchmarks [--quick]``; prints a table, writes JSON."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from benchmarks.backtest import bench_backtest
from benchmarks.candles import bench_candles
from benchmarks.features import bench_features
from benchmarks.history import bench_history
from benchmarks.live import bench_live
from benchmarks.training import bench_training
from benchmarks.vendors import bench_vendors
from benchmarks.warehouse import bench_warehouse


BENCHMARKS = {
    "candles": bench_candles,
    "warehouse": bench_warehouse,
    "features": bench_features,
    "vendors": bench_vendors,
    "history": bench_history,
    "training": bench_training,
    "backtest": bench_backtest,
    "live": bench_live,
}


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="smaller inputs, for a smoke run")
    parser.add_argument("--only", nargs="+", choices=sorted(BENCHMARKS), help="run these benchmarks only")
    args = parser.parse_args()
    results: dict = {"machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()}}
    for name, bench in BENCHMARKS.items():
        if not args.only or name in args.only:
            results[name] = bench(quick=args.quick)
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    target = out / ("latest.json" if not args.only else f"latest-{'-'.join(args.only)}.json")
    target.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwritten: {target}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
