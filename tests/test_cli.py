"""The `tradeforge` command as a user runs it: a separate process, its own state directory.
Every failure is one line and a non-zero exit, never a traceback, and leaves nothing behind."""

from __future__ import annotations

import re
import subprocess
import sys
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest

from models.market.candles import aggregate_ticks
from models.market.synthetic import SyntheticMarketConfig, generate_ticks
from resources.warehouse import WarehouseResource
from resources.warehouse.commits import visible
from resources.warehouse.migrations import MIGRATIONS

TRADEFORGE = Path(sys.executable).with_name("tradeforge")


def tradeforge(*args: str, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    assert TRADEFORGE.exists(), "the console script is missing: install the project (make test does)"
    return subprocess.run([str(TRADEFORGE), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=600)


def one_line_failure(done: subprocess.CompletedProcess, *fragments: str) -> None:
    """Exit 1 and exactly one line on stderr, naming what went wrong; no traceback anywhere."""
    assert done.returncode == 1, (done.stdout, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("tradeforge: "), done.stderr
    assert "Traceback" not in done.stdout + done.stderr
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])


@pytest.fixture
def user_env(subprocess_env, tmp_path) -> dict[str, str]:
    env = dict(subprocess_env)
    env.pop("DAGSTER_HOME", None)
    env["TRADEFORGE_HOME"] = str(tmp_path / "state")
    yield env
    # The embedded bus a command started on demand (the demo's training events) stays up for the
    # user's next command, as it should; the test's own stops here, never left to the next tests.
    from resources.bus import EmbeddedNatsServer

    EmbeddedNatsServer(tmp_path / "state" / "nats").stop()


def stored(tmp_path: Path, sql: str) -> pl.DataFrame:
    return WarehouseResource(embedded_path=str(tmp_path / "state" / "warehouse")).query_frame(sql)


def test_demo_ingests_builds_candles_and_features_and_reports(user_env, tmp_path):
    # 7 days: the fewest that train (BTCUSD's warm M5 rows); EURUSD's window never warms (a weekend in it)
    done = tradeforge("demo", "--symbols", "EURUSD", "BTCUSD", "--start", "2024-03-07", "--days", "7",
                      env=user_env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"state: {tmp_path / 'state'}" in out
    assert "FAILED" not in out and "checks ok" in out
    assert "make ui" in out and "http://127.0.0.1:3000" in out
    assert "keeps running on nats://127.0.0.1:4222 for the next commands; `.venv/bin/tradeforge bus stop` stops it" in out
    counts = dict(stored(tmp_path, f"SELECT symbol, count() AS n FROM market_ticks WHERE {visible('market_ticks')} "
                                   "GROUP BY symbol").iter_rows())
    # every row read is accounted for, and the summary prints what the warehouse holds
    for symbol, n in counts.items():
        assert re.search(rf"{symbol}\s+{n:,}\s", out), (symbol, n)
        assert f"ticks: read {n:,} = stored {n:,} + quarantined 0" in out
    bars = stored(tmp_path, "SELECT count() AS n FROM aggregates WHERE symbol = 'BTCUSD' AND timeframe = 'M1'")["n"][0]
    assert bars == 7 * 1440
    assert stored(tmp_path, "SELECT count() AS n FROM ml_features WHERE timeframe = 'M5'")["n"][0] > 0
    assert (tmp_path / "state" / "dagster" / "dagster.yaml").exists()
    # trained, backtested, then the last day replayed through the live runner beside the backtest: the same numbers
    assert "gate: refused" in out
    head = re.search(r"^live runner: 2024-03-13 \(([\d,]+) M5 bars of BTCUSD EURUSD\) replayed over NATS", out, re.M)
    row = r"\s+([\d,]+)\s+([\d,]+)\s+([\d,]+)\s+([\d,.]+)$"
    live, backtest = re.search(r"^  live runner" + row, out, re.M), re.search(r"^  backtest" + row, out, re.M)
    assert head and live and backtest, out
    assert live.groups() == backtest.groups()
    orders, entries, fills, equity = (float(g.replace(",", "")) for g in live.groups())
    assert orders >= entries > 0 and fills > 0 and equity != 100_000.0  # it traded
    closes = int(head[1].replace(",", "")) // 2  # BTCUSD and EURUSD bars share their times
    assert f"identical: every order (side, size, intent, bar, final state), every fill (price, size, commission, time) and " \
           f"the equity at all {closes:,} bar closes" in out
    assert f"  {head[1]} bars in " in out


def test_migrate_is_idempotent(user_env, tmp_path):
    first = tradeforge("warehouse", "migrate", env=user_env, cwd=tmp_path)
    second = tradeforge("warehouse", "migrate", env=user_env, cwd=tmp_path)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert f"applied migrations {[m.version for m in MIGRATIONS]}" in first.stdout
    assert "schema is current" in second.stdout


def test_bad_input_is_refused_with_one_clear_line(user_env, tmp_path):
    one_line_failure(tradeforge("symbols", "add", "FOOBAR", env=user_env, cwd=tmp_path), "unknown instrument 'FOOBAR'")
    added = tradeforge("symbols", "add", "usdjpy", env=user_env, cwd=tmp_path)
    assert added.returncode == 0 and added.stdout.split()[-1] == "USDJPY"
    days = tradeforge("demo", "--days", "0", env=user_env, cwd=tmp_path)
    assert days.returncode == 2 and "--days: must be at least 1" in days.stderr
    one_line_failure(tradeforge("demo", "--days", "1", env=dict(user_env, TRADEFORGE_DAY_BOUNDARY="london"), cwd=tmp_path),
                     "day_boundary")
    one_line_failure(tradeforge("demo", "--start", "1995-01-02", "--days", "1", env=user_env, cwd=tmp_path),
                     "1995-01-02 is before the first partition day 2000-01-01", "TRADEFORGE_FIRST_DAY")
    tomorrow = (datetime.now(UTC).date() + timedelta(days=1)).isoformat()
    one_line_failure(tradeforge("demo", "--start", tomorrow, "--days", "1", env=user_env, cwd=tmp_path), "is not a past day")
    one_line_failure(tradeforge("demo", "--days", "1", env=dict(user_env, TRADEFORGE_FIRST_DAY="soon"), cwd=tmp_path),
                     "TRADEFORGE_FIRST_DAY='soon' is not a date")


def mt5_ticks(rows: int = 120) -> str:
    lines = ["<DATE>\t<TIME>\t<BID>\t<ASK>\t<LAST>\t<VOLUME>\t<FLAGS>"]
    lines += [f"2024.03.06\t{10 + i // 60:02d}:{i % 60:02d}:00.500\t{1.085 + i * 1e-5:.5f}\t{1.0851 + i * 1e-5:.5f}\t\t\t6"
              for i in range(rows)]
    return "\n".join(lines) + "\n"


def test_import_loads_an_mt5_export_through_the_file_vendor(user_env, tmp_path):
    export = tmp_path / "EURUSD_ticks.csv"
    export.write_text(mt5_ticks() + "2024.03.06\t12:00:00.000\t1.09000\t1.08000\t\t\t6\n")  # crossed: quarantined, not lost
    done = tradeforge("import", str(export), "--symbol", "eurusd", "--timezone", "EET", env=user_env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "layout mt5_ticks (ticks, times in EET), 121 rows, 2024-03-06 08:00:00 .. 2024-03-06 10:00:00 UTC" in done.stdout
    assert "ticks: read 121 = stored 120 + quarantined 1 {'crossed_quote': 1}" in done.stdout
    assert (tmp_path / "state" / "imports" / "EURUSD" / f"{export.name}.parquet").exists()  # validated, normalised
    ticks = stored(tmp_path, "SELECT min(ts) AS first, count() AS n, any(source) AS source FROM market_ticks").row(0, named=True)
    assert ticks["n"] == 120 and ticks["source"] == "file"
    h1 = stored(tmp_path, "SELECT count() AS n FROM aggregates WHERE timeframe = 'H1'")["n"][0]
    assert h1 == 2  # 08:00 and 09:00 UTC (10:00 and 11:00 in Cyprus winter time)
    one_line_failure(tradeforge("import", str(tmp_path / "nope.csv"), "--symbol", "EURUSD", env=user_env, cwd=tmp_path),
                     "nope.csv: no such file")


def test_a_rejected_file_is_one_line_and_never_poisons_a_later_import(user_env, tmp_path, capsys, monkeypatch):
    from orchestration.cli import main

    good = tmp_path / "good.csv"
    good.write_text(mt5_ticks(30))
    bad = {
        "empty.csv": b"",
        "header_only.csv": b"<DATE>\t<TIME>\t<BID>\t<ASK>\t<LAST>\t<VOLUME>\t<FLAGS>\n",
        "unknown.csv": b"foo,bar\n1,2\n",
        "binary.csv": bytes(range(256)) * 4,
        "corrupt.parquet": b"PAR1 this is not parquet PAR1",
        "dates.csv": b"ts,bid,ask\nyesterday,1.1,1.2\n",
    }
    expected = {"empty.csv": "empty file", "header_only.csv": "no rows", "unknown.csv": "--columns ts=",
                "binary.csv": "binary content", "corrupt.parquet": "not a readable Parquet file",
                "dates.csv": "timestamps do not parse"}
    monkeypatch.setenv("TRADEFORGE_HOME", user_env["TRADEFORGE_HOME"])  # the command's own entry point, in-process
    for name, content in bad.items():
        path = tmp_path / name
        path.write_bytes(content)
        assert main(["import", str(path), "--symbol", "EURUSD", "--no-ingest"]) == 1
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and err[0].startswith("tradeforge: ") and name in err[0] and expected[name] in err[0], err
    folder = tmp_path / "state" / "imports" / "EURUSD"
    assert not folder.exists() or not any(folder.iterdir())  # nothing of a rejected file stays behind
    # as a user runs it: a file with one bad sibling is refused whole, nothing joins the folder
    one_line_failure(tradeforge("import", str(good), str(tmp_path / "unknown.csv"), "--symbol", "EURUSD",
                                env=user_env, cwd=tmp_path), "unknown.csv")
    assert not folder.exists() or not any(folder.iterdir())
    done = tradeforge("import", str(good), "--symbol", "EURUSD", env=user_env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "ticks: read 30 = stored 30 + quarantined 0" in done.stdout
    # a damaged file dropped into the folder by hand: the run fails once, naming it, not retried
    (folder / "dropped.parquet").write_bytes(b"PAR1 broken PAR1")
    failed = tradeforge("import", str(good), "--symbol", "EURUSD", env=user_env, cwd=tmp_path)
    one_line_failure(failed, "failed at market_ticks", "dropped.parquet", "not a readable Parquet file")


def test_any_layout_through_a_column_mapping_and_naive_times_with_a_zone(user_env, tmp_path):
    export = tmp_path / "broker.csv"
    export.write_text("Time;Bid;Ask;Vol\n" + "".join(
        f"2024-03-06 1{i // 60}:{i % 60:02d}:00;{2150 + i * 0.1:.2f};{2150.3 + i * 0.1:.2f};1\n" for i in range(90)))
    refused = tradeforge("import", str(export), "--symbol", "XAUUSD", env=user_env, cwd=tmp_path)
    one_line_failure(refused, "unknown file layout", "--columns")
    mapping = tmp_path / "mapping.yaml"
    mapping.write_text("columns: {ts: Time, bid: Bid, ask: Ask}\nseparator: ';'\n")
    done = tradeforge("import", str(export), "--symbol", "XAUUSD", "--mapping", str(mapping), "--timezone", "Europe/Athens",
                      env=user_env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "layout custom (ticks, times in Europe/Athens), 90 rows, 2024-03-06 08:00:00 .. 2024-03-06 09:29:00 UTC" in done.stdout
    flags = tradeforge("import", str(export), "--symbol", "XAUUSD", "--columns", "ts=Time,bid=Bid,ask=Ask", "--separator", ";",
                       "--no-ingest", env=user_env, cwd=tmp_path)
    assert flags.returncode == 0 and "times in UTC), 90 rows, 2024-03-06 10:00:00" in flags.stdout  # no zone given: UTC
    one_line_failure(tradeforge("import", str(export), "--symbol", "XAUUSD", "--columns", "when=Time", env=user_env, cwd=tmp_path),
                     "'when' is no tradeforge column")


def test_history_before_the_first_day_is_refused_naming_the_setting_and_taken_with_it(user_env, tmp_path):
    export = tmp_path / "old.csv"
    export.write_text("ts,bid,ask\n1999-06-01T10:00:00Z,1.05,1.06\n1999-06-01T10:00:01Z,1.05,1.06\n")
    one_line_failure(tradeforge("import", str(export), "--symbol", "EURUSD", env=user_env, cwd=tmp_path),
                     "2 rows are dated before 2000-01-01", "TRADEFORGE_FIRST_DAY=1999-06-01")
    done = tradeforge("import", str(export), "--symbol", "EURUSD", env=dict(user_env, TRADEFORGE_FIRST_DAY="1999-01-01"),
                      cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "ticks: read 2 = stored 2 + quarantined 0" in done.stdout  # identical quotes: two updates, both kept


def h1_export(first: date, days: int) -> str:
    """An MT5 H1 bar export of the synthetic market (open-market hours only, as a broker's)."""
    ticks = pl.concat([generate_ticks("EURUSD", first + timedelta(days=i), SyntheticMarketConfig(5, 0.02)) for i in range(days)])
    bars = aggregate_ticks(ticks).filter(pl.col("timeframe") == "H1")
    lines = ["<DATE>\t<TIME>\t<OPEN>\t<HIGH>\t<LOW>\t<CLOSE>\t<TICKVOL>\t<VOL>\t<SPREAD>"]
    lines += [f"{r['ts']:%Y.%m.%d}\t{r['ts']:%H:%M:%S}\t{r['open']:.5f}\t{r['high']:.5f}\t{r['low']:.5f}\t{r['close']:.5f}"
              f"\t{r['tick_count']}\t0\t0" for r in bars.iter_rows(named=True)]
    return "\n".join(lines) + "\n"


def test_h1_bars_make_h1_and_longer_bars_and_features_on_h1_only(user_env, tmp_path):
    export = tmp_path / "EURUSD_H1.csv"
    export.write_text(h1_export(date(2023, 10, 2), 95))  # 1,500 open hours warm H1 up
    done = tradeforge("import", str(export), "--symbol", "EURUSD", env=user_env, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "layout mt5_bars (bars, H1 bars" in done.stdout
    assert "FAILED" not in done.stdout and "warning" not in done.stdout, done.stdout
    per_tf = dict(stored(tmp_path, f"SELECT timeframe, count() AS n FROM aggregates WHERE {visible('aggregates')} "
                                   "GROUP BY timeframe").iter_rows())
    assert set(per_tf) == {"H1", "H4", "D1", "W1"}  # never an invented M1..M30 bar
    assert per_tf["H1"] == len(export.read_text().splitlines()) - 1
    features = dict(stored(tmp_path, "SELECT timeframe, sum(warm) AS warm FROM ml_features GROUP BY timeframe").iter_rows())
    assert set(features) == {"H1"} and features["H1"] > 0  # only H1 rows, and warm ones
    assert stored(tmp_path, "SELECT count() AS n FROM market_ticks")["n"][0] == 0
