"""The ``tradeforge`` command line."""

from __future__ import annotations

import argparse
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


def _param(text: str) -> tuple[str, object]:
    """``fast=12`` -> ("fast", 12): numbers become numbers, the rest stays text."""
    import yaml

    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r} is not NAME=VALUE")
    return key.strip(), yaml.safe_load(value)


def _summary_table(run) -> str:
    m = run.result.metrics
    rows = [
        ("total return", f"{m['total_return']:.2%}"), ("buy and hold", f"{m.get('buy_hold_return', float('nan')):.2%}"),
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
    _print(_summary_table(run))
    _print(f"tearsheet: {run.tearsheet}")
    return 0


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

    bt = commands.add_parser("backtest", help="backtest a strategy spec (orchestration/backtests.yaml) or a registered strategy")
    bt.add_argument("--strategy", required=True, help="a spec name, or a registered strategy (sma_cross, donchian_breakout)")
    bt.add_argument("--symbols", nargs="+", type=str.upper, help="overrides the spec's symbols")
    bt.add_argument("--start", type=date.fromisoformat, help="first UTC day (YYYY-MM-DD)")
    bt.add_argument("--end", type=date.fromisoformat, help="UTC day after the last (YYYY-MM-DD)")
    bt.add_argument("--timeframe", type=str.upper, help="M1 M5 M15 M30 H1 H4 D1 (default: the spec's, else M5)")
    bt.add_argument("--param", type=_param, action="append", help="strategy parameter NAME=VALUE (repeatable)")
    bt.add_argument("--risk", type=_param, action="append", help="risk setting NAME=VALUE (repeatable)")
    bt.set_defaults(func=cmd_backtest)

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
