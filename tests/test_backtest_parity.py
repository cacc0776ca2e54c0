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

from dataclasses import replace

import numpy as np
import pandas as pd
import polars as pl
import pytest

from models.backtest.metrics import drawdown, profit_factor
from models.backtest.runner import BacktestConfig, run_backtest
from models.market.instruments import instrument
from models.trading.fills import FillConfig
from models.trading.risk import RiskConfig, Sizing, round_lots
from models.trading.strategy import SmaCross

backtesting = pytest.importorskip("backtesting")

COMMISSION = 0.001
FRACTION = 0.5
CASH = 100_000.0
# A stock-like instrument: whole units, no leverage, quoted in the account currency.
SPEC = replace(instrument("EURUSD"), contract_size=1.0, lot_step=1.0, min_lot=1.0, max_lot=1e12, leverage=1.0)


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
    fast, slow = strategy.indicators(bars["close"].to_numpy())
    df = bars.select("open", "high", "low", "close").to_pandas()
    df.columns = ["Open", "High", "Low", "Close"]
    df.index = pd.DatetimeIndex(bars["ts"].dt.replace_time_zone(None).to_list())

    class Reference(backtesting.Strategy):
        def init(self):
            self.fast = self.I(lambda: fast, name="fast")
            self.slow = self.I(lambda: slow, name="slow")

        def next(self):
            f, s = self.fast, self.slow
            side = 1 if f[-2] < s[-2] and f[-1] > s[-1] else -1 if f[-2] > s[-2] and f[-1] < s[-1] else 0
            if side == 0 or (self.position and (self.position.size > 0) == (side > 0)):
                return
            units = round_lots(FRACTION * self.equity / self.data.Close[-1], SPEC)
            self.position.close()
            (self.buy if side > 0 else self.sell)(size=units)

    bt = backtesting.Backtest(df, Reference, cash=CASH, commission=COMMISSION, finalize_trades=False)
    return bt.run()


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
