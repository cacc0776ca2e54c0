"""Reference parity: an SMA(10, 30) crossover, always in the market, commission per side,
next-open fills, run by tradeforge and by backtesting.py on the same bars.

How backtesting.py fills (its ``_Broker``, 0.6.6): an order placed in ``next()`` at bar i's
close fills at bar i+1's open; closing a trade and opening the reverse one happen at the same
open, the close first; commission = rate x |size| x fill price, charged at entry and again at
exit; equity = cash + size x (close - entry). It sizes a *relative* order at the fill price
with the equity at the fill, while a live engine must fix the quantity when it sends the order
(at the decision bar's close). So the reference strategy sizes in whole units from the equity
and close of the decision bar on both sides, with tradeforge's own rule (``round_lots`` of an
equity fraction, the same function), and backtesting.py gets explicit sizes. Both sides see
the same crossings (the same SMA arrays). Everything else is each engine's own accounting.
"""

from __future__ import annotations


import numpy as np
import pandas as pd
import polars as pl
import pytest

from benchmarks.reference import REFERENCE_SPEC, backtesting_py_sma_cross
from models.backtest.metrics import drawdown, profit_factor
from models.backtest.runner import BacktestConfig, run_backtest
from models.trading.fills import FillConfig
from models.trading.risk import RiskConfig, Sizing
from models.trading.strategy import SmaCross

backtesting = pytest.importorskip("backtesting")

COMMISSION = 0.001
FRACTION = 0.5
CASH = 100_000.0
SPEC = REFERENCE_SPEC  # a stock-like instrument: whole units, no leverage, quoted in the account currency


def _bars(n: int = 3000, seed: int = 3) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    close = 100 * np.exp(np.cumsum(rng.normal(0, 0.004, n)))
    open_ = np.r_[100.0, close[:-1]] * np.exp(rng.normal(0, 0.002, n))  # gaps between bars
    high = np.maximum(open_, close) * (1 + np.abs(rng.normal(0, 0.002, n)))
    low = np.minimum(open_, close) * (1 - np.abs(rng.normal(0, 0.002, n)))
    ts = pl.datetime_range(pl.datetime(2024, 1, 1, time_zone="UTC"), pl.datetime(2024, 1, 1, time_zone="UTC") + pl.duration(hours=n - 1),
                           "1h", eager=True).cast(pl.Datetime("ms", "UTC"))
    return pl.DataFrame({"symbol": "EURUSD", "timeframe": "H1", "ts": ts, "open": np.round(open_, 4), "high": np.round(high, 4),
                         "low": np.round(low, 4), "close": np.round(close, 4)})


def _reference(bars: pl.DataFrame, strategy: SmaCross):
    return backtesting_py_sma_cross(bars, strategy, cash=CASH, commission=COMMISSION, fraction=FRACTION, spec=SPEC)


def test_sma_cross_matches_backtesting_py_exactly():
    bars = _bars()
    strategy = SmaCross(fast=10, slow=30)
    config = BacktestConfig(initial_equity=CASH, risk=RiskConfig(sizing=Sizing.EQUITY_FRACTION, equity_fraction=FRACTION, stop_atr=None),
                            fill=FillConfig(spread=0.0, commission_rate=COMMISSION), instruments={"EURUSD": SPEC})
    ours = run_backtest(bars, strategy, config)
    ref = _reference(bars, strategy)
    theirs = ref["_trades"].sort_values("EntryTime").reset_index(drop=True)
    closed = ours.trades.filter(pl.col("exit_ts").is_not_null())

    assert len(theirs) > 40 and closed.height == len(theirs)
    # identical trades: times, prices, sizes
    to_ts = lambda s: [int(pd.Timestamp(t, tz="UTC").timestamp() * 1000) for t in s]  # noqa: E731
    assert closed["entry_ts"].dt.epoch("ms").to_list() == to_ts(theirs["EntryTime"])
    assert closed["exit_ts"].dt.epoch("ms").to_list() == to_ts(theirs["ExitTime"])
    assert closed["entry_price"].to_list() == theirs["EntryPrice"].tolist()
    assert closed["exit_price"].to_list() == theirs["ExitPrice"].tolist()
    assert (closed["qty"] * closed["side"]).to_list() == theirs["Size"].astype(float).tolist()
    np.testing.assert_allclose(closed["pnl"].to_numpy(), theirs["PnL"].to_numpy(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(closed["commission"].to_numpy(), theirs["Commission"].to_numpy(), rtol=1e-9)
    # equal headline numbers
    m = ours.metrics
    assert m["total_return"] == pytest.approx(ref["Return [%]"] / 100, abs=1e-9)
    assert m["win_rate"] == pytest.approx(ref["Win Rate [%]"] / 100, abs=1e-9)
    assert m["max_drawdown"] == pytest.approx(ref["Max. Drawdown [%]"] / 100, abs=1e-9)
    # backtesting.py's profit factor is over trade returns, ours over money: both agree on each
    assert profit_factor(closed["return_pct"].to_numpy()) == pytest.approx(ref["Profit Factor"], abs=1e-9)
    assert m["profit_factor"] == pytest.approx(profit_factor(theirs["PnL"].to_numpy()), abs=1e-9)
    # the whole equity curve, bar by bar
    curve = ref["_equity_curve"]["Equity"].to_numpy()
    np.testing.assert_allclose(ours.equity["equity"].to_numpy(), curve, rtol=1e-12)
    assert float(np.min(drawdown(curve))) == pytest.approx(m["max_drawdown"], abs=1e-12)
