"""The `tradeforge` command as a user runs it: a separate process, its own state directory."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from resources.warehouse import WarehouseResource
from resources.warehouse.migrations import MIGRATIONS

TRADEFORGE = Path(sys.executable).with_name("tradeforge")


def tradeforge(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    assert TRADEFORGE.exists(), "the console script is missing: install the project (make test does)"
    return subprocess.run([str(TRADEFORGE), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.fixture
def user_env(subprocess_env, tmp_path) -> dict[str, str]:
    env = dict(subprocess_env)
    env.pop("DAGSTER_HOME", None)
    env["TRADEFORGE_HOME"] = str(tmp_path / "state")
    return env


def test_demo_ingests_builds_candles_and_reports(user_env, tmp_path):
    done = tradeforge("demo", "--symbols", "EURUSD", "BTCUSD", "--start", "2024-03-08", "--days", "2",
                      env=user_env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "4/4]" in out and "FAILED" not in out
    assert "make ui" in out and "http://127.0.0.1:3000" in out
    warehouse = WarehouseResource(embedded_path=str(tmp_path / "state" / "warehouse"))
    counts = dict(warehouse.query_frame("SELECT symbol, count() AS n FROM market_ticks GROUP BY symbol").iter_rows())
    # The summary prints what the warehouse holds.
    for symbol, n in counts.items():
        assert re.search(rf"{symbol}\s+{n:,}\s", out), (symbol, n)
    bars = warehouse.query_frame(
        "SELECT count() AS n FROM aggregates FINAL WHERE symbol = 'BTCUSD' AND timeframe = 'M1'")["n"][0]
    assert bars == 2 * 1440
    assert (tmp_path / "state" / "dagster" / "dagster.yaml").exists()


def test_migrate_is_idempotent(user_env, tmp_path):
    first = tradeforge("warehouse", "migrate", env=user_env, cwd=tmp_path)
    second = tradeforge("warehouse", "migrate", env=user_env, cwd=tmp_path)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert f"applied migrations {[m.version for m in MIGRATIONS]}" in first.stdout
    assert "schema is current" in second.stdout


def test_bad_input_is_refused_with_a_clear_message(user_env, tmp_path):
    unknown = tradeforge("symbols", "add", "FOOBAR", env=user_env, cwd=tmp_path)
    assert unknown.returncode == 1 and "unknown instrument 'FOOBAR'" in unknown.stderr
    added = tradeforge("symbols", "add", "usdjpy", env=user_env, cwd=tmp_path)
    assert added.returncode == 0 and added.stdout.split() == ["USDJPY"]
    days = tradeforge("demo", "--days", "0", env=user_env, cwd=tmp_path)
    assert days.returncode == 2 and "--days: must be at least 1" in days.stderr
    boundary = dict(user_env, TRADEFORGE_DAY_BOUNDARY="london")
    wrong = tradeforge("demo", "--days", "1", env=boundary, cwd=tmp_path)
    assert wrong.returncode == 1 and "day_boundary" in wrong.stderr
