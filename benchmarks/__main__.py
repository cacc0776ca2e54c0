"""Run every benchmark: ``python -m benchmarks [--quick]``; prints a table, writes JSON."""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

from benchmarks.candles import bench_candles
from benchmarks.features import bench_features
from benchmarks.training import bench_training
from benchmarks.vendors import bench_vendors
from benchmarks.warehouse import bench_warehouse


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("--quick", action="store_true", help="smaller inputs, for a smoke run")
    args = parser.parse_args()
    results = {
        "machine": {"python": platform.python_version(), "cpu": platform.processor() or platform.machine()},
        "candles": bench_candles(quick=args.quick),
        "warehouse": bench_warehouse(quick=args.quick),
        "features": bench_features(quick=args.quick),
        "vendors": bench_vendors(quick=args.quick),
        "training": bench_training(quick=args.quick),
    }
    out = Path(__file__).parent / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwritten: {out / 'latest.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
