"""Backfills as the UI launches them, run by Dagster's own backfill daemon iteration: any day
x symbol range and any selection of the graph completes as one run per symbol, materializes
exactly what was asked, and needs no day after the range."""

from __future__ import annotations

import logging
import time
from datetime import date, timedelta
from pathlib import Path

import pytest
from dagster import AssetKey, instance_for_test
from dagster._core.execution.backfill import BulkActionStatus, PartitionBackfill
from dagster._core.remote_origin import InProcessCodeLocationOrigin
from dagster._core.types.loadable_target_origin import LoadableTargetOrigin
from dagster._core.workspace.context import WorkspaceProcessContext
from dagster._core.workspace.load_target import InProcessWorkspaceLoadTarget
from dagster._daemon.backfill import execute_backfill_iteration
from dagster._daemon.run_coordinator.queued_run_coordinator_daemon import QueuedRunCoordinatorDaemon

from assets.partitions import SYMBOLS, day_symbol_key
from models.market.synthetic import SyntheticMarketConfig, generate_ticks
from resources.warehouse.commits import visible

ROOT = Path(__file__).resolve().parents[1]
MARKET = ["market_ticks", "vendor_candles", "aggregates"]


@pytest.fixture
def workspace(warehouse, monkeypatch):
    monkeypatch.setenv("TF_TEST_WAREHOUSE", str(warehouse.embedded_dir))
    monkeypatch.setenv("TF_TEST_DATABASE", warehouse.database)
    origin = LoadableTargetOrigin(python_file=str(ROOT / "tests" / "backfill_defs.py"), attribute="defs",
                                  working_directory=str(ROOT))
    launcher = {"module": "dagster._core.launcher.sync_in_memory_run_launcher", "class": "SyncInMemoryRunLauncher"}
    with instance_for_test(overrides={"run_launcher": launcher}) as instance:
        instance.add_dynamic_partitions(SYMBOLS.name, ["EURUSD", "BTCUSD"])
        with WorkspaceProcessContext(instance, InProcessWorkspaceLoadTarget(InProcessCodeLocationOrigin(origin))) as context:
            yield context


def backfill(context, assets: list[str], symbols: list[str], first: date, last: date) -> PartitionBackfill:
    """Launch a backfill the way the UI's "Materialize selected" with a partition range does
    (PartitionBackfill.from_asset_partitions), then let the daemons run it: the backfill
    daemon's iteration requests runs, the run queue daemon (the instance's queued run
    coordinator, as in dagster.yaml) launches them."""
    instance = context.instance
    keys = [str(day_symbol_key(first + timedelta(days=i), s)) for s in symbols for i in range((last - first).days + 1)]
    launched = PartitionBackfill.from_asset_partitions(
        backfill_id=f"bf{time.time_ns()}", asset_graph=context.create_request_context().asset_graph,
        partition_names=keys, asset_selection=[AssetKey(a) for a in assets], backfill_timestamp=time.time(), tags={},
        dynamic_partitions_store=instance, all_partitions=False, title=None, description=None, run_config=None,
    )
    instance.add_backfill(launched)
    for _ in range(20):
        errors = [e for e in execute_backfill_iteration(context, logging.getLogger("backfill-test")) if e is not None]
        assert not errors, errors[0].to_string()
        list(QueuedRunCoordinatorDaemon(interval_seconds=1).run_iteration(context))
        done = instance.get_backfill(launched.backfill_id)
        if done.status != BulkActionStatus.REQUESTED:
            return done
    runs = [(r.run_id[:8], r.status, r.tags.get("dagster/asset_partition_range_start")) for r in instance.get_runs()]
    raise AssertionError(f"backfill still {done.status} after 20 iterations; runs {runs}")  # pragma: no cover


def materialized(instance, asset: str) -> set[str]:
    return set(instance.get_materialized_partitions(AssetKey(asset)))


def test_a_ui_backfill_of_a_few_days_needs_no_day_after_them_and_runs_once_per_symbol(workspace, warehouse):
    instance = workspace.instance
    first, last = date(2024, 3, 6), date(2024, 3, 8)
    done = backfill(workspace, MARKET, ["EURUSD", "BTCUSD"], first, last)
    assert done.status == BulkActionStatus.COMPLETED_SUCCESS, done.status
    asked = {str(day_symbol_key(first + timedelta(days=i), s)) for s in ("EURUSD", "BTCUSD") for i in range(3)}
    for asset in MARKET:
        assert materialized(instance, asset) == asked, asset  # nothing outside the selection
    runs = instance.get_runs()
    assert len(runs) == 2 and all(r.is_success for r in runs)  # a range is one run per symbol, not one per day
    assert {r.tags["dagster/asset_partition_range_start"].split("|")[1] for r in runs} == {"EURUSD", "BTCUSD"}
    bars = warehouse.query_frame(f"SELECT symbol, toDate(ts) AS day, count() AS n FROM aggregates WHERE timeframe = 'M1' "
                                 f"AND {visible('aggregates')} GROUP BY symbol, day ORDER BY symbol, day")
    expected = [generate_ticks("BTCUSD", first + timedelta(days=i), SyntheticMarketConfig(7, 0.1))["ts"].dt.truncate("1m").n_unique()
                for i in range(3)]
    assert bars.height == 6 and bars.filter(bars["symbol"] == "BTCUSD")["n"].to_list() == expected


def test_any_selection_of_the_graph_completes_features_included(workspace, warehouse):
    instance = workspace.instance
    first, last = date(2024, 3, 4), date(2024, 3, 7)
    everything = [*MARKET, "ml_features"]
    done = backfill(workspace, everything, ["BTCUSD"], first, last)
    assert done.status == BulkActionStatus.COMPLETED_SUCCESS, done.status
    asked = {str(day_symbol_key(first + timedelta(days=i), "BTCUSD")) for i in range(4)}
    assert all(materialized(instance, asset) == asked for asset in everything)
    features = warehouse.query_frame(f"SELECT toDate(ts) AS day, count() AS n, countIf(fwd_ret_1h IS NULL) AS open_labels "
                                     f"FROM ml_features WHERE {visible('ml_features')} GROUP BY day ORDER BY day")
    assert features["n"].to_list() == [288] * 4
    assert features["open_labels"].to_list()[:3] == [0, 0, 0]  # labels inside the range are complete in one run
    # features alone, for days whose candles exist: the selection's root is ml_features
    again = backfill(workspace, ["ml_features"], ["BTCUSD"], date(2024, 3, 5), date(2024, 3, 6))
    assert again.status == BulkActionStatus.COMPLETED_SUCCESS
    assert len(instance.get_runs()) == 2
