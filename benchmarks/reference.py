"""The reference SMA crossover in backtesting.py, shared by the parity test and the benchmark.

The strategy sizes in whole units from the decision bar's equity and close with tradeforge's
own rule (``round_lots`` of an equity fraction) and hands backtesting.py explicit sizes, so both
engines trade the same quantities on the same crossings (see tests/test_backtest_parity.py).
"""

from __future__ import annotations

import warnings
from dataclasses import replace

import pandas as pd
import polars as pl

from models.market.instruments import Instrument, instrument
from models.trading.risk import round_lots
from models.trading.strategy import SmaCross

#: A stock-like instrument: whole units, no leverage, quoted in the account currency.
REFERENCE_SPEC = replace(instrument("EURUSD"), contract_size=1.0, lot_step=1.0, min_lot=1.0, max_lot=1e12, leverage=1.0)


def backtesting_py_sma_cross(bars: pl.DataFrame, strategy: SmaCross, *, cash: float, commission: float,
                             fraction: float, spec: Instrument = REFERENCE_SPEC):
    """backtesting.py's stats (``pd.Series`` with ``_trades``, ``_equity_curve``) for ``strategy`` on ``bars``."""
    import backtesting

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
            units = round_lots(fraction * self.equity / self.data.Close[-1], spec)
            self.position.close()
            (self.buy if side > 0 else self.sell)(size=units)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return backtesting.Backtest(df, Reference, cash=cash, commission=commission, finalize_trades=False).run()
