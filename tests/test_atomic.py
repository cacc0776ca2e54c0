"""Partitions are replaced all or nothing: kill -9 a re-materialization at 20 random moments,
and after each a reader sees, for every day and table, the old rows or the new rows, never
none and never both."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest

from resources.warehouse import WarehouseResource
from resources.warehouse.commits import visible

KILLS = 20
START, END = datetime(2024, 3, 6, tzinfo=UTC), datetime(2024, 3, 8, tzinfo=UTC)
# (table, the day a row belongs to, what identifies the content)
_TABLES = {
    "market_ticks": ("toDate(ts)", "round(sum(bid), 4)"),
    "aggregates": ("toDate(covered_until - 1)", "round(sum(close), 4)"),
    "ml_features": ("toDate(ts)", "round(sum(coalesce(rsi_14, 0)), 6)"),
}


def snapshot(warehouse: WarehouseResource, hidden: bool = False) -> dict[tuple[str, str], tuple[int, float]]:
    """(table, day) -> (rows, checksum) of what a reader sees (or, ``hidden``, of every row stored)."""
    seen = {}
    for table, (day, checksum) in _TABLES.items():
        where = "1" if hidden else visible(table)
        frame = warehouse.query_frame(f"SELECT toString({day}) AS day, count() AS n, {checksum} AS c FROM {table} "
                                      f"WHERE symbol = 'BTCUSD' AND {where} GROUP BY day ORDER BY day")
        for row in frame.iter_rows(named=True):
            seen[(table, row["day"])] = (row["n"], row["c"])
    return seen


class ForkServer:
    def __init__(self, warehouse: WarehouseResource, env: dict[str, str]) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.atomic_worker", str(warehouse.embedded_dir), warehouse.database],
            env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, bufsize=1)
        assert self.readline() == "ready"

    def readline(self) -> str:
        return self.process.stdout.readline().strip()

    def send(self, command: str) -> None:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()

    def once(self, generation: int) -> float:
        started = time.monotonic()
        self.send(f"once {generation}")
        assert self.readline() == f"done {generation}"
        return time.monotonic() - started

    def loop(self, generation: int) -> int:
        self.send(f"loop {generation}")
        line = self.readline()
        assert line.startswith("child "), line
        return int(line.split()[1])

    def close(self) -> None:
        self.send("quit")
        self.process.wait(timeout=30)


def _dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


@pytest.mark.slow
def test_kill_9_at_20_random_moments_leaves_old_or_new_rows_never_none_never_both(warehouse, subprocess_env):
    warehouse.migrate()
    server = ForkServer(warehouse, subprocess_env)
    try:
        durations = [server.once(0)]
        generation_0 = snapshot(warehouse)
        durations.append(server.once(1))
        generation_1 = snapshot(warehouse)
        assert set(generation_0) == set(generation_1) and len(generation_0) == 6  # 3 tables x 2 days
        assert all(generation_0[key] != generation_1[key] for key in generation_0)  # the two contents differ
        assert all(n > 0 for n, _ in generation_0.values())
        run_time = max(durations)
        rng = random.Random(20241124)
        outcomes = []
        for kill in range(KILLS):
            pid = server.loop(kill)
            time.sleep(rng.uniform(0.0, run_time))  # somewhere in a run: fetching, writing, committing, cleaning
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while not _dead(pid) and time.monotonic() < deadline:
                time.sleep(0.01)
            seen = snapshot(warehouse)
            assert set(seen) == set(generation_0), f"kill {kill}: a day lost all its rows in some table: {seen}"
            for key, value in seen.items():
                assert value in (generation_0[key], generation_1[key]), (
                    f"kill {kill}: {key} shows {value}, neither the old {generation_0[key]} nor the new {generation_1[key]}")
            outcomes.append(tuple(int(seen[key] == generation_1[key]) for key in sorted(seen)))
        # the kills landed in different phases: some tables were caught on either side
        assert len(set(outcomes)) > 1, outcomes
        # a run after all this completes, and leaves no hidden left-overs of the killed ones
        server.once(0)
        assert snapshot(warehouse) == generation_0
        assert snapshot(warehouse, hidden=True) == generation_0
    finally:
        server.close()
