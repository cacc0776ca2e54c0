"""The ``tradeforge`` command line."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from collections.abc import Sequence
from datetime import date, timedelta

DEMO_SYMBOLS = ("EURUSD", "XAUUSD", "BTCUSD")
# Ten days with a closed FX weekend and the US switch to daylight saving time (2024-03-10).
DEMO_START = date(2024, 3, 4)
DEMO_DAYS = 10


def _print(message: str) -> None:
    print(message, flush=True)


def _warehouse():
    from resources.warehouse import warehouse_from_env

    return warehouse_from_env().process_config_and_initialize()


def cmd_migrate(_: argparse.Namespace) -> int:
    warehouse = _warehouse()
    applied = warehouse.migrate()
    _print(f"{warehouse.describe()}: " + (f"applied migrations {applied}" if applied else "schema is current"))
    return 0


def cmd_symbols(args: argparse.Namespace) -> int:
    from dagster import DagsterInstance

    from assets.partitions import SYMBOLS
    from models.market.instruments import instrument
    from orchestration.instance import ensure_dagster_home

    ensure_dagster_home()
    instance = DagsterInstance.get()
    if args.action == "add":
        symbols = [s.upper() for s in args.symbols]
        for symbol in symbols:
            instrument(symbol)  # an unknown name fails here, before it becomes a partition
        instance.add_dynamic_partitions(SYMBOLS.name, symbols)
    for symbol in instance.get_dynamic_partitions(SYMBOLS.name):
        _print(symbol)
    return 0


def _summary_tables(warehouse, symbols: Sequence[str]) -> str:
    ticks = warehouse.query_frame(
        "SELECT symbol, count() AS ticks, min(ts) AS first, max(ts) AS last FROM market_ticks "
        "WHERE symbol IN {symbols:Array(String)} GROUP BY symbol ORDER BY symbol",
        {"symbols": list(symbols)},
    )
    quarantined = warehouse.query_frame(
        "SELECT count() AS n FROM market_ticks_quarantine WHERE symbol IN {symbols:Array(String)}",
        {"symbols": list(symbols)},
    )["n"][0]
    bars = warehouse.query_frame(
        "SELECT symbol, timeframe, count() AS bars FROM aggregates FINAL "
        "WHERE symbol IN {symbols:Array(String)} GROUP BY symbol, timeframe",
        {"symbols": list(symbols)},
    )
    from models.market.timeframes import ALL_TIMEFRAMES

    lines = ["market_ticks", f"  {'symbol':<8} {'ticks':>10}  first .. last"]
    for symbol, n, first, last in ticks.iter_rows():
        lines.append(f"  {symbol:<8} {n:>10,}  {first:%Y-%m-%d %H:%M} .. {last:%Y-%m-%d %H:%M} UTC")
    lines.append(f"  quarantined rows: {quarantined:,}")
    counts = {(s, tf): n for s, tf, n in bars.iter_rows()}
    features = warehouse.query_frame(
        "SELECT symbol, timeframe, count() AS n, sum(warm) AS warm, any(feature_set) AS fs FROM ml_features FINAL "
        "WHERE symbol IN {symbols:Array(String)} GROUP BY symbol, timeframe ORDER BY symbol, timeframe",
        {"symbols": list(symbols)},
    )
    lines.append("aggregates (bars)")
    lines.append(f"  {'symbol':<8}" + "".join(f"{tf.value:>8}" for tf in ALL_TIMEFRAMES))
    for symbol in symbols:
        lines.append(f"  {symbol:<8}" + "".join(f"{counts.get((symbol, tf.value), 0):>8,}" for tf in ALL_TIMEFRAMES))
    lines.append("ml_features (rows, warm rows, feature set)")
    for symbol, tf, n, warm, version in features.iter_rows():
        lines.append(f"  {symbol:<8} {tf:<4} {n:>7,} {warm:>7,}  {version}")
    return "\n".join(lines)


def _materialize_partitions(instance, resources, assets, partitions, describe) -> list[str] | None:
    """One run per partition, a progress line each; the checks that did not pass, or None
    when a run failed."""
    from dagster import materialize

    failed_checks: list[str] = []
    for index, partition in enumerate(partitions, start=1):
        t0 = time.perf_counter()
        result = materialize(
            assets,
            partition_key=partition.key,
            instance=instance,
            resources=resources,
            tags={"tradeforge/source": "cli"},
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
            raise_on_error=False,
        )
        prefix = f"[{index:>2}/{len(partitions)}] {partition.symbol:<7} {partition.day}"
        if not result.success:
            _print(f"{prefix}  run {result.run_id} FAILED: see it in the Dagster UI")
            return None
        meta = {
            e.asset_key.to_user_string(): e.event_specific_data.materialization.metadata
            for e in result.get_asset_materialization_events()
        }
        failed = [f"{e.asset_key.to_user_string()}:{e.check_name}" for e in result.get_asset_check_evaluations() if not e.passed]
        failed_checks += [f"{partition.symbol} {partition.day} {name}" for name in failed]
        status = "ok" if not failed else "FAILED " + ", ".join(failed)
        _print(f"{prefix}  {describe(meta)}  checks {status}  {time.perf_counter() - t0:5.1f}s")
    return failed_checks


def cmd_demo(args: argparse.Namespace) -> int:
    from dagster import DagsterInstance

    from assets.features import ml_features
    from assets.market_data import aggregates, market_ticks
    from assets.partitions import SYMBOLS, DaySymbol
    from models.market.instruments import instrument
    from orchestration.instance import dagster_home, ensure_dagster_home
    from orchestration.resources import resources_from_env

    started = time.perf_counter()
    symbols = [s.upper() for s in args.symbols]
    for symbol in symbols:
        instrument(symbol)
    days = [args.start + timedelta(days=i) for i in range(args.days)]
    ensure_dagster_home()
    instance = DagsterInstance.get()
    resources = resources_from_env()
    warehouse = resources["warehouse"].process_config_and_initialize()
    _print(f"tradeforge demo: {len(symbols)} symbols x {len(days)} days ({days[0]} .. {days[-1]})")
    _print(f"  warehouse : {warehouse.describe()}")
    _print(f"  dagster   : {dagster_home()} ({type(instance.run_storage).__name__})")
    applied = warehouse.migrate()
    _print(f"  schema    : {'applied migrations ' + str(applied) if applied else 'current'}")
    instance.add_dynamic_partitions(SYMBOLS.name, symbols)
    partitions = [DaySymbol(symbol, day) for day in days for symbol in symbols]

    _print("market_ticks + aggregates:")
    ingested = _materialize_partitions(
        instance, resources, [market_ticks, aggregates], partitions,
        lambda m: f"{m['market_ticks']['dagster/row_count'].value:>8,} ticks  "
        f"{m['aggregates']['dagster/row_count'].value:>6,} bars  "
        f"{m['market_ticks']['quarantined_rows'].value} quarantined",
    )
    if ingested is None:
        return 1
    # Features after all candles: their labels look a day ahead.
    _print("ml_features:")
    featured = _materialize_partitions(
        instance, resources, [ml_features], partitions,
        lambda m: f"{m['ml_features']['dagster/row_count'].value:>6,} rows  "
        f"{m['ml_features']['warm_rows'].value:>6,} warm  {m['ml_features']['feature_set'].value}",
    )
    if featured is None:
        return 1

    _print("")
    with warehouse.session() as session:
        _print(_summary_tables(session, symbols))
    failed_checks = ingested + featured
    if failed_checks:
        _print(f"asset checks that did not pass ({len(failed_checks)}):")
        for line in failed_checks:
            _print(f"  {line}")
    _print(f"done in {time.perf_counter() - started:.1f}s: {len(partitions)} partitions of market_ticks, aggregates, ml_features")
    if demo_training(instance, resources, symbols):
        return 1
    _print("")
    _print("Open the Dagster UI on the same data:")
    _print("  make ui        (or: .venv/bin/tradeforge ui)  ->  http://127.0.0.1:3000")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    """Copy files into the import folder, show what they hold, and ingest the days they cover
    through the file vendor: the same validation, quarantine, candles and checks as any vendor."""
    from datetime import UTC, datetime

    from dagster import DagsterInstance

    from assets.market_data import aggregates, market_ticks, vendor_candles
    from assets.partitions import SYMBOLS, DaySymbol
    from models.market.instruments import instrument
    from orchestration.instance import ensure_dagster_home
    from orchestration.resources import resources_from_env
    from resources.market_data import MarketDataResource
    from resources.vendors.files import LAYOUTS, FileImportResource, detect_layout, read_file

    symbol = instrument(args.symbol).symbol
    files = FileImportResource(directory=args.directory or "", layout=args.layout, timezone=args.timezone or "")
    target = files.root() / symbol
    target.mkdir(parents=True, exist_ok=True)
    days: set[date] = set()
    everything = (datetime(1970, 1, 1, tzinfo=UTC), datetime(2100, 1, 1, tzinfo=UTC))
    for source in args.files:
        from pathlib import Path

        path = Path(source)
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
        copy = target / path.name
        if copy.resolve() != path.resolve():
            shutil.copy2(path, copy)
        name = detect_layout(copy) if args.layout == "auto" else args.layout
        layout = files.layout_of(copy)
        rows = read_file(copy, layout, *everything)
        if rows.is_empty():
            _print(f"{path.name}: layout {name} ({layout.kind}), no rows")
            continue
        first, last = rows["ts"].min(), rows["ts"].max()
        days |= set(rows["ts"].dt.date().unique().to_list())
        _print(f"{path.name}: layout {name} ({layout.kind}, times in {layout.timezone}), {rows.height:,} rows, "
               f"{first:%Y-%m-%d %H:%M:%S} .. {last:%Y-%m-%d %H:%M:%S} UTC -> {copy}")
    if not days or args.no_ingest:
        _print("nothing ingested" if not days else f"copied; {len(days)} day(s) to ingest with the file vendor")
        return 0
    ensure_dagster_home()
    instance = DagsterInstance.get()
    instance.add_dynamic_partitions(SYMBOLS.name, [symbol])
    resources = resources_from_env()
    resources["market_data"] = MarketDataResource(files=files, primary="files")
    resources["warehouse"].process_config_and_initialize().migrate()
    partitions = [DaySymbol(symbol, day) for day in sorted(days)]
    _print(f"ingesting {len(partitions)} day(s) of {symbol} from {files.root()}:")
    failed = _materialize_partitions(
        instance, resources, [market_ticks, vendor_candles, aggregates], partitions,
        lambda m: f"{m['market_ticks']['dagster/row_count'].value:>8,} ticks  "
        f"{m['vendor_candles']['dagster/row_count'].value:>6,} candles  "
        f"{m['aggregates']['dagster/row_count'].value:>6,} bars  {m['market_ticks']['quarantined_rows'].value} quarantined",
    )
    if failed is None:
        return 1
    for line in failed:
        _print(f"  check did not pass: {line}")
    _print(f"layouts known: {', '.join(sorted(LAYOUTS))}")
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


def _progress_lines() -> None:
    """Training progress (the `tradeforge.training` logger) as plain lines on stdout."""
    logger = logging.getLogger("tradeforge.training")
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

    _print("")
    spec = resources["training"].spec(DEMO_SPEC)
    warehouse = resources["warehouse"].process_config_and_initialize()
    rows = warehouse.query_frame(
        f"SELECT count() AS n FROM ml_features FINAL WHERE feature_set = {{fs:String}} AND timeframe = {{tf:String}} "
        f"AND symbol IN {{symbols:Array(String)}} AND warm = 1 AND {spec.target} IS NOT NULL",
        {"fs": feature_set_version(), "tf": spec.timeframe.value, "symbols": list(symbols)},
    )["n"][0]
    if rows < DEMO_MIN_ROWS:
        _print(f"training: skipped, {rows:,} warm {spec.timeframe.value} rows with a {spec.target} label (at least "
               f"{DEMO_MIN_ROWS:,} needed; the warm-up takes ~5.2 days of M5 bars: run the demo with --days 7 or more)")
        return 0
    return _train_spec(instance, resources, DEMO_SPEC)


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

    home = ensure_dagster_home()
    dagster = shutil.which("dagster", path=os.path.dirname(sys.executable)) or shutil.which("dagster")
    if dagster is None:
        _print("dagster is not installed in this environment; run `make demo` first")
        return 1
    _print(f"DAGSTER_HOME={home}")
    os.execv(dagster, [dagster, "dev", "-w", "workspace.yaml", "-h", args.host, "-p", str(args.port)])
    return 0  # not reached


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tradeforge", description="tradeforge: from market ticks to live orders")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="ingest synthetic ticks and build candles on the embedded engines")
    demo.add_argument("--symbols", nargs="+", default=list(DEMO_SYMBOLS))
    demo.add_argument("--start", type=date.fromisoformat, default=DEMO_START, help="first UTC day (YYYY-MM-DD)")
    demo.add_argument("--days", type=_positive_int, default=DEMO_DAYS)
    demo.set_defaults(func=cmd_demo)

    warehouse = commands.add_parser("warehouse", help="warehouse administration")
    warehouse_commands = warehouse.add_subparsers(dest="action", required=True)
    warehouse_commands.add_parser("migrate", help="apply pending schema migrations").set_defaults(func=cmd_migrate)

    symbols = commands.add_parser("symbols", help="list or add symbols (the symbol partitions)")
    symbols.add_argument("action", choices=["list", "add"])
    symbols.add_argument("symbols", nargs="*", default=[])
    symbols.set_defaults(func=cmd_symbols)

    imports = commands.add_parser("import", help="load CSV/Parquet ticks or M1 bars you already have (MT5, HistData, Dukascopy, ...)")
    imports.add_argument("files", nargs="+", help="files of one symbol")
    imports.add_argument("--symbol", required=True)
    imports.add_argument("--layout", default="auto", help="'auto' (recognised from the first line) or a layout name")
    imports.add_argument("--timezone", default="", help="time zone of the files' times (MT5 exports use the broker's server time)")
    imports.add_argument("--directory", default="", help="import folder (default $TRADEFORGE_HOME/imports)")
    imports.add_argument("--no-ingest", action="store_true", help="only copy and inspect")
    imports.set_defaults(func=cmd_import)

    features = commands.add_parser("features", help="the feature registry: version, catalog")
    features.add_argument("action", choices=["version", "catalog"])
    features.set_defaults(func=cmd_features)

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, RuntimeError) as exc:
        print(f"tradeforge: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
