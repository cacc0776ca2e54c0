"""The ``tradeforge`` command line.

Every failure is one line on stderr (what, where, what to do) and a non-zero exit, never a
traceback (``TRADEFORGE_DEBUG=1`` shows it); commands that use local state say where it is.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from datetime import date, timedelta
from pathlib import Path

DEMO_SYMBOLS = ("EURUSD", "XAUUSD", "BTCUSD")
# Ten days with a closed FX weekend and the US switch to daylight saving time (2024-03-10).
DEMO_START = date(2024, 3, 4)
DEMO_DAYS = 10
REPOSITORY = Path(__file__).resolve().parents[1]


def _print(message: str = "") -> None:
    print(message, flush=True)


class CommandError(Exception):
    """A failure the user can act on: printed as one line."""


def _state_line() -> None:
    from resources.warehouse import default_home

    where = default_home()
    how = "TRADEFORGE_HOME" if os.environ.get("TRADEFORGE_HOME") else "the current directory's .tradeforge; set TRADEFORGE_HOME to move it"
    _print(f"state: {where} ({how})")


def _warehouse():
    from resources.warehouse import warehouse_from_env

    return warehouse_from_env().process_config_and_initialize()


def cmd_migrate(_: argparse.Namespace) -> int:
    _state_line()
    warehouse = _warehouse()
    applied = warehouse.migrate()
    _print(f"{warehouse.describe()}: " + (f"applied migrations {applied}" if applied else "schema is current"))
    return 0


def _instance():
    from dagster import DagsterInstance

    from orchestration.instance import ensure_dagster_home

    ensure_dagster_home()
    return DagsterInstance.get()


def cmd_symbols(args: argparse.Namespace) -> int:
    from assets.partitions import SYMBOLS
    from models.market.instruments import instrument

    _state_line()
    instance = _instance()
    if args.action == "add":
        symbols = [s.upper() for s in args.symbols]
        for symbol in symbols:
            instrument(symbol)  # an unknown name fails here, before it becomes a partition
        instance.add_dynamic_partitions(SYMBOLS.name, symbols)
    for symbol in instance.get_dynamic_partitions(SYMBOLS.name):
        _print(symbol)
    return 0


def _summary_tables(warehouse, symbols: Sequence[str]) -> str:
    from models.market.timeframes import ALL_TIMEFRAMES
    from resources.warehouse.commits import visible

    params = {"symbols": list(symbols)}
    ticks = warehouse.query_frame(
        "SELECT symbol, count() AS ticks, min(ts) AS first, max(ts) AS last FROM market_ticks "
        f"WHERE symbol IN {{symbols:Array(String)}} AND {visible('market_ticks')} GROUP BY symbol ORDER BY symbol", params)
    quarantined = warehouse.query_frame(
        "SELECT count() AS n FROM market_ticks_quarantine WHERE symbol IN {symbols:Array(String)} "
        f"AND {visible('market_ticks_quarantine')}", params)["n"][0]
    bars = warehouse.query_frame(
        "SELECT symbol, timeframe, count() AS bars FROM (SELECT DISTINCT symbol, timeframe, ts FROM aggregates "
        f"WHERE symbol IN {{symbols:Array(String)}} AND {visible('aggregates')}) GROUP BY symbol, timeframe", params)
    features = warehouse.query_frame(
        "SELECT symbol, timeframe, count() AS n, sum(warm) AS warm, any(feature_set) AS fs FROM ml_features "
        f"WHERE symbol IN {{symbols:Array(String)}} AND {visible('ml_features')} GROUP BY symbol, timeframe "
        "ORDER BY symbol, timeframe", params)
    lines = ["market_ticks", f"  {'symbol':<8} {'ticks':>10}  first .. last"]
    for symbol, n, first, last in ticks.iter_rows():
        lines.append(f"  {symbol:<8} {n:>10,}  {first:%Y-%m-%d %H:%M} .. {last:%Y-%m-%d %H:%M} UTC")
    lines.append(f"  quarantined rows: {quarantined:,}")
    counts = {(s, tf): n for s, tf, n in bars.iter_rows()}
    lines.append("aggregates (bars)")
    lines.append(f"  {'symbol':<8}" + "".join(f"{tf.value:>8}" for tf in ALL_TIMEFRAMES))
    for symbol in symbols:
        lines.append(f"  {symbol:<8}" + "".join(f"{counts.get((symbol, tf.value), 0):>8,}" for tf in ALL_TIMEFRAMES))
    lines.append("ml_features (rows, warm rows, feature set)")
    for symbol, tf, n, warm, version in features.iter_rows():
        lines.append(f"  {symbol:<8} {tf:<4} {n:>7,} {warm:>7,}  {version}")
    return "\n".join(lines)


def _checks_line(report) -> str:
    failed, warned = report.failed_checks, report.warnings
    parts = []
    if failed:
        parts.append("FAILED " + ", ".join(c.label for c in failed))
    if warned:
        parts.append("warnings " + ", ".join(c.label for c in warned))
    return "checks " + ("; ".join(parts) if parts else f"ok ({len(report.checks)})")


def _accounting(report) -> list[str]:
    """What each asset read and kept: every row stored or quarantined."""
    lines = []
    ticks = report.metadata.get("market_ticks")
    if ticks:
        lines.append(f"ticks: read {ticks['received_rows']:,} = stored {ticks['dagster/row_count']:,} "
                     f"+ quarantined {ticks['quarantined_rows']:,} {ticks['quarantine_reasons'] or ''}".rstrip())
    candles = report.metadata.get("vendor_candles")
    if candles and candles["received_rows"]:
        lines.append(f"vendor bars: read {candles['received_rows']:,} = used {candles['dagster/row_count']:,} "
                     f"+ quarantined {candles['quarantined_rows']:,} {candles['quarantine_reasons'] or ''}".rstrip())
    bars = report.metadata.get("aggregates")
    if bars:
        per_tf = ", ".join(f"{k[5:]} {v:,}" for k, v in bars.items() if k.startswith("bars_") and v)
        lines.append(f"bars: {bars['dagster/row_count']:,} ({per_tf or 'none'})")
    features = report.metadata.get("ml_features")
    if features:
        lines.append(f"features: {features['dagster/row_count']:,} rows, {features['warm_rows']:,} warm, "
                     f"feature set {features['feature_set']}")
    return lines


def _print_report(report, indent: str = "  ") -> None:
    for line in _accounting(report):
        _print(f"{indent}{line}")
    _print(f"{indent}{_checks_line(report)}")
    for check in report.warnings + report.failed_checks:
        detail = ", ".join(f"{k}={v}" for k, v in check.metadata.items()
                           if not isinstance(v, str) or len(v) < 80)
        _print(f"{indent}  {'warning' if check.severity == 'WARN' else 'FAILED'}: {check.label} ({detail})")


def cmd_demo(args: argparse.Namespace) -> int:
    from assets.features import ml_features
    from assets.market_data import aggregates, market_ticks, vendor_candles
    from assets.partitions import SYMBOLS, check_days
    from models.market.instruments import instrument
    from orchestration.instance import dagster_home
    from orchestration.resources import resources_from_env
    from orchestration.runs import run_days, show_progress

    started = time.perf_counter()
    symbols = [instrument(s).symbol for s in args.symbols]
    first, last = args.start, args.start + timedelta(days=args.days - 1)
    check_days(first, last)
    _state_line()
    instance = _instance()
    resources = resources_from_env()
    warehouse = resources["warehouse"].process_config_and_initialize()
    _print(f"tradeforge demo: {len(symbols)} symbols x {args.days} days ({first} .. {last})")
    _print(f"  warehouse : {warehouse.describe()}")
    _print(f"  dagster   : {dagster_home()} ({type(instance.run_storage).__name__})")
    applied = warehouse.migrate()
    _print(f"  schema    : {'applied migrations ' + str(applied) if applied else 'current'}")
    instance.add_dynamic_partitions(SYMBOLS.name, symbols)
    show_progress()
    warnings = 0
    for symbol in symbols:
        _print(f"{symbol} {first} .. {last}: market_ticks, vendor_candles, aggregates, ml_features (one run)")
        t0 = time.perf_counter()
        report = run_days(instance, resources, [market_ticks, vendor_candles, aggregates, ml_features], symbol, first, last)
        if not report.success:
            raise CommandError(f"run {report.run_id} of {symbol} failed at {report.failure}")
        _print_report(report)
        _print(f"  {time.perf_counter() - t0:.1f}s")
        warnings += len(report.warnings)
        if report.failed_checks:
            raise CommandError(f"{symbol}: checks failed: {', '.join(c.label for c in report.failed_checks)}")
    _print("")
    with warehouse.session() as session:
        _print(_summary_tables(session, symbols))
    _print(f"done in {time.perf_counter() - started:.1f}s: {len(symbols) * args.days} partitions of market_ticks, "
           f"vendor_candles, aggregates, ml_features" + (f" ({warnings} check warnings above)" if warnings else ""))
    if demo_training(instance, resources, symbols):
        return 1
    if demo_backtest(instance, resources):
        return 1
    if demo_live(resources, last):
        return 1
    _print("")
    _print("Open the Dagster UI on the same data:")
    _print("  make ui        (or: .venv/bin/tradeforge ui)  ->  http://127.0.0.1:3000")
    embedded = resources["bus"].get_client().embedded
    if embedded is not None and embedded.pid_file.exists() and embedded.running():
        _print(f"The embedded nats-server the training events started keeps running on {embedded.url} for the next "
               "commands; `.venv/bin/tradeforge bus stop` stops it.")
    return 0


def _parse_columns(text: str) -> dict[str, str]:
    from resources.vendors.files import KNOWN_NAMES

    mapping = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        ours, sep, theirs = part.partition("=")
        if not sep or not theirs.strip():
            raise CommandError(f"--columns entry {part!r} is not NAME=COLUMN (e.g. ts=Time,bid=Bid,ask=Ask)")
        if ours.strip() not in KNOWN_NAMES:
            raise CommandError(f"--columns: {ours.strip()!r} is no tradeforge column; use {', '.join(KNOWN_NAMES)}")
        mapping[ours.strip()] = theirs.strip()
    if "ts" not in mapping and not {"date", "time"} <= set(mapping):
        raise CommandError("--columns needs the time: ts=COLUMN, or date=COLUMN,time=COLUMN")
    return mapping


def _mapping_of(args: argparse.Namespace):
    """The custom layout of --columns/--mapping, or None for recognised layouts."""
    import yaml

    from resources.vendors.files import ISO, FileLayout

    spec: dict = {}
    if args.mapping:
        path = Path(args.mapping)
        if not path.is_file():
            raise CommandError(f"--mapping {path}: no such file")
        try:
            spec = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise CommandError(f"--mapping {path}: not YAML/JSON ({str(exc).splitlines()[0]})") from None
        if not isinstance(spec, dict) or not isinstance(spec.get("columns"), dict):
            raise CommandError(f"--mapping {path}: expected 'columns: {{ts: ..., bid: ..., ...}}' "
                               "(optional kind, ts_format, separator, timezone, has_header)")
        spec = dict(spec)
        spec["columns"] = _parse_columns(",".join(f"{k}={v}" for k, v in spec["columns"].items()))
    if args.columns:
        spec["columns"] = _parse_columns(args.columns)
    if not spec:
        return None
    columns = spec["columns"]
    kind = args.kind or spec.get("kind") or ("bars" if {"open", "close"} <= set(columns) else "ticks")
    return FileLayout(kind, columns, args.ts_format or spec.get("ts_format", ISO), args.separator or spec.get("separator", ","),
                      bool(spec.get("has_header", True)), args.timezone or spec.get("timezone", "UTC"))


def _validated(path: Path, symbol: str, custom, timezone: str, boundary):
    """Read a whole file as it will be ingested; one clear error naming it if it cannot be.
    Returns (layout name, layout, rows, bar timeframe or None)."""
    from dataclasses import replace

    from assets.partitions import FIRST_DAY, FIRST_DAY_SETTING
    from models.market.timeframes import Timeframe, bar_open_expr
    from resources.vendors.base import VendorPayloadError
    from resources.vendors.files import LAYOUTS, SUFFIXES, bar_timeframe, detect_layout, read_file

    if not path.is_file():
        raise CommandError(f"{path}: no such file")
    if path.suffix.lower() not in SUFFIXES:
        raise CommandError(f"{path}: not a .csv, .txt or .parquet file")
    try:
        if custom is not None:
            name, layout = "custom", custom
        else:
            name = detect_layout(path)
            layout = replace(LAYOUTS[name], timezone=timezone) if timezone else LAYOUTS[name]
        rows = read_file(path, layout)
        if rows.is_empty():
            raise CommandError(f"{path}: no rows (an empty file, or a header only)")
        timeframe = None
        if layout.kind == "bars" and "timeframe" not in rows.columns:
            timeframe = Timeframe(layout.timeframe) if layout.timeframe else bar_timeframe(rows["ts"], str(path))
    except VendorPayloadError as exc:
        raise CommandError(str(exc)) from None
    first, last = rows["ts"].min().date(), rows["ts"].max().date()
    start, today = date.fromisoformat(FIRST_DAY), date.today()
    early = rows.filter(rows["ts"].dt.date() < start).height
    if early:
        raise CommandError(f"{path}: {early:,} rows are dated before {start}, the first partition day (the file starts "
                           f"{first}); set {FIRST_DAY_SETTING}={first} to keep them")
    late = rows.filter(rows["ts"].dt.date() >= today).height
    if late:
        raise CommandError(f"{path}: {late:,} rows are dated today or later (up to {last}): only past days are "
                           f"partitioned; check the file's time zone (--timezone)")
    if timeframe is not None:
        import polars as pl

        opens = rows.select(bar_open_expr(pl.col("ts"), timeframe, boundary).alias("open"), "ts")
        misaligned = opens.filter(pl.col("open") != pl.col("ts")).height
        if misaligned:
            sample = opens.filter(pl.col("open") != pl.col("ts"))["ts"][0]
            raise CommandError(
                f"{path}: {misaligned:,} of {rows.height:,} {timeframe.value} bars do not open on a {timeframe.value} "
                f"boundary (e.g. {sample:%Y-%m-%d %H:%M} UTC under the {boundary.value} day boundary); pass the file's "
                f"--timezone, or set TRADEFORGE_DAY_BOUNDARY=new_york_17 for broker (New York close) daily bars")
        rows = rows.with_columns(pl.lit(timeframe.value).alias("timeframe"))
    return name, layout, rows, timeframe


def cmd_import(args: argparse.Namespace) -> int:
    """Validate files completely, store them normalised in the import folder, show what they
    hold, and ingest their days through the file vendor as one run per symbol: the same
    validation, quarantine, candles, features and checks as any vendor."""
    from assets.features import ml_features
    from assets.market_data import aggregates, market_ticks, vendor_candles
    from assets.partitions import SYMBOLS, check_days
    from models.market.instruments import instrument
    from orchestration.resources import resources_from_env
    from orchestration.runs import run_days, show_progress
    from resources.conventions import MarketConventionsResource
    from resources.market_data import MarketDataResource
    from resources.vendors.files import FileImportResource

    symbol = instrument(args.symbol).symbol
    _state_line()
    custom = _mapping_of(args)
    if custom is None and args.layout != "auto":
        raise CommandError("--layout is recognised from each file; give --columns or --mapping for other layouts")
    boundary = MarketConventionsResource(day_boundary=os.environ.get("TRADEFORGE_DAY_BOUNDARY", "utc")).day_boundary
    files = FileImportResource(directory=args.directory or "")
    target = files.root() / symbol
    checked = []
    for source in args.files:
        path = Path(source)
        name, layout, rows, timeframe = _validated(path, symbol, custom, args.timezone, boundary)
        what = f"{layout.kind}, {timeframe.value} bars" if timeframe else layout.kind
        _print(f"{path.name}: layout {name} ({what}, times in {layout.timezone}), {rows.height:,} rows, "
               f"{rows['ts'].min():%Y-%m-%d %H:%M:%S} .. {rows['ts'].max():%Y-%m-%d %H:%M:%S} UTC")
        if name.startswith("mt5") and not args.timezone:
            _print("  note: MetaTrader exports are in the broker's server time; pass --timezone (e.g. EET) if it is not UTC")
        checked.append((path, rows))
    target.mkdir(parents=True, exist_ok=True)
    days: set[date] = set()
    for path, rows in checked:  # only now, every file being good, do they join the folder
        normalised = target / f"{path.name}.parquet"
        scratch = normalised.with_suffix(".parquet.tmp")
        rows.write_parquet(scratch, statistics=True, row_group_size=100_000)
        scratch.replace(normalised)
        days |= set(rows["ts"].dt.date().unique().to_list())
        _print(f"  -> {normalised}")
    if args.no_ingest:
        _print(f"stored; {len(days)} day(s) to ingest (run without --no-ingest, or backfill {symbol} in the Dagster UI)")
        return 0
    first, last = min(days), max(days)
    check_days(first, last)
    instance = _instance()
    instance.add_dynamic_partitions(SYMBOLS.name, [symbol])
    resources = resources_from_env()
    resources["market_data"] = MarketDataResource(files=files, primary="files")
    resources["warehouse"].process_config_and_initialize().migrate()
    selection = [market_ticks, vendor_candles, aggregates] + ([] if args.no_features else [ml_features])
    _print(f"ingesting {symbol} {first} .. {last} ({(last - first).days + 1} days) from {files.root()} as one run:")
    show_progress()
    started = time.perf_counter()
    report = run_days(instance, resources, selection, symbol, first, last)
    if not report.success:
        raise CommandError(f"run {report.run_id} failed at {report.failure}")
    _print_report(report)
    _print(f"done in {time.perf_counter() - started:.1f}s")
    if report.failed_checks:
        raise CommandError(f"checks failed: {', '.join(c.label for c in report.failed_checks)}")
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    from models.features.registry import FEATURES, catalog_markdown, feature_set_version

    if args.action == "catalog":
        print(catalog_markdown())
    else:
        print(f"{feature_set_version()}: {len(FEATURES)} features")
    return 0


# -- training (issue 10) ------------------------------------------------------------------
DEMO_SPEC = "demo_lightgbm_direction_1h"
DEMO_MIN_ROWS = 500


def _one_line(command):
    """Any error of a training command becomes one line and exit 1, never a traceback."""
    import functools

    @functools.wraps(command)
    def run(args: argparse.Namespace) -> int:
        try:
            return command(args)
        except KeyboardInterrupt:
            print("tradeforge: interrupted (a search resumes where it stopped: run the same command again)", file=sys.stderr)
            return 130
        except (ValueError, RuntimeError):
            raise  # main() prints these as one line
        except Exception as exc:
            raise RuntimeError(f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}") from exc

    return run


class _Lines(logging.Handler):
    """Log records as plain lines on whatever ``sys.stdout`` is at the time."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"  {record.getMessage()}", flush=True)


def _progress_lines(name: str = "tradeforge.training") -> None:
    """Progress of training (the `tradeforge.training` logger) or another logger as plain lines on stdout."""
    logger = logging.getLogger(name)
    if not any(isinstance(h, _Lines) for h in logger.handlers):
        logger.addHandler(_Lines())
        logger.setLevel(logging.INFO)
        logger.propagate = False


def _failure_line(result) -> str:
    """The reason a Dagster run failed, as one line: the Failure's description, or the
    innermost error of the step that failed."""
    for event in result.all_events:
        if not event.is_step_failure:
            continue
        data = event.step_failure_data
        if data.user_failure_data is not None and data.user_failure_data.description:
            return data.user_failure_data.description
        error = data.error
        while error is not None and error.cause is not None:
            error = error.cause
        if error is not None:
            return error.message.strip().splitlines()[-1] if error.message.strip() else error.cls_name or "unknown error"
    return "the run failed; see it in the Dagster UI"


def _format_summary(meta: dict, checks: dict) -> list[str]:
    comparison = meta["comparison_values"].value
    metric = meta["metric"].value
    names = ["model", "lightgbm_default", "majority", "previous_direction", "champion"]
    columns = list(comparison["model"])
    lines = [f"out of sample (mean over folds; {metric} decides):",
             "  " + f"{'candidate':<20}" + "".join(f"{c:>10}" for c in columns)]
    for name in names:
        if name in comparison:
            values = comparison[name]
            lines.append("  " + f"{name:<20}" + "".join(f"{'-' if values[c] is None else format(values[c], '.5f'):>10}" for c in columns))
    value, baseline = meta[metric].value, meta[f"baseline_{metric}"].value
    verdict = "beats" if meta["beats_baseline"].value else "does not beat"
    lines.append(f"{meta['family'].value} {verdict} the baseline (LightGBM with defaults): {metric} "
                 f"{value:.5f} vs {baseline:.5f}")
    gate = checks.get("promotion_gate")
    if gate is not None:
        lines.append(f"gate: {'approved' if gate.passed else 'refused'}: {gate.description}")
    return lines


def _train_spec(instance, resources, spec_name: str, n_trials: int | None = None) -> int:
    """Materialize `trained_model` (and `champion_model`, run only when the gate passes) for
    one spec; progress lines, then the summary. A refused challenger is an answer, not an
    error: exit 0. A failed training is one line and exit 1."""
    from dagster import materialize

    from assets.training import MODEL_SPECS, champion_model, trained_model

    spec = resources["training"].spec(spec_name)
    instance.add_dynamic_partitions(MODEL_SPECS.name, [spec.name])
    registry = resources["registry"].process_config_and_initialize().get_client()
    _print(f"training {spec.name}: {spec.family} on {spec.target}, {spec.timeframe.value} {', '.join(spec.symbols)} "
           f"-> registered model {spec.registered_model_name}")
    _print(f"  tracking: {registry.describe()}")
    _progress_lines()
    # Dagster's console would print a failed step's traceback: the summary says it in one line.
    run_config: dict = {"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}}
    if n_trials:
        run_config["ops"] = {"trained_model": {"config": {"n_trials": n_trials}}}
    t0 = time.perf_counter()
    result = materialize([trained_model, champion_model], partition_key=spec.name, instance=instance, resources=resources,
                         run_config=run_config, raise_on_error=False, tags={"tradeforge/source": "cli"})
    materialized = {e.asset_key.to_user_string(): e.materialization.metadata for e in result.get_asset_materialization_events()}
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()}
    if "trained_model" not in materialized:
        print(f"tradeforge: training {spec.name} failed: {_failure_line(result)}", file=sys.stderr)
        return 1
    meta = materialized["trained_model"]
    for line in _format_summary(meta, checks):
        _print(line)
    _print(f"registered: {meta['registered_model'].value}  {meta['registered_model_url'].value}")
    _print(f"MLflow run: {meta['mlflow_run'].value}  (open with: tradeforge mlflow ui)")
    bus = resources["bus"].process_config_and_initialize().get_client()
    events = meta["bus_events"].value
    _print(f"bus: {events} events on training.*.{meta['run_id'].value} via {bus.describe()}" if events
           else f"bus: {bus.describe()} unreachable; no events published (the training went on)")
    if "champion_model" in materialized:
        _print(f"champion: {materialized['champion_model']['champion'].value}")
    elif not checks.get("promotion_gate") or checks["promotion_gate"].passed:
        print(f"tradeforge: promotion of {meta['registered_model'].value} failed: {_failure_line(result)}", file=sys.stderr)
        return 1
    else:
        _print("champion: unchanged (the challenger stays `challenger`)")
    _print(f"done in {time.perf_counter() - t0:.1f}s (Dagster run {result.run_id})")
    return 0


@_one_line
def cmd_train(args: argparse.Namespace) -> int:
    from dagster import DagsterInstance

    from orchestration.instance import ensure_dagster_home
    from orchestration.resources import resources_from_env
    from resources.training import TrainingResource

    ensure_dagster_home()
    resources = resources_from_env()
    if args.specs:
        resources["training"] = TrainingResource(specs_path=args.specs)
    if args.list:
        for name, spec in resources["training"].specs().items():
            _print(f"{name:<40} {spec.family:<9} {spec.target:<13} {spec.timeframe.value:<4} {spec.registered_model_name}")
        return 0
    if not args.spec:
        raise ValueError("name a model spec (tradeforge train --list shows them)")
    return _train_spec(DagsterInstance.get(), resources, args.spec, args.trials)


def demo_training(instance, resources, symbols: Sequence[str]) -> int:
    """The demo's last step: train and register the demo's LightGBM on the features just built
    (skipped, with the reason, when the demo ran too few days for warm feature rows)."""
    from models.features.registry import feature_set_version
    from resources.warehouse.commits import visible

    _print("")
    spec = resources["training"].spec(DEMO_SPEC)
    warehouse = resources["warehouse"].process_config_and_initialize()
    rows = warehouse.query_frame(
        f"SELECT count() AS n FROM ml_features WHERE feature_set = {{fs:String}} AND timeframe = {{tf:String}} "
        f"AND symbol IN {{symbols:Array(String)}} AND warm = 1 AND {spec.target} IS NOT NULL AND {visible('ml_features')}",
        {"fs": feature_set_version(), "tf": spec.timeframe.value, "symbols": list(symbols)},
    )["n"][0]
    if rows < DEMO_MIN_ROWS:
        _print(f"training: skipped, {rows:,} warm {spec.timeframe.value} rows with a {spec.target} label (at least "
               f"{DEMO_MIN_ROWS:,} needed; the warm-up takes ~5.2 days of M5 bars: run the demo with --days 7 or more)")
        return 0
    return _train_spec(instance, resources, DEMO_SPEC)


def demo_backtest(instance, resources) -> int:
    """The demo's backtest: the challenger it just trained, walk-forward over its out-of-sample
    folds (a `model_backtest` run, as the registry sensor would start), summary and tearsheet."""
    import json

    import polars as pl
    from dagster import materialize

    from assets.model_backtests import MODEL_VERSIONS, model_backtest, version_key
    from resources.registry import CHALLENGER
    from resources.warehouse.backtests import read_runs

    spec = resources["training"].spec(DEMO_SPEC)
    registry = resources["registry"].process_config_and_initialize().get_client()
    challenger = registry.alias(spec.registered_model_name, CHALLENGER)
    if challenger is None:
        return 0  # nothing was trained (demo_training said why)
    key = version_key(spec.registered_model_name, challenger.version)
    _print("")
    _print(f"backtest of the challenger {key}: its out-of-sample predictions only, through the model strategy "
           f"{spec.backtest.params or '(default thresholds)'}, costs {spec.backtest.fill or '(defaults)'}")
    instance.add_dynamic_partitions(MODEL_VERSIONS.name, [key])
    _progress_lines("tradeforge.backtest")
    t0 = time.perf_counter()
    result = materialize([model_backtest], partition_key=key, instance=instance, resources=resources, raise_on_error=False,
                         run_config={"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}},
                         tags={"tradeforge/source": "demo"})
    events = result.get_asset_materialization_events()
    if not events:
        print(f"tradeforge: backtest of {key} failed: {_failure_line(result)}", file=sys.stderr)
        return 1
    meta = events[0].materialization.metadata
    warehouse = resources["warehouse"].process_config_and_initialize()
    row = read_runs(warehouse).filter(pl.col("run_id") == meta["run_id"].value).row(0, named=True)
    _print(f"summary ({meta['dagster/row_count'].value:,} bars, {meta['predictions'].value:,} predictions, "
           f"{time.perf_counter() - t0:.1f}s):")
    _print(_summary_table(json.loads(row["metrics"])))
    version = registry.version(spec.registered_model_name, challenger.version)
    decision = version.tags.get("gate.decision", "?")
    _print(f"gate: {decision}: {version.tags.get('gate.reason', '')}")
    if decision != "approved":
        _print("  on the demo's random-walk market there is nothing to learn: the challenger does not beat the naive baselines, "
               "and its backtest after costs shows what trading it would have cost; it stays `challenger`")
    _print(f"tearsheet: {meta['tearsheet'].value}")
    _print(f"MLflow: {meta['mlflow_run'].value}  (the backtest's run, nested under the training run; tearsheet under "
           f"artifacts/backtest)")
    return 0


DEMO_LIVE_DAYS = 1  # the demo's last days replayed through the live runner


def demo_live(resources, last: date, days: int = DEMO_LIVE_DAYS) -> int:
    """The demo's last ``days`` replayed through the live runner (paper broker, a private
    nats-server, the challenger pinned by version) beside the backtest of the same version on
    the same bars (live/parity.py): orders, fills and final equity of both, and whether they
    are identical. Exit 1 when they are not."""
    import asyncio
    import tempfile
    from datetime import UTC, datetime

    import numpy as np
    import polars as pl

    from live.config import RunnerConfig
    from live.parity import report_lines, run_parity
    from models.backtest.model import strategy_params
    from models.backtest.spec import fill_config
    from models.trading.risk import RiskConfig
    from resources.bus import EmbeddedNatsServer
    from resources.registry import CHALLENGER
    from resources.warehouse.market import read_bars

    spec = resources["training"].spec(DEMO_SPEC)
    registry = resources["registry"].process_config_and_initialize().get_client()
    challenger = registry.alias(spec.registered_model_name, CHALLENGER)
    if challenger is None:
        return 0  # nothing was trained (demo_training said why)
    warehouse = resources["warehouse"].process_config_and_initialize()
    start = datetime.combine(last - timedelta(days=days - 1), datetime.min.time(), UTC)
    end = start + timedelta(days=days)
    frames = [read_bars(warehouse, s, spec.timeframe, start, end) for s in spec.symbols]
    bars = pl.concat([f for f in frames if f.height]).sort("ts", "symbol") if any(f.height for f in frames) else None
    if bars is None:
        _print(f"live runner: skipped, no {spec.timeframe.value} bars on {start:%Y-%m-%d} .. {end - timedelta(days=1):%Y-%m-%d}")
        return 0
    symbols = tuple(sorted(bars["symbol"].unique().to_list()))
    settings = spec.backtest
    version = registry.version(spec.registered_model_name, challenger.version)
    config = RunnerConfig(
        symbols=symbols, timeframe=spec.timeframe, model=f"{spec.registered_model_name}/{challenger.version}",
        name="demo-live", initial_equity=settings.initial_equity, account_currency=settings.account_currency,
        risk=RiskConfig.from_dict(settings.risk), fill=fill_config(settings.fill),
        thresholds=strategy_params(settings.params, version.tags.get("task") == "regression"),
        day_boundary=_day_boundary(), max_bar_age_s=0, history_end=start, model_poll_s=0, heartbeat_s=60)
    span = f"{start:%Y-%m-%d}" + (f" .. {end - timedelta(days=1):%Y-%m-%d}" if days > 1 else "")
    _print("")
    _print(f"live runner: {span} ({bars.height:,} {spec.timeframe.value} bars of {' '.join(symbols)}) replayed over NATS "
           f"through the live runner with the paper broker and {spec.registered_model_name} v{challenger.version}, beside "
           f"the backtest of that version on the same bars (the refitted version has seen these days: this checks that "
           f"live trading is the backtest, not the model)")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tradeforge-demo-nats-") as where:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        server = EmbeddedNatsServer(where, port=port)  # private: the demo leaves no runner or bars on the user's bus
        server.start(detach=False)
        try:
            report, _, outcomes, _ = asyncio.run(run_parity(config, bars, bus_url=server.url, registry=registry,
                                                            warehouse=warehouse))
        finally:
            server.stop()
    for line in report_lines(report):
        _print(line)
    took = np.array([o.accepted - o.received for o in outcomes if o.status == "processed"]) * 1000
    if took.size:
        _print(f"  {report.bars:,} bars in {time.perf_counter() - t0:.1f}s; bar received -> orders accepted: "
               f"p50 {np.percentile(took, 50):.2f} ms, p99 {np.percentile(took, 99):.2f} ms")
    if not report.identical:
        print(f"tradeforge: the live runner and the backtest differ: {report.difference}", file=sys.stderr)
        return 1
    return 0


@_one_line
def cmd_mlflow(args: argparse.Namespace) -> int:
    from pathlib import Path

    from resources.registry import ModelRegistry

    registry = ModelRegistry()
    if not registry.embedded:
        _print(f"MLFLOW_TRACKING_URI selects {registry.describe()}: open {registry.ui_url} in a browser")
        return 0
    mlflow = shutil.which("mlflow", path=os.path.dirname(sys.executable)) or shutil.which("mlflow")
    if mlflow is None:
        _print("mlflow is not installed in this environment; run `make demo` first")
        return 1
    Path(registry.artifact_root).mkdir(parents=True, exist_ok=True)  # type: ignore[arg-type]
    _print(f"{registry.describe()} -> http://{args.host}:{args.port}")
    os.execv(mlflow, [mlflow, "ui", "--backend-store-uri", registry.tracking_uri, "--default-artifact-root",
                      Path(registry.artifact_root).as_uri(), "--host", args.host, "--port", str(args.port),  # type: ignore[arg-type]
                      "--workers", "1"])
    return 0  # not reached


@_one_line
def cmd_bus(args: argparse.Namespace) -> int:
    from resources.bus import EmbeddedNatsServer

    server = EmbeddedNatsServer()
    if args.action == "stop":
        _print(f"stopped the embedded nats-server on {server.url}" if server.stop() else "no embedded nats-server was running")
    elif args.action == "start":
        server.ensure()
        _print(f"embedded nats-server on {server.url}, JetStream under {server.store_dir}")
    else:
        _print(f"{server.url}: {'running' if server.running() else 'not running'} (JetStream under {server.store_dir})")
    return 0


def cmd_ui(args: argparse.Namespace) -> int:
    from orchestration.instance import ensure_dagster_home

    _state_line()
    home = ensure_dagster_home()
    dagster = shutil.which("dagster", path=os.path.dirname(sys.executable)) or shutil.which("dagster")
    if dagster is None:
        raise CommandError("dagster is not installed in this environment; run `make demo` first")
    _print(f"DAGSTER_HOME={home}")
    workspace = REPOSITORY / "workspace.yaml"
    target = ["-w", str(workspace)] if workspace.is_file() else ["-m", "orchestration.definitions"]
    os.chdir(REPOSITORY if workspace.is_file() else os.getcwd())
    os.execv(dagster, [dagster, "dev", *target, "-h", args.host, "-p", str(args.port)])
    return 0  # not reached


def _param(text: str) -> tuple[str, object]:
    """``fast=12`` -> ("fast", 12): numbers become numbers, the rest stays text."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return key.strip(), yaml.safe_load(value)


def _summary_table(m: dict) -> str:
    rows = [
        ("total return", f"{m['total_return']:.2%}"),
        ("buy and hold", f"{m['buy_hold_return']:.2%}" if m.get("buy_hold_return") is not None else "- (several symbols)"),
        ("annual return", f"{m['annual_return']:.2%}"), ("annual volatility", f"{m['annual_volatility']:.2%}"),
        ("Sharpe", f"{m['sharpe']:.2f}"), ("Sortino", f"{m['sortino']:.2f}"), ("Calmar", f"{m['calmar']:.2f}"),
        ("max drawdown", f"{m['max_drawdown']:.2%} ({m['max_drawdown_days']:.1f} days)"),
        ("trades", f"{m['trades']} closed, {m['open_trades']} open"), ("win rate", f"{m['win_rate']:.2%}"),
        ("profit factor", f"{m['profit_factor']:.2f}"), ("expectancy", f"{m['expectancy']:,.2f}"),
        ("avg R multiple", f"{m['avg_r_multiple']:.2f}"), ("SQN", f"{m['sqn']:.2f}"),
        ("exposure", f"{m['exposure']:.2%}"), ("turnover", f"{m['turnover']:.1f}x equity"),
        ("costs", f"{m['commission'] + m['spread_slippage']:,.2f} ({m['costs_pct']:.2%} of equity)"),
        ("final equity", f"{m['final_equity']:,.2f}"), ("orders / rejections", f"{m['orders']} / {m['rejections']}"),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k:<{width}}  {v}" for k, v in rows)


def cmd_backtest(args: argparse.Namespace) -> int:
    """A spec of orchestration/backtests.yaml, or a registered strategy, over a window of the
    warehouse's bars; prints the summary, stores the run and writes the tearsheet."""
    from datetime import UTC, datetime

    from assets.backtests import execute_backtest, load_specs, specs_path
    from models.backtest.spec import BacktestSpec
    from models.trading.strategy import STRATEGIES

    if args.model and args.strategy:
        raise ValueError("backtest either --strategy or --model, not both")
    if args.model:
        return backtest_model(args)
    if not args.strategy:
        raise ValueError("name what to backtest: --strategy NAME or --model NAME@alias")
    specs = load_specs()
    overrides = {k: v for k, v in {
        "symbols": args.symbols, "timeframe": args.timeframe,
        "start": args.start and args.start.isoformat(), "end": args.end and args.end.isoformat(),
    }.items() if v}
    if args.strategy in specs:
        base = specs[args.strategy].as_dict()
    elif args.strategy in STRATEGIES:
        base = {"strategy": args.strategy, "timeframe": "M5"}
    else:
        raise ValueError(f"no strategy or spec {args.strategy!r}: specs in {specs_path()}: {', '.join(sorted(specs)) or 'none'}; "
                         f"strategies: {', '.join(sorted(STRATEGIES))}")
    data = {**base, **overrides}
    if args.param:
        data["params"] = {**data.get("params", {}), **dict(args.param)}
    if args.risk:
        data["risk"] = {**data.get("risk", {}), **dict(args.risk)}
    for key in ("symbols", "start", "end"):
        if key not in data:
            raise ValueError(f"--{key} is required for strategy {args.strategy!r} (it has no spec)")
    spec = BacktestSpec.from_dict(args.strategy, data)
    strategy, _ = spec.build()
    _print(f"tradeforge backtest {spec.name}: {strategy.describe()} on {', '.join(spec.symbols)} {spec.timeframe.value}, "
           f"{spec.start:%Y-%m-%d} .. {spec.end:%Y-%m-%d}")
    warehouse = _warehouse()
    _print(f"  warehouse: {warehouse.describe()}")
    run = execute_backtest(warehouse, spec, source="cli", progress=_print)
    _print(f"summary ({run.result.equity.height:,} bars in {run.seconds:.1f}s, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC):")
    _print(_summary_table(run.result.metrics))
    _print(f"tearsheet: {run.tearsheet}")
    return 0


def backtest_model(args: argparse.Namespace, source: str = "cli") -> int:
    """``tradeforge backtest --model NAME@alias``: the version's out-of-sample predictions (its
    spec's backtest settings; ``--risk`` overrides), optionally ``--symbols`` and a window."""
    from datetime import UTC, datetime

    from assets.model_backtest_run import execute_model_backtest, resolve_model
    from resources.bus.resource import bus_from_env
    from resources.registry import ModelRegistry
    from resources.training import training_from_env

    if args.param or args.timeframe:
        raise ValueError("--param and --timeframe apply to --strategy; a model backtest takes its thresholds and timeframe "
                         "from the model's spec (its backtest section), --risk NAME=VALUE overrides its risk settings")
    registry = ModelRegistry()
    version = resolve_model(registry, args.model)
    try:
        specs = training_from_env().specs()
    except ValueError as exc:
        _print(f"  {exc}: default backtest settings")
        specs = {}
    spec = specs.get(version.tags.get("spec", ""))
    if spec is not None and args.risk:
        specs = {**specs, spec.name: spec.model_copy(update={"backtest": spec.backtest.model_validate(
            {**spec.backtest.model_dump(), "risk": {**spec.backtest.risk, **dict(args.risk)}})})}
    elif args.risk:
        raise ValueError(f"--risk needs the spec of {version.name} v{version.version} ({version.tags.get('spec', '?')}) in the specs file")
    start = args.start and datetime(args.start.year, args.start.month, args.start.day, tzinfo=UTC)
    end = args.end and datetime(args.end.year, args.end.month, args.end.day, tzinfo=UTC)
    _print(f"tradeforge backtest {args.model} -> v{version.version} ({version.tags.get('family', '?')}, spec "
           f"{version.tags.get('spec', '?')}, gate {version.tags.get('gate.decision', '?')}), out-of-sample folds only")
    _print(f"  tracking: {registry.describe()}")
    warehouse = _warehouse()
    _print(f"  warehouse: {warehouse.describe()}")
    bus = bus_from_env().process_config_and_initialize()
    events = bus.backtest_events(logging.getLogger("tradeforge.backtest"))
    try:
        run = execute_model_backtest(warehouse, registry, events, version, specs, symbols=args.symbols, start=start, end=end,
                                     source=source, say=_print)
    finally:
        events.close()
    _print(f"summary ({run.backtest.result.equity.height:,} bars in {run.seconds:.1f}s, {datetime.now(UTC):%Y-%m-%d %H:%M} UTC):")
    _print(_summary_table(run.metrics))
    _print("out-of-sample folds:")
    for row in run.backtest.folds.iter_rows(named=True):
        _print(f"  fold {row['fold']}: {row['test_start']:%Y-%m-%d %H:%M} .. {row['test_end']:%Y-%m-%d %H:%M}  {row['bars']:>6,} bars  "
               f"return {row['return']:>8.2%}  max drawdown {row['max_drawdown']:>8.2%}  {row['trades']:>4} trades")
    _print(f"tearsheet: {run.tearsheet}")
    _print(f"MLflow run: {run.mlflow_url}  (tearsheet under artifacts/backtest)")
    _print(f"bus: {events.published} events on backtest.*.{run.run_id}" if events.published
           else f"bus: {events.problem or 'no events published'} (the backtest went on)")
    return 0


def cmd_broker_check(args: argparse.Namespace) -> int:
    """Connect to the MetaTrader 5 terminal (or the fake one) and show what the runner would
    trade with: account, margin mode, server time zone, each symbol's lots and filling."""
    from resources.brokers.mt5.broker import MT5Broker, MT5Config, load_mt5_module, magic_number

    symbols = tuple(args.symbols)
    if args.fake:
        from resources.brokers.mt5.fake import FakeTerminal

        mt5 = FakeTerminal.quoting(symbols, {"EURUSD": 1.085})
        clock = mt5.utc_now
    else:
        mt5, clock = load_mt5_module(), None
    magic = magic_number(args.strategy)
    broker = MT5Broker(mt5, MT5Config(magic=magic, symbols=symbols), **({"clock": clock} if clock else {}))
    broker.connect_from_environment(fake=args.fake)
    account = mt5.account_info()
    _print(f"account {account.login} on {account.server} ({account.company}): {account.currency} balance "
           f"{account.balance:,.2f}, equity {account.equity:,.2f}, leverage 1:{account.leverage}, "
           f"{'hedging' if broker.hedging else 'netting'}, server time UTC{broker.offset_s / 3600:+.1f}h")
    _print(f"strategy {args.strategy}: magic {magic}; our positions {broker.positions() or 'none'}")
    for symbol in symbols:
        info = mt5.symbol_info(symbol)
        modes = [n for n, f in (("FOK", 1), ("IOC", 2)) if info.filling_mode & f] or ["RETURN"]
        _print(f"  {symbol}: contract {info.trade_contract_size:g}, lots {info.volume_min}-{info.volume_max} step "
               f"{info.volume_step}, stops level {info.trade_stops_level} points, filling {'/'.join(modes)}")
    broker.shutdown()
    return 0


# -- live feeds: the collector and the replay (bars onto the bus) ----------------------------


def _nats_bus(**options):
    """``NATS_URL`` or the embedded server (``options``: :class:`NatsBus`'s own)."""
    from resources.bus import NatsBus

    return NatsBus(os.environ.get("NATS_URL") or None, **options)


def _day_boundary():
    """TRADEFORGE_DAY_BOUNDARY, read where the live side reads it (one copy: live.config)."""
    from live.config import day_boundary_from_env

    return day_boundary_from_env()


def _timeframe(text: str):
    from models.market.timeframes import Timeframe

    try:
        return Timeframe(text.upper())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a timeframe ({' '.join(Timeframe.__members__)})") from None


def _symbols(names: Sequence[str]) -> tuple[str, ...]:
    from models.market.instruments import instrument

    return tuple(instrument(name.upper()).symbol for name in names)  # an unknown name: one line


def _replay_chunks(warehouse, symbols: Sequence[str], timeframe, start, end, days: int = 30):
    """The stored bars of ``symbols`` in ``[start, end)``, a month at a time, in time order."""
    import polars as pl

    from resources.warehouse.market import read_bars

    moment = start
    while moment < end:
        upto = min(moment + timedelta(days=days), end)
        frames = [read_bars(warehouse, symbol, timeframe, moment, upto) for symbol in symbols]
        yield pl.concat(frames).sort("ts", "symbol") if frames else pl.DataFrame()
        moment = upto


def _run_until_signalled(main_coro_factory, on_stop):
    """Run a daemon coroutine; SIGTERM and Ctrl-C ask it to stop cleanly."""
    import asyncio
    import signal as signals

    async def runner():
        loop = asyncio.get_running_loop()
        for sig in (signals.SIGTERM, signals.SIGINT):
            try:
                loop.add_signal_handler(sig, on_stop)
            except (NotImplementedError, RuntimeError):  # Windows, or not the main thread
                pass
        return await main_coro_factory()

    return asyncio.run(runner())


def cmd_live_replay(args: argparse.Namespace) -> int:
    """Stored bars -> bars.{SYM}.{TF} at a chosen speed; a restart resumes after the stream's last bar."""
    import asyncio
    from datetime import UTC, datetime

    from live.replay import Replay, parse_speed

    speed = parse_speed(args.speed)
    symbols = _symbols(args.symbols)
    start = datetime.combine(args.start, datetime.min.time(), UTC)
    end = datetime.combine(args.end, datetime.min.time(), UTC)
    if end <= start:
        raise CommandError(f"--end {args.end} must be after --start {args.start}")
    warehouse = _warehouse()
    bus = _nats_bus()
    pace = "as fast as the bus takes them" if speed is None else ("real time" if speed == 1 else f"x{speed:g}")
    _print(f"tradeforge live replay: {' '.join(symbols)} {args.timeframe.value} bars, {args.start} .. {args.end} "
           f"(end excluded), {pace}")
    _print(f"  from {warehouse.describe()} to {bus.describe()}, stream BARS")
    replay = Replay(bus, speed=speed, boundary=_day_boundary(), progress=lambda line: _print(f"  {line}"))
    try:
        stats = asyncio.run(replay.run(_replay_chunks(warehouse, symbols, args.timeframe, start, end), window=(start, end)))
    except KeyboardInterrupt:
        print("tradeforge: replay interrupted; run the same command again to resume after the last bar stored",
              file=sys.stderr)
        return 130
    if stats.seen == 0:
        raise CommandError(f"no {args.timeframe.value} bars of {', '.join(symbols)} from {args.start} to {args.end} in "
                           f"{warehouse.describe()}: ingest those days first (tradeforge demo / import, or the Dagster UI)")
    _print(f"done in {stats.seconds:.1f}s: {stats.published:,} bars published, {stats.already_on_bus:,} already on the "
           f"bus (skipped), {stats.duplicates:,} refused as duplicates by the stream")
    return 0


def cmd_live_collect(args: argparse.Namespace) -> int:
    """Polygon's WebSocket feed -> ticks.{SYM} and bars.{SYM}.{TF}, until SIGTERM or Ctrl-C."""
    from live.collector import Collector, CollectorConfig
    from resources.vendors.polygon import PolygonResource

    key = os.environ.get("POLYGON_API_KEY", "").strip()
    if not key:
        raise CommandError("POLYGON_API_KEY is not set: the collector needs a Polygon (Massive) key with WebSocket "
                           "access (export POLYGON_API_KEY=...)")
    symbols = _symbols(args.symbols)
    config = CollectorConfig(
        symbols=symbols, timeframes=tuple(args.timeframes), boundary=_day_boundary(),
        ws_url=os.environ.get("POLYGON_WS_URL", "").strip() or CollectorConfig.ws_url,
        grace_s=args.grace, max_backfill_s=args.max_backfill_hours * 3600, publish_ticks=not args.no_ticks,
    )
    base_url = os.environ.get("POLYGON_BASE_URL", "").strip()
    history = PolygonResource(api_key=key, **({"base_url": base_url} if base_url else {}))
    bus = _nats_bus()
    _print(f"tradeforge live collect: {' '.join(symbols)} -> ticks.SYM, bars.SYM.{{{','.join(t.value for t in config.timeframes)}}} "
           f"on {bus.describe()} (grace {config.grace_s:g}s); stop with Ctrl-C or SIGTERM")

    def line(text: str) -> None:
        from datetime import UTC, datetime

        _print(f"  {datetime.now(UTC):%H:%M:%S} {text}")

    collector = Collector(config, key, bus, history, progress=line)
    stats = _run_until_signalled(collector.run, collector.stop)
    _print(f"stopped: {stats.bars_published:,} bars and {stats.ticks_published:,} ticks published, "
           f"{stats.drops} drops, {len(stats.backfills)} backfills")
    return 0


def cmd_broker_publish(args: argparse.Namespace) -> int:
    """Sample the MT5 terminal's account, quotes and deals and publish them to the BROKER_DATA
    stream (run it next to the terminal); the drain_broker_data sensor stores them."""
    import time

    from live.broker_data import BrokerDataPublisher
    from resources.brokers.mt5.broker import MT5Broker, MT5Config, load_mt5_module, magic_number
    from resources.brokers.mt5.sampler import BrokerDataSampler

    symbols = tuple(args.symbols)
    if args.fake:
        from resources.brokers.mt5.fake import FakeTerminal

        mt5 = FakeTerminal.quoting(symbols)
        clock = mt5.utc_now
    else:
        mt5, clock = load_mt5_module(), time.time
    magics = [magic_number(name) for name in args.strategies]
    broker = MT5Broker(mt5, MT5Config(magic=magics[0], symbols=symbols), clock=clock)
    broker.connect_from_environment(fake=args.fake)
    sampler = BrokerDataSampler(mt5, symbols, server_utc_offset_s=broker.offset_s, magics=magics, clock=clock)
    bus = _nats_bus()
    _print(f"tradeforge broker publish: account, {' '.join(symbols)} quotes and deals every {args.interval:g}s "
           f"-> {bus.describe()}, stream BROKER_DATA; stop with Ctrl-C or SIGTERM")
    publisher = BrokerDataPublisher(bus, sampler, progress=lambda line: _print(f"  {line}"))
    if args.samples:
        import asyncio

        async def some() -> None:
            await publisher.start()
            try:
                for n in range(args.samples):
                    await publisher.publish_sample(deals=n == 0)
                    if args.fake:
                        mt5.advance_time(int(args.interval * 1000))  # the fake's clock moves only when told
                    elif n + 1 < args.samples:
                        await asyncio.sleep(args.interval)
            finally:
                await publisher.publisher.close()

        asyncio.run(some())
        stats = publisher.stats
    else:
        stats = _run_until_signalled(lambda: publisher.run(interval_s=args.interval), publisher.stop)
    broker.shutdown()
    p = stats.published
    _print(f"published {p['account']:,} account snapshots, {p['quote']:,} quotes, {p['deal']:,} deals "
           f"({stats.already_stored:,} already on the bus, {stats.failed_samples} samples failed)")
    return 0


# -- the live runner: run, kill, status (issue 12) ---------------------------------------------


def _runner_bus():
    """The bus a runner uses: :func:`_nats_bus` that reconnects forever once connected."""
    return _nats_bus(max_reconnect_attempts=-1)


def _live_logging() -> None:
    """The runner's log lines on stdout with a timestamp (stderr keeps the one-line failure)."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    for name in ("tradeforge.live", "resources.brokers", "live"):
        logger = logging.getLogger(name)
        logger.handlers = [handler]
        logger.setLevel(logging.INFO)
        logger.propagate = False


def cmd_live_run(args: argparse.Namespace) -> int:
    """The live runner daemon, until SIGTERM or Ctrl-C (which finish the bar in hand)."""
    from live.config import LIVE_RISK_DEFAULTS, THRESHOLD_DEFAULTS, RunnerConfig
    from live.runner import LiveRunner
    from models.trading.risk import RiskConfig
    from resources.registry import ModelRegistry
    from resources.warehouse import WarehouseClient

    risk = {**LIVE_RISK_DEFAULTS, "risk_fraction": args.risk_fraction}
    if args.max_daily_loss is not None:
        risk["max_daily_loss"] = args.max_daily_loss or None
    if args.max_drawdown is not None:
        risk["max_drawdown"] = args.max_drawdown or None
    thresholds = dict(THRESHOLD_DEFAULTS)
    if args.long_above is not None:
        thresholds["long_above"] = args.long_above
    if args.short_below is not None:
        thresholds["short_below"] = args.short_below
    config = RunnerConfig(symbols=_symbols(args.symbols), timeframe=args.timeframe, model=args.model, broker=args.broker,
                          name=args.name or "", strategy=args.strategy or "", initial_equity=args.equity,
                          risk=RiskConfig(**risk), thresholds=thresholds, day_boundary=_day_boundary(),
                          metrics_port=args.metrics_port, metrics_host=args.metrics_host, mt5_fake=args.mt5_fake, heartbeat_s=args.heartbeat,
                          model_poll_s=args.model_poll, max_bar_age_s=args.max_bar_age,
                          stop_when_idle_s=args.stop_when_idle)
    if config.broker == "mt5" and not config.mt5_fake:
        from resources.brokers.mt5.broker import load_mt5_module

        load_mt5_module()  # off Windows: one line, before anything is started
    _live_logging()
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a daemon's stderr is for failures
    bus, registry, warehouse = _runner_bus(), ModelRegistry(), WarehouseClient.from_env()
    runner = LiveRunner(config, bus=bus, registry=registry, warehouse=warehouse)
    _print(f"tradeforge live run: runner {config.name} (strategy {config.strategy}), {' '.join(config.symbols)} "
           f"{config.timeframe.value}, model {config.model}, {config.broker} broker")
    _print(f"  bars from {bus.describe()}, warm-up from {warehouse.describe()}, models from {registry.describe()}")

    async def main() -> int:
        try:
            await runner.start()
        except BaseException:
            await runner.close()
            raise
        if runner.metrics_port is not None:
            _print(f"  metrics on http://{config.metrics_host}:{runner.metrics_port}/metrics")
        _print("  trading; stop with SIGTERM or Ctrl-C (the bar in hand is finished first)")
        return await runner.run()

    code = _run_until_signalled(main, runner.request_stop)
    _print(f"stopped: {runner.state.bars:,} bars processed in all, equity "
           f"{runner.engine.equity():,.2f}" if runner.engine is not None else "stopped")
    return code


async def _kv_entries(bus, bucket: str, prefix: str) -> dict[str, dict]:
    """``{runner: value}`` of the keys ``{prefix}.{runner}`` in a KV bucket."""
    import json

    from nats.js.errors import KeyNotFoundError, NoKeysError

    kv = await bus.key_value(bucket)
    try:
        keys = await kv.keys()
    except NoKeysError:
        return {}
    out = {}
    for key in keys:
        if not key.startswith(prefix + "."):
            continue
        try:
            entry = await kv.get(key)
        except KeyNotFoundError:
            continue
        if entry.value:
            out[key[len(prefix) + 1:]] = json.loads(entry.value)
    return out


def _choose_runner(names, wanted: str | None, where: str) -> str:
    names = sorted(names)
    if wanted:
        return wanted
    if not names:
        raise CommandError(f"no runner has saved its state on {where}: start one (tradeforge live run ...) or name it with --name")
    if len(names) > 1:
        raise CommandError(f"{len(names)} runners on {where} ({', '.join(names)}): name one with --name")
    return names[0]


def cmd_live_kill(args: argparse.Namespace) -> int:
    """Set a runner's kill switch in NATS KV; the runner applies it at its next bar."""
    import asyncio
    import getpass
    import json
    import socket
    import time

    from live.state import CONTROL_BUCKET, STATE_BUCKET, kill_key

    mode = "off" if args.off else "reduce_only" if args.reduce_only else "halt"
    if args.off and args.flatten:
        raise CommandError("--off turns the kill switch off; --flatten goes with a halt or --reduce-only")
    bus = _nats_bus()

    async def put() -> tuple[str, int, bool]:
        await bus.connect()
        try:
            known = await _kv_entries(bus, STATE_BUCKET, "state")
            name = _choose_runner(known, args.name, bus.describe())
            command = {"mode": mode, "flatten": bool(args.flatten), "reason": args.reason or "operator",
                       "by": f"{getpass.getuser()}@{socket.gethostname()}", "at": time.time()}
            kv = await bus.key_value(CONTROL_BUCKET)
            revision = await kv.put(kill_key(name), json.dumps(command).encode())
            return name, revision, name in known
        finally:
            await bus.close()

    name, revision, known = asyncio.run(put())
    what = {"halt": "halt: no new orders", "reduce_only": "reduce only: orders that shrink a position only",
            "off": "off: trading again"}[mode]
    _print(f"runner {name}: kill switch {what}{', and every position closed' if args.flatten else ''} "
           f"(revision {revision}); applied at its next bar")
    if not known:
        _print(f"  runner {name} has no saved state on {bus.describe()} yet: it applies this when it starts")
    return 0


def _status_lines(name: str, state: dict | None, beat: dict | None, now: float) -> list[str]:
    from datetime import UTC, datetime

    def when(ms: int) -> str:
        return datetime.fromtimestamp(ms / 1000, UTC).strftime("%Y-%m-%d %H:%M") if ms is not None and ms >= 0 else "-"

    lines = []
    if beat is None:
        alive = "no heartbeat yet"
    elif beat.get("stopped"):
        alive = f"stopped {now - beat['at']:.0f}s ago (pid {beat['pid']} on {beat['host']})"
    elif now - beat["at"] > 3 * 30:
        alive = f"silent for {now - beat['at']:.0f}s: not running, or cut off from the bus (pid {beat['pid']} on {beat['host']})"
    else:
        alive = f"running (pid {beat['pid']} on {beat['host']}, heartbeat {now - beat['at']:.0f}s ago)"
    head = f"runner {name}: {alive}"
    if beat:
        head += f", {beat['broker']} broker, {' '.join(beat.get('symbols', []))} {beat.get('timeframe', '')}".rstrip()
    lines.append(head)
    engine = (state or {}).get("engine")
    if engine:
        portfolio, symbols = engine["portfolio"], engine["symbols"]
        equity = portfolio["balance"]
        held = []
        for symbol, (units, avg) in sorted(portfolio["positions"].items()):
            if units:
                mark, conv = symbols[symbol]["last_close"], symbols[symbol]["last_conv"] or 1.0
                equity += units * ((mark or avg) - avg) * conv
                held.append(f"{symbol} {units:+,.0f} @ {avg:.5g} (last {mark:.5g})")
        peak, day_ref = engine["peak"], engine["day_ref"]
        lines.append(f"  model {beat['model']}" if beat and beat.get("model") else f"  model version {state.get('model_version') or '?'}")
        if beat and beat.get("external_read_at"):
            lines.append(f"  external data as read at {when(beat['external_read_at'])} UTC")
        lines.append(f"  last bar: " + (", ".join(f"{s} {when(t)}" for s, t in sorted(state["last_ts"].items())) or "none yet")
                     + f"; {state['bars']:,} bars processed, {state['starts']} start(s)")
        lines.append(f"  equity {equity:,.2f} (balance {portfolio['balance']:,.2f}; day's start {day_ref:,.2f}, "
                     f"{equity / day_ref - 1:+.2%}; peak {peak:,.2f}, drawdown {max(0.0, 1 - equity / peak):.2%})")
        lines.append("  positions: " + ("; ".join(held) or "flat"))
        kill = engine["kill"]
        lines.append(f"  kill switch: {kill}" + (f" ({engine['kill_reason']})" if kill != "off" and engine["kill_reason"] else ""))
    else:
        lines.append("  no saved state yet")
    if beat and beat.get("limits"):
        lim = beat["limits"]

        def pct(v):
            return "none" if v is None else f"{v:.2%}"

        lines.append(f"  limits: daily loss {pct(lim['max_daily_loss'])}, drawdown {pct(lim['max_drawdown'])} "
                     f"(then {lim['breach_action']}{' and flatten' if lim['flatten_on_breach'] else ''}), risk "
                     f"{pct(lim['risk_fraction'])} a trade" + (f", {lim['max_open_positions']} open positions at most"
                                                              if lim.get("max_open_positions") else ""))
    return lines


def cmd_live_status(args: argparse.Namespace) -> int:
    """Every runner on the bus (or one): positions, equity, last bar, model version, limits, kill switch."""
    import asyncio
    import json
    import time

    from live.state import CONTROL_BUCKET, STATE_BUCKET

    bus = _nats_bus()

    async def read() -> tuple[dict, dict]:
        await bus.connect()
        try:
            return await _kv_entries(bus, STATE_BUCKET, "state"), await _kv_entries(bus, CONTROL_BUCKET, "status")
        finally:
            await bus.close()

    states, beats = asyncio.run(read())
    names = sorted(set(states) | set(beats))
    if args.name:
        if args.name not in names:
            raise CommandError(f"no runner {args.name!r} on {bus.describe()}" + (f" (runners: {', '.join(names)})" if names else ""))
        names = [args.name]
    if not names:
        raise CommandError(f"no runner on {bus.describe()}: start one with tradeforge live run ...")
    if args.json:
        _print(json.dumps({n: {"state": _status_json(states.get(n)), "heartbeat": beats.get(n)} for n in names}, indent=1))
        return 0
    now = time.time()
    for name in names:
        for line in _status_lines(name, states.get(name), beats.get(name), now):
            _print(line)
    return 0


def _status_json(state: dict | None) -> dict | None:
    """The saved state without the engine's order and fill history (what a script wants to read)."""
    if state is None:
        return None
    engine = state.get("engine") or {}
    return {**{k: v for k, v in state.items() if k not in ("engine", "broker")},
            "positions": {s: u for s, (u, _) in engine.get("portfolio", {}).get("positions", {}).items() if u},
            "balance": engine.get("portfolio", {}).get("balance"), "kill": engine.get("kill"),
            "kill_reason": engine.get("kill_reason")}


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date (YYYY-MM-DD)") from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tradeforge", description="tradeforge: from market ticks to live orders")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="ingest synthetic ticks, build candles and features on the embedded engines")
    demo.add_argument("--symbols", nargs="+", default=list(DEMO_SYMBOLS))
    demo.add_argument("--start", type=_day, default=DEMO_START, help="first UTC day (YYYY-MM-DD)")
    demo.add_argument("--days", type=_positive_int, default=DEMO_DAYS)
    demo.set_defaults(func=cmd_demo)

    warehouse = commands.add_parser("warehouse", help="warehouse administration")
    warehouse_commands = warehouse.add_subparsers(dest="action", required=True)
    warehouse_commands.add_parser("migrate", help="apply pending schema migrations").set_defaults(func=cmd_migrate)

    symbols = commands.add_parser("symbols", help="list or add symbols (the symbol partitions)")
    symbols.add_argument("action", choices=["list", "add"])
    symbols.add_argument("symbols", nargs="*", default=[])
    symbols.set_defaults(func=cmd_symbols)

    imports = commands.add_parser(
        "import", help="load CSV/Parquet ticks or bars you already have (MT5, HistData, Dukascopy, any columns)")
    imports.add_argument("files", nargs="+", help="files of one symbol")
    imports.add_argument("--symbol", required=True)
    imports.add_argument("--layout", default="auto", help="'auto': recognised from each file's first line")
    imports.add_argument("--columns", default="", help="your columns: ts=Time,bid=Bid,ask=Ask (or date=..,time=..; "
                         "open/high/low/close/volume for bars)")
    imports.add_argument("--mapping", default="", help="a YAML file: columns: {ts: Time, ...}, kind, ts_format, separator, timezone")
    imports.add_argument("--kind", choices=["ticks", "bars"], default="", help="with --columns: what the rows are")
    imports.add_argument("--ts-format", default="", help="with --columns: strftime pattern, 'iso' (default) or 'epoch_ms'")
    imports.add_argument("--separator", default="", help="with --columns: field separator (default ',')")
    imports.add_argument("--timezone", default="", help="time zone of the files' times when they carry none "
                         "(MT5 exports use the broker's server time, e.g. EET)")
    imports.add_argument("--directory", default="", help="import folder (default $TRADEFORGE_HOME/imports)")
    imports.add_argument("--no-ingest", action="store_true", help="only validate and store the files")
    imports.add_argument("--no-features", action="store_true", help="ingest ticks and candles, not ml_features")
    imports.set_defaults(func=cmd_import)

    features = commands.add_parser("features", help="the feature registry: version, catalog")
    features.add_argument("action", choices=["version", "catalog"])
    features.set_defaults(func=cmd_features)

    bt = commands.add_parser("backtest", help="backtest a strategy spec (orchestration/backtests.yaml) or a registered strategy")
    bt.add_argument("--strategy", help="a spec name, or a registered strategy (sma_cross, donchian_breakout)")
    bt.add_argument("--model", help="a registered model, NAME@alias or NAME@VERSION (e.g. direction_1h.M5.demo@challenger): "
                                    "walk-forward over its out-of-sample predictions")
    bt.add_argument("--symbols", nargs="+", type=str.upper, help="overrides the spec's symbols")
    bt.add_argument("--start", type=date.fromisoformat, help="first UTC day (YYYY-MM-DD)")
    bt.add_argument("--end", type=date.fromisoformat, help="UTC day after the last (YYYY-MM-DD)")
    bt.add_argument("--timeframe", type=str.upper, help="M1 M5 M15 M30 H1 H4 D1 (default: the spec's, else M5)")
    bt.add_argument("--param", type=_param, action="append", help="strategy parameter NAME=VALUE (repeatable)")
    bt.add_argument("--risk", type=_param, action="append", help="risk setting NAME=VALUE (repeatable)")
    bt.set_defaults(func=cmd_backtest)

    broker = commands.add_parser("broker", help="the MetaTrader 5 broker")
    broker_commands = broker.add_subparsers(dest="action", required=True)
    check = broker_commands.add_parser("check", help="connect to the terminal (MT5_LOGIN, MT5_PASSWORD, MT5_SERVER, "
                                                     "MT5_TERMINAL_PATH) and show the account and symbols")
    check.add_argument("--symbols", nargs="+", type=str.upper, default=["EURUSD"])
    check.add_argument("--strategy", default="default", help="the strategy whose magic number marks our orders")
    check.add_argument("--fake", action="store_true", help="a dry run on the fake terminal (any platform)")
    check.set_defaults(func=cmd_broker_check)
    publish = broker_commands.add_parser("publish", help="publish the terminal's account, quotes and deals to NATS "
                                                         "(stream BROKER_DATA; the drain_broker_data sensor stores them)")
    publish.add_argument("--symbols", nargs="+", type=str.upper, default=["EURUSD"])
    publish.add_argument("--strategies", nargs="+", default=["default"], help="strategies whose magic numbers mark our deals")
    publish.add_argument("--interval", type=float, default=1.0, help="seconds between samples (deals every 10 samples)")
    publish.add_argument("--samples", type=int, default=0, help="stop after this many samples (0: run until stopped)")
    publish.add_argument("--fake", action="store_true", help="a dry run on the fake terminal (any platform)")
    publish.set_defaults(func=cmd_broker_publish)

    train = commands.add_parser("train", help="train a model spec (orchestration/model_specs.yaml), gate it, register it")
    train.add_argument("spec", nargs="?", help="the spec's name")
    train.add_argument("--list", action="store_true", help="list the specs")
    train.add_argument("--trials", type=_positive_int, default=None, help="override the spec's search budget")
    train.add_argument("--specs", default="", help="another specs file (default: orchestration/model_specs.yaml)")
    train.set_defaults(func=cmd_train)

    mlflow = commands.add_parser("mlflow", help="MLflow: the UI on the embedded tracking store")
    mlflow.add_argument("action", choices=["ui"])
    mlflow.add_argument("--host", default="127.0.0.1")
    mlflow.add_argument("--port", type=int, default=5000)
    mlflow.set_defaults(func=cmd_mlflow)

    bus = commands.add_parser("bus", help="the embedded NATS server: status, start, stop")
    bus.add_argument("action", choices=["status", "start", "stop"])
    bus.set_defaults(func=cmd_bus)

    ui = commands.add_parser("ui", help="start the Dagster UI on this project's instance")
    ui.add_argument("--host", default="127.0.0.1")
    ui.add_argument("--port", type=int, default=3000)
    ui.set_defaults(func=cmd_ui)

    live = commands.add_parser("live", help="the live side: bars onto the bus (collector, replay), the runner (run, kill, status)")
    live_commands = live.add_subparsers(dest="action", required=True)
    replay = live_commands.add_parser("replay", help="stored bars -> bars.SYM.TF on NATS at a chosen speed (resumes)")
    replay.add_argument("--symbols", nargs="+", required=True)
    replay.add_argument("--timeframe", type=_timeframe, default="M5", help="M1 M5 M15 M30 H1 H4 D1 W1 (default M5)")
    replay.add_argument("--start", type=_day, required=True, help="first UTC day (YYYY-MM-DD)")
    replay.add_argument("--end", type=_day, required=True, help="UTC day after the last (YYYY-MM-DD)")
    replay.add_argument("--speed", default="max", help="max (as fast as possible), 1 (real time), 60 (a minute a second), ...")
    replay.set_defaults(func=cmd_live_replay)
    collect = live_commands.add_parser("collect", help="Polygon's WebSocket feed -> ticks.SYM and bars.SYM.TF "
                                                       "(needs POLYGON_API_KEY)")
    collect.add_argument("--symbols", nargs="+", required=True)
    collect.add_argument("--timeframes", nargs="+", type=_timeframe, default=["M1", "M5", "M15", "M30", "H1"])
    collect.add_argument("--grace", type=float, default=2.0, help="seconds a bar waits after its end for late ticks")
    collect.add_argument("--max-backfill-hours", type=float, default=24.0,
                         help="at start, how far back to resume after the stream's last bars")
    collect.add_argument("--no-ticks", action="store_true", help="do not publish ticks.SYM (bars only)")
    collect.set_defaults(func=cmd_live_collect)
    run = live_commands.add_parser("run", help="the live runner: bars from NATS, the champion model, orders to the paper "
                                               "or MT5 broker (until SIGTERM)")
    run.add_argument("--symbols", nargs="+", required=True)
    run.add_argument("--timeframe", type=_timeframe, default="M5", help="M1 M5 M15 M30 H1 H4 D1 W1 (default M5)")
    run.add_argument("--model", required=True, help="NAME@ALIAS (followed when the alias moves) or NAME/VERSION (pinned)")
    run.add_argument("--broker", choices=["paper", "mt5"], default="paper")
    run.add_argument("--name", help="the runner's name (its state, consumer and kill switch); default: from the model")
    run.add_argument("--strategy", help="what client order ids and the MT5 magic number come from; default: the name")
    run.add_argument("--metrics-port", type=int, help="serve Prometheus metrics on this port (0: any free one)")
    run.add_argument("--metrics-host", default="127.0.0.1", help="the interface of the metrics endpoint (default 127.0.0.1)")
    run.add_argument("--equity", type=float, default=100_000.0, help="the paper account's starting equity")
    run.add_argument("--risk-fraction", type=float, default=0.01, help="equity risked a trade at the stop (default 0.01)")
    run.add_argument("--max-daily-loss", type=float, help="kill switch at this loss of the day's starting equity "
                                                           "(default 0.03; 0: none)")
    run.add_argument("--max-drawdown", type=float, help="kill switch at this drawdown from the peak (default 0.10; 0: none)")
    run.add_argument("--long-above", type=float, help="go long when P(up) is above this (default 0.55)")
    run.add_argument("--short-below", type=float, help="go short when P(up) is below this (default 0.45)")
    run.add_argument("--max-bar-age", type=float, help="seconds after its close a bar is too old to act on "
                                                       "(default: two bars; 0: never, for replays of history)")
    run.add_argument("--model-poll", type=float, default=30.0, help="seconds between looks at the registry's alias")
    run.add_argument("--heartbeat", type=float, default=5.0, help="seconds between heartbeats")
    run.add_argument("--mt5-fake", help="HOST:PORT/NAME of a fake terminal server (python -m resources.brokers.mt5.remote)")
    run.add_argument("--stop-when-idle", type=float, help="stop once no bar came for this many seconds (replays)")
    run.set_defaults(func=cmd_live_run)
    kill = live_commands.add_parser("kill", help="set a runner's kill switch (NATS KV); honoured at its next bar")
    kill.add_argument("--name", help="the runner (needed when several have state on the bus)")
    how = kill.add_mutually_exclusive_group()
    how.add_argument("--reduce-only", action="store_true", help="only orders that shrink a position")
    how.add_argument("--off", action="store_true", help="turn the kill switch off: trade again")
    kill.add_argument("--flatten", action="store_true", help="also close every position and cancel working entries")
    kill.add_argument("--reason", help="recorded with the decision")
    kill.set_defaults(func=cmd_live_kill)
    status = live_commands.add_parser("status", help="runners on the bus: positions, equity, last bar, model, limits, kill switch")
    status.add_argument("--name", help="one runner")
    status.add_argument("--json", action="store_true", help="machine-readable")
    status.set_defaults(func=cmd_live_status)
    return parser


def describe_error(exc: BaseException) -> str:
    """One line for any failure: the message, without Dagster's or pydantic's wrapping."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        errors = exc.errors()
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'value'}: {e['msg']} (got {e.get('input')!r})"
                         for e in errors[:3])
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, (CommandError, ValueError, RuntimeError, OSError)):
        return text
    return f"{type(exc).__name__}: {text}"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("tradeforge: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # every failure is one line; TRADEFORGE_DEBUG=1 shows the traceback
        if os.environ.get("TRADEFORGE_DEBUG"):
            raise
        print(f"tradeforge: {describe_error(exc)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
