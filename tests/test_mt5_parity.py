"""The real TradingEngine driven bar by bar through MT5Broker on the fake terminal, against the
same engine with the backtest's SimulatedBroker on the same bars: the same orders and fills
where the two fill models agree.

Where they agree, by construction of the bars: every bar opens at the previous close (no
gaps) with one constant spread, and the decision at a bar's close is sent when the next bar's
first quote (its open) is there, so a market order executes at that open plus half the
spread in both. A stop is hit on the path of quotes exactly where the backtest's bar range
touches it and fills at its level in both.

Where they differ (documented, measured below): (1) when one bar touches both a position's
stop and its target, the backtest takes the stop (its convention), while MetaTrader fills
whichever the quotes reach first (the fake walks a rising bar open-low-high-close, a falling
one open-high-low-close); (2) a fill's time: the backtest stamps a bar's open, MetaTrader the
tick's time inside the bar (compared here by bar); (3) a stop's price: MetaTrader's stop
levels sit on the symbol's price grid (5 digits for EURUSD), so a stop fills at the engine's
level rounded to the grid, the backtest's at the unrounded level: compared to within half a
point, and equity to within half a point on each stop's quantity.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from models.market.instruments import instrument
from models.trading.broker import BrokerPort
from models.trading.engine import EngineConfig, TradingEngine
from models.trading.fills import FillConfig, SimulatedBroker
from models.trading.risk import RiskConfig, RiskModel
from models.trading.strategy import SmaCross
from resources.brokers.mt5 import constants as C
from resources.brokers.mt5.broker import MT5Broker, MT5Config
from resources.brokers.mt5.fake import FakeTerminal

BAR_MS = 300_000
HALF = 0.00004
START = 1_709_510_400_000  # 2024-03-04 00:00 UTC


def _bars(n: int, seed: int) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    close = 1.09 * np.exp(np.cumsum(rng.normal(0, 0.0007, n)))
    open_ = np.r_[1.09, close[:-1]]  # no gaps: each bar opens at the previous close
    wick = np.abs(rng.normal(0, 0.0004, n))
    ts = START + np.arange(n) * BAR_MS
    return pl.DataFrame({"ts": ts, "open": open_, "high": np.maximum(open_, close) * (1 + wick),
                         "low": np.minimum(open_, close) * (1 - wick), "close": close,
                         "bid_close": close - HALF, "ask_close": close + HALF})


def _drive(broker: BrokerPort, bars: pl.DataFrame, risk: RiskConfig, fake: FakeTerminal | None = None) -> TradingEngine:
    engine = TradingEngine(EngineConfig("sma_parity"), RiskModel(risk), broker, {"EURUSD": instrument("EURUSD")})
    signals = SmaCross(fast=5, slow=20).signals(bars)
    rows, sides = bars.rows(named=True), signals["side"].to_list()
    for i, bar in enumerate(rows):
        if fake is not None:
            fake.run_bar("EURUSD", bar["ts"], bar["open"], bar["high"], bar["low"], bar["close"], HALF, BAR_MS)
            # the first quote after the close: the next bar's open (the same price here), at its time
            fake.set_quote("EURUSD", bar["close"] - HALF, bar["close"] + HALF, bar["ts"] + BAR_MS)
        engine.on_bar("EURUSD", bar, {"side": sides[i]})
    return engine


def _mt5(margin_mode: int) -> tuple[FakeTerminal, MT5Broker]:
    fake = FakeTerminal(margin_mode=margin_mode, commission_per_lot=7.0, start_ms=START - 60_000, balance=100_000.0)
    fake.add_symbol("EURUSD")
    fake.initialize()
    fake.set_quote("EURUSD", 1.09 - HALF, 1.09 + HALF, START - 60_000)
    broker = MT5Broker(fake, MT5Config(magic=7, symbols=("EURUSD",), server_utc_offset_s=0), clock=fake.utc_now,
                       sleep=lambda s: None)
    broker.connect()
    return fake, broker


def _orders(engine: TradingEngine) -> list[tuple]:
    return [(o.client_id, o.intent, int(o.side), o.type.value, round(o.qty, 6), o.state.value, round(o.filled_qty, 6))
            for o in engine.orders.values()]


def _fills(engine: TradingEngine) -> list[tuple]:
    return [(f.client_id, int(f.side), round(f.qty, 6), round(f.price, 5), round(f.commission, 10), f.ts // BAR_MS, f.reason)
            for f in engine.fills]


def _grid_slack(engine: TradingEngine) -> float:
    """What rounding stops to the price grid may move the account: half a point per stop unit."""
    return sum(f.qty * 0.5e-5 for f in engine.fills if f.reason == "stop") + 1e-6


@pytest.mark.parametrize("margin_mode", [C.ACCOUNT_MARGIN_MODE_RETAIL_NETTING, C.ACCOUNT_MARGIN_MODE_RETAIL_HEDGING],
                         ids=["netting", "hedging"])
def test_the_engine_on_mt5_equals_the_engine_on_the_simulated_broker(margin_mode):
    bars = _bars(600, seed=3)
    risk = RiskConfig(stop_atr=2.0, target_atr=None)
    reference = _drive(SimulatedBroker({"EURUSD": instrument("EURUSD")}, FillConfig(commission_per_lot=7.0)), bars, risk)
    fake, broker = _mt5(margin_mode)
    live = _drive(broker, bars, risk, fake)

    assert len(reference.fills) > 40 and any(f.reason == "stop" for f in reference.fills)  # trades and stops happened
    assert _orders(live) == _orders(reference)
    assert _fills(live) == _fills(reference)
    assert all(abs(a.price - b.price) <= 0.5e-5 + 1e-12 for a, b in zip(live.fills, reference.fills))
    assert live.equity() == pytest.approx(reference.equity(), abs=_grid_slack(live))
    assert live.portfolio.balance == pytest.approx(reference.portfolio.balance, abs=_grid_slack(live))
    # and the broker's own books agree with the engine's: one order per engine order, the balance
    assert fake.account_info().balance == pytest.approx(live.portfolio.balance, abs=0.01 * len(live.fills))
    assert broker.positions() == {s: p.units for s, p in live.portfolio.positions.items() if p.units}
    sent = [r for name, r in fake.calls if name == "order_send"]
    assert len({r.comment for r in sent}) == len(sent)  # no client id was sent twice


def test_with_targets_the_only_differences_are_bars_touching_stop_and_target():
    bars = _bars(400, seed=0)
    risk = RiskConfig(stop_atr=0.7, target_atr=0.7)  # tight levels: some bar touches both
    reference = _drive(SimulatedBroker({"EURUSD": instrument("EURUSD")}, FillConfig(commission_per_lot=7.0)), bars, risk)
    fake, broker = _mt5(C.ACCOUNT_MARGIN_MODE_RETAIL_HEDGING)
    live = _drive(broker, bars, risk, fake)
    ref, got = _fills(reference), _fills(live)
    assert any(f[-1] == "limit" for f in ref)  # targets were hit
    # Up to the first bar that touched both levels of an open position, the runs are identical.
    first = next((i for i, (a, b) in enumerate(zip(ref, got)) if a != b), None)
    assert first is not None and first > 30
    a, b = ref[first], got[first]
    assert a[5] == b[5] and {a[-1], b[-1]} == {"stop", "limit"}  # same bar, one took the stop, the other the target
    bar = bars.row(int(a[5] - START // BAR_MS), named=True)
    order = live.orders[b[0]]
    parent = live.orders[order.parent_id]
    assert bar["low"] - HALF <= min(parent.stop_loss, parent.take_profit) and bar["high"] - HALF >= max(parent.stop_loss, parent.take_profit)
    assert ref[:first] == got[:first]
