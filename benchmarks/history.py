"""Years of history end to end: M1 bar files of one pair -> `tradeforge import` (validate,
normalise) -> vendor_candles -> aggregates -> ml_features (M5, H1), as range runs (one run
per stage for the whole history), each stage in its own process so its peak memory is its
own; beside it, in the same run, the per-day path (one run per day, as before range runs)
on days of a second symbol in the same, full warehouse, extrapolated to the same history.

The bars are a random walk over the FX week's open minutes in HistData's M1 format (Eastern
Standard Time, one file per year), the layout most free archives come in.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl

STAGES = ("import", "market_ticks", "vendor_candles", "aggregates", "ml_features")
SYMBOL, BASELINE_SYMBOL = "EURUSD", "EURGBP"


def write_histdata_years(folder: Path, first_year: int, years: int, seed: int = 1) -> tuple[list[Path], int]:
    """One HistData M1 file per year of EURUSD-like bars over the open FX minutes."""
    from models.market.instruments import AssetClass
    from models.market.sessions import trading_open

    rng = np.random.default_rng(seed)
    files, rows, price = [], 0, 1.10
    for year in range(first_year, first_year + years):
        minutes = pl.datetime_range(datetime(year, 1, 1, tzinfo=UTC), datetime(year + 1, 1, 1, tzinfo=UTC), "1m",
                                    closed="left", time_unit="ms", time_zone="UTC", eager=True).to_frame("ts")
        minutes = minutes.filter(trading_open(pl.col("ts"), AssetClass.FX))
        n = minutes.height
        steps = rng.standard_t(5, n) * 0.00012
        close = price * np.exp(np.cumsum(steps))
        price = float(close[-1])
        open_ = np.r_[close[0] / np.exp(steps[0]), close[:-1]]
        wick = np.abs(rng.normal(0, 0.00006, (2, n)))
        frame = minutes.with_columns(
            pl.col("ts").dt.convert_time_zone("Etc/GMT+5").dt.strftime("%Y%m%d %H%M%S").alias("when"),
            pl.Series("open", open_), pl.Series("high", np.maximum(open_, close) * (1 + wick[0])),
            pl.Series("low", np.minimum(open_, close) * (1 - wick[1])), pl.Series("close", close),
        )
        path = folder / f"DAT_ASCII_EURUSD_M1_{year}.csv"
        frame.select(pl.format("{};{};{};{};{};0", "when", *(pl.col(c).round(6) for c in ("open", "high", "low", "close")))
                     ).write_csv(path, include_header=False, quote_style="never")
        files.append(path)
        rows += n
    return files, rows


def _stage(name: str, home: str, files: list[str], symbol: str, first: str, last: str) -> dict:
    """One stage in this process (run by a child): its seconds and the process's peak RSS."""
    os.environ["TRADEFORGE_HOME"] = home
    from assets.features import ml_features
    from assets.market_data import aggregates, market_ticks, vendor_candles
    from orchestration import cli
    from orchestration.runs import run_days

    started = time.perf_counter()
    if name == "import":
        assert cli.main(["import", *files, "--symbol", symbol, "--no-ingest"]) == 0
        result: dict = {}
    else:
        from assets.partitions import SYMBOLS
        from orchestration.resources import resources_from_env
        from resources.market_data import MarketDataResource
        from resources.vendors.files import FileImportResource

        instance = cli._instance()
        instance.add_dynamic_partitions(SYMBOLS.name, [symbol])
        resources = resources_from_env()
        resources["market_data"] = MarketDataResource(files=FileImportResource(), primary="files")
        asset = {"market_ticks": market_ticks, "vendor_candles": vendor_candles, "aggregates": aggregates,
                 "ml_features": ml_features}[name]
        report = run_days(instance, resources, [asset], symbol, date.fromisoformat(first), date.fromisoformat(last))
        assert report.success, report.failure
        result = {k: v for k, v in report.metadata[name].items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return {"seconds": round(time.perf_counter() - started, 2),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024), **result}


def _per_day(home: str, symbol: str, days: list[str]) -> dict:
    """The per-day path: one run per day of every stage, as the UI did before range runs."""
    os.environ["TRADEFORGE_HOME"] = home
    from assets.features import ml_features
    from assets.market_data import aggregates, market_ticks, vendor_candles
    from assets.partitions import SYMBOLS
    from orchestration import cli
    from orchestration.resources import resources_from_env
    from orchestration.runs import run_days
    from resources.market_data import MarketDataResource
    from resources.vendors.files import FileImportResource

    instance = cli._instance()
    instance.add_dynamic_partitions(SYMBOLS.name, [symbol])
    resources = resources_from_env()
    resources["market_data"] = MarketDataResource(files=FileImportResource(), primary="files")
    started, rss = time.perf_counter(), []
    for day in map(date.fromisoformat, days):
        report = run_days(instance, resources, [market_ticks, vendor_candles, aggregates, ml_features], symbol, day, day)
        assert report.success, report.failure
        rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {"seconds": round(time.perf_counter() - started, 2), "days": len(days),
            "peak_rss_mb": round(rss[-1]), "rss_growth_mb_per_day": round((rss[-1] - rss[0]) / max(len(rss) - 1, 1), 2)}


def _child(kind: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.history", kind, *args], capture_output=True, text=True,
                         cwd=Path(__file__).resolve().parents[1])
    if out.returncode:
        raise RuntimeError(f"{kind} {args[:1]} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_history(quick: bool = False) -> dict:
    years = 1 if quick else 10
    first_year = 2014
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        home, data = root / "home", root / "files"
        data.mkdir()
        t0 = time.perf_counter()
        files, rows = write_histdata_years(data, first_year, years)
        print(f"history: {years} years of {SYMBOL} M1 bars, {rows:,} rows in {len(files)} HistData files "
              f"({sum(f.stat().st_size for f in files) / 1e6:.0f} MB, written in {time.perf_counter() - t0:.0f}s)")
        first, last = date(first_year, 1, 1), date(first_year + years, 1, 1) - timedelta(days=1)
        stages = {}
        for stage in STAGES:
            stages[stage] = _child("stage", stage, str(home), json.dumps([str(f) for f in files]), SYMBOL,
                                   first.isoformat(), last.isoformat())
            print(f"  {stage:<15} {stages[stage]['seconds']:8.1f} s  peak {stages[stage]['peak_rss_mb']:6,} MB")
        total = sum(s["seconds"] for s in stages.values())
        print(f"  {'total':<15} {total:8.1f} s  ({(last - first).days + 1:,} days; goal < 600 s and < 4,096 MB)")
        # the per-day path on the same warehouse (full of history), for a sample of days
        _child("stage", "import", str(home), json.dumps([str(files[-1])]), BASELINE_SYMBOL, "", "")
        sample = [(date(first_year + years - 1, 3, 4) + timedelta(days=i)).isoformat() for i in range(5 if quick else 10)]
        per_day = _child("per_day", str(home), BASELINE_SYMBOL, json.dumps(sample))
        day_cost = per_day["seconds"] / per_day["days"]
        extrapolated = day_cost * ((last - first).days + 1)
        print(f"  per-day runs    {day_cost:8.2f} s/day on the full warehouse -> {extrapolated / 60:,.0f} min for the same "
              f"history (lower bound), memory +{per_day['rss_growth_mb_per_day']} MB/run in one process")
        print(f"  range runs are {extrapolated / total:,.0f}x faster end to end")
        return {"years": years, "m1_rows": rows, "stages": stages, "total_seconds": round(total, 1),
                "per_day": per_day, "per_day_seconds_per_day": round(day_cost, 2),
                "per_day_extrapolated_seconds": round(extrapolated), "speedup": round(extrapolated / total, 1)}


if __name__ == "__main__":
    kind, *rest = sys.argv[1:]
    if kind == "stage":
        name, home, files, symbol, first, last = rest
        print(json.dumps(_stage(name, home, json.loads(files), symbol, first, last)))
    elif kind == "per_day":
        home, symbol, days = rest
        print(json.dumps(_per_day(home, symbol, json.loads(days))))
    else:
        print(json.dumps(bench_history(quick="--quick" in rest), indent=2))
