"""`backtest`: rule-based strategy specs (orchestration/backtests.yaml) run on the warehouse's
bars by the trading engine; results to backtest_runs/trades/equity, tearsheet to disk."""

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import yaml
from dagster import (
    AllPartitionMapping,
    AssetCheckResult,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    MaterializeResult,
    MetadataValue,
    StaticPartitionsDefinition,
    asset,
)

from models.backtest.runner import BacktestResult, run_backtest
from models.backtest.spec import BacktestSpec
from models.backtest.tearsheet import tearsheet_html
from resources.warehouse import WarehouseResource
from resources.warehouse.backtests import load_bars, tearsheet_dir, write_backtest

SPECS_FILE = Path(__file__).resolve().parents[1] / "orchestration" / "backtests.yaml"


def specs_path() -> Path:
    return Path(os.environ.get("TRADEFORGE_BACKTEST_SPECS") or SPECS_FILE)


def load_specs(path: Path | None = None) -> dict[str, BacktestSpec]:
    """Every spec of the file, validated; one clear error naming the file and the spec."""
    path = path or specs_path()
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read backtest specs {path}: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path}: expected a mapping of spec names to specs")
    specs = {}
    for name, data in raw.items():
        try:
            specs[str(name)] = BacktestSpec.from_dict(str(name), data or {})
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: {exc}") from None
    return specs


@dataclass
class BacktestRun:
    run_id: str
    result: BacktestResult
    tearsheet: Path
    seconds: float


def execute_backtest(warehouse: WarehouseResource, spec: BacktestSpec, source: str,
                     progress: Callable[[str], None] | None = None) -> BacktestRun:
    """Bars of the spec's window (with warm-up bars before it) from the warehouse -> the engine
    -> the three backtest tables and the tearsheet. Raises ValueError with one clear line."""
    say = progress or (lambda _: None)
    started = time.perf_counter()
    strategy, config = spec.build()
    bars, rates = load_bars(warehouse, spec.symbols, spec.timeframe, spec.start, spec.end, strategy.warmup + 1,
                            spec.account_currency, say)
    total = bars.height
    result = run_backtest(bars, strategy, config, rates=rates, name=spec.name, trade_from=spec.start,
                          progress=lambda done, n: say(f"  engine: {done:,}/{n:,} bars ({done / n:.0%})"))
    path = tearsheet_dir() / f"{spec.run_id}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tearsheet_html(result, title=f"{spec.name}: {strategy.describe()} on {', '.join(spec.symbols)} {spec.timeframe.value}"))
    write_backtest(warehouse, spec.run_id, result, name=spec.name, params=strategy.params, config=spec.as_dict(),
                   tearsheet=str(path), source=source)
    say(f"  stored run {spec.run_id} ({total:,} bars read), tearsheet {path}")
    return BacktestRun(spec.run_id, result, path, time.perf_counter() - started)


def _partitions() -> StaticPartitionsDefinition:
    try:
        names = sorted(load_specs())
    except ValueError:
        names = []  # a broken spec file fails the run with its reason, not the code location
    return StaticPartitionsDefinition(names or ["none"])


BACKTEST_SPECS = _partitions()


def _checks(result: BacktestResult) -> list[AssetCheckResult]:
    orders = result.orders.select("client_id", "bar_ts")
    late = result.fills.join(orders, on="client_id").filter(pl.col("ts") <= pl.col("bar_ts")).height
    pf = result.engine.portfolio
    booked = pf.initial_equity + sum(t.gross_pnl - t.commission for t in pf.trades)
    gap = abs(pf.balance - booked)
    return [
        AssetCheckResult(check_name="fills_after_decisions", passed=late == 0,
                         metadata={"fills": result.fills.height, "fills_at_or_before_their_decision": late}),
        AssetCheckResult(check_name="balance_reconciles", passed=gap <= 1e-6 * max(1.0, abs(booked)),
                         metadata={"balance": pf.balance, "from_trades": booked, "difference": gap}),
    ]


@asset(
    partitions_def=BACKTEST_SPECS,
    group_name="backtests",
    kinds={"clickhouse", "polars", "plotly"},
    deps=[AssetDep("aggregates", partition_mapping=AllPartitionMapping())],
    check_specs=[
        AssetCheckSpec("fills_after_decisions", asset="backtest", description="every fill comes after the bar that decided it"),
        AssetCheckSpec("balance_reconciles", asset="backtest", description="cash equals the start plus every trade's net PnL"),
    ],
    description="A rule-based strategy spec (orchestration/backtests.yaml) backtested on the warehouse's bars.",
)
def backtest(context: AssetExecutionContext, warehouse: WarehouseResource) -> MaterializeResult:
    specs = load_specs()
    if context.partition_key not in specs:
        raise ValueError(f"no spec {context.partition_key!r} in {specs_path()}")
    spec = specs[context.partition_key]
    run = execute_backtest(warehouse, spec, source="dagster", progress=context.log.info)
    m = run.result.metrics
    eq = run.result.equity
    step = max(1, eq.height // 200)
    curve = eq.gather_every(step).select(pl.col("ts").dt.strftime("%Y-%m-%dT%H:%M"), pl.col("equity").round(2))
    numbers = {k: MetadataValue.float(float(m[k])) for k in ("total_return", "annual_return", "sharpe", "sortino", "calmar",
                                                             "max_drawdown", "win_rate", "profit_factor", "exposure",
                                                             "final_equity") if m.get(k) == m.get(k)}
    return MaterializeResult(
        metadata={
            "run_id": run.run_id, "trades": int(m["trades"]), "dagster/row_count": eq.height, **numbers,
            **({"buy_hold_return": MetadataValue.float(float(m["buy_hold_return"]))} if "buy_hold_return" in m else {}),
            "equity_curve": MetadataValue.json({"ts": curve["ts"].to_list(), "equity": curve["equity"].to_list()}),
            "tearsheet": MetadataValue.path(str(run.tearsheet)),
            "tearsheet_url": MetadataValue.url(run.tearsheet.as_uri()),
            "strategy": f"{spec.strategy} {spec.params}",
        },
        check_results=_checks(run.result),
    )
