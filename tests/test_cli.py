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


def test_import_loads_an_mt5_export_through_the_file_vendor(user_env, tmp_path):
    export = tmp_path / "EURUSD_ticks.csv"
    lines = ["<DATE>\t<TIME>\t<BID>\t<ASK>\t<LAST>\t<VOLUME>\t<FLAGS>"]
    lines += [f"2024.03.06\t{10 + i // 60:02d}:{i % 60:02d}:00.500\t{1.085 + i * 1e-5:.5f}\t{1.0851 + i * 1e-5:.5f}\t\t\t6" for i in range(120)]
    lines.append("2024.03.06\t12:00:00.000\t1.09000\t1.08000\t\t\t6")  # crossed: quarantined, not lost
    export.write_text("\n".join(lines) + "\n")
    done = tradeforge("import", str(export), "--symbol", "eurusd", "--timezone", "EET", env=user_env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "layout mt5_ticks (ticks, times in EET), 121 rows, 2024-03-06 08:00:00 .. 2024-03-06 10:00:00 UTC" in done.stdout
    assert "1/1] EURUSD  2024-03-06" in done.stdout and "120 ticks" in done.stdout and "1 quarantined" in done.stdout
    assert (tmp_path / "state" / "imports" / "EURUSD" / export.name).exists()  # the original is copied, kept
    warehouse = WarehouseResource(embedded_path=str(tmp_path / "state" / "warehouse"))
    stored = warehouse.query_frame("SELECT min(ts) AS first, count() AS n, any(source) AS source FROM market_ticks").row(0, named=True)
    assert stored["n"] == 120 and stored["source"] == "file"
    h1 = warehouse.query_frame("SELECT count() AS n FROM aggregates FINAL WHERE timeframe = 'H1'")["n"][0]
    assert h1 == 2  # 08:00 and 09:00 UTC (10:00 and 11:00 in Cyprus winter time)
    missing = tradeforge("import", str(tmp_path / "nope.csv"), "--symbol", "EURUSD", env=user_env, cwd=tmp_path)
    assert missing.returncode == 1 and "no such file" in missing.stderr
