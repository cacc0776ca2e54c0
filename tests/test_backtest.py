"""Backtest layer: metrics held equal to empyrical, Monte Carlo, walk-forward optimisation with
the Deflated Sharpe Ratio, predictions as the model strategy's input, and the tearsheet."""

from __future__ import annotations

import math

import empyrical
import numpy as np
import polars as pl
import pytest

from models.backtest import metrics as M
from models.backtest.montecarlo import block_bootstrap, trade_bootstrap
from models.backtest.optimize import walk_forward
from models.backtest.runner import BacktestConfig, join_predictions, run_backtest
from models.backtest.tearsheet import tearsheet_html
from models.trading.fills import FillConfig
from models.trading.risk import RiskConfig, Sizing
from models.trading.strategy import ModelStrategy, SmaCross


def _bars(n=20_000, seed=11, minutes=15):
    rng = np.random.default_rng(seed)
    close = 1.1 * np.exp(np.cumsum(rng.normal(0, 0.0012, n)))
    open_ = np.r_[1.1, close[:-1]]
    wick = np.abs(rng.normal(0, 0.0006, n))
    ts = pl.Series(1_704_067_200_000 + np.arange(n) * minutes * 60_000).cast(pl.Datetime("ms", "UTC"))
    return pl.DataFrame({"symbol": "EURUSD", "timeframe": "M15", "ts": ts, "open": open_,
                         "high": np.maximum(open_, close) * (1 + wick), "low": np.minimum(open_, close) * (1 - wick),
                         "close": close, "bid_close": close - 0.00005, "ask_close": close + 0.00005})


CONFIG = BacktestConfig(risk=RiskConfig(risk_fraction=0.005, stop_atr=3.0, target_atr=6.0),
                        fill=FillConfig(commission_per_lot=3.5))


@pytest.fixture(scope="module")
def result():
    return run_backtest(_bars(), SmaCross(fast=20, slow=80), CONFIG)


def test_metrics_equal_empyrical(result):
    ts = result.equity["ts"].dt.epoch("ms").to_numpy()
    _, day_eq = M.daily_equity(ts, result.equity["equity"].to_numpy())
    daily = M.returns_from_equity(day_eq, CONFIG.initial_equity)
    m = result.metrics
    periods = m["periods_per_year"]
    assert periods == 365 and len(daily) > 150  # the synthetic bars run through weekends
    assert m["sharpe"] == pytest.approx(empyrical.sharpe_ratio(daily, annualization=periods), rel=1e-12)
    assert m["sortino"] == pytest.approx(empyrical.sortino_ratio(daily, annualization=periods), rel=1e-12)
    assert m["annual_return"] == pytest.approx(empyrical.annual_return(daily, annualization=periods), rel=1e-12)
    assert m["annual_volatility"] == pytest.approx(empyrical.annual_volatility(daily, annualization=periods), rel=1e-12)
    assert m["calmar"] == pytest.approx(empyrical.calmar_ratio(daily, annualization=periods), rel=1e-12)
    assert m["max_drawdown_daily"] == pytest.approx(empyrical.max_drawdown(daily), rel=1e-12)
    # the bar-level drawdown is at least as deep as the daily one
    assert m["max_drawdown"] <= m["max_drawdown_daily"] < 0
    # 252 for markets closed at weekends
    weekdays = ts[((ts // 86_400_000) + 3) % 7 < 5]
    assert M.periods_per_year(weekdays) == 252


def test_trade_statistics_by_hand(result):
    closed = result.trades.filter(pl.col("exit_ts").is_not_null())
    pnl = closed["pnl"].to_numpy()
    m = result.metrics
    assert m["trades"] == len(pnl) > 30
    assert m["win_rate"] == pytest.approx((pnl > 0).mean())
    assert m["profit_factor"] == pytest.approx(pnl[pnl > 0].sum() / -pnl[pnl < 0].sum())
    assert m["sqn"] == pytest.approx(math.sqrt(len(pnl)) * pnl.mean() / pnl.std(ddof=1))
    r = (closed["pnl"] / closed["risk"]).to_numpy()
    assert m["avg_r_multiple"] == pytest.approx(r.mean())
    assert m["commission"] == pytest.approx(result.fills["qty"].sum() / 100_000 * 3.5)
    # accounting: the final equity is the start plus closed and open PnL
    open_pnl = result.metrics["final_equity"] - CONFIG.initial_equity - pnl.sum()
    assert abs(open_pnl) < CONFIG.initial_equity * 0.05
    assert {"stop_loss", "take_profit", "signal"} <= set(closed["exit_reason"].to_list())


def test_deflated_sharpe_matches_the_papers_example():
    # Bailey & Lopez de Prado (2014): SR 2.5 annualised over 1250 days, skew -3, kurtosis 10,
    # 100 trials with annualised Sharpe variance 0.5 -> DSR about 0.90
    sr, var = 2.5 / math.sqrt(250), 0.5 / 250
    assert M.deflated_sharpe_ratio(sr, 1250, -3.0, 10.0, var, 100) == pytest.approx(0.9004, abs=2e-3)
    assert M.deflated_sharpe_ratio(sr, 1250, -3.0, 10.0, var, 1000) < M.deflated_sharpe_ratio(sr, 1250, -3.0, 10.0, var, 10)


def test_monte_carlo_distributions_are_seeded_and_sane(result):
    closed = result.trades.filter(pl.col("exit_ts").is_not_null())
    returns = (closed["pnl"] / closed["entry_equity"]).to_numpy()
    a = trade_bootstrap(returns, paths=500, seed=1)
    assert np.array_equal(a.final_return, trade_bootstrap(returns, paths=500, seed=1).final_return)
    assert (a.max_drawdown <= 0).all() and 0 <= a.prob_ruin <= 1
    # every path compounds the same trades in some order and draw: the median is near the run's
    assert np.median(a.final_return) == pytest.approx(np.prod(1 + returns) - 1, abs=0.1)
    doom = trade_bootstrap(np.array([-0.2, 0.05]), paths=400, seed=2, ruin=0.3)
    assert doom.prob_ruin > 0.2
    daily = np.random.default_rng(0).normal(0.0005, 0.01, 500)
    b = block_bootstrap(daily, block=20, paths=300, seed=3)
    assert b.final_return.shape == (300,) and set(b.summary()) >= {"prob_ruin", "final_return_p50", "max_drawdown_p5"}


def test_walk_forward_reports_out_of_sample_and_the_deflated_sharpe():
    bars = _bars(8_000, seed=4)

    def build(params):
        return SmaCross(fast=params["fast"], slow=params["slow"]), BacktestConfig(
            risk=RiskConfig(risk_fraction=0.005, stop_atr=params["stop_atr"], target_atr=None))

    lines = []
    wf = walk_forward(bars, build, {"fast": ("int", 5, 20), "slow": ("int", 30, 90), "stop_atr": ("float", 1.0, 4.0)},
                      windows=3, trials=6, seed=7, warmup_bars=100, progress=lines.append)
    assert wf.trials == 18 and len(wf.windows) == 3 and len(lines) == 3
    for w in wf.windows:
        assert w.train[1] < w.test[0]  # judged only after what it was tuned on
    assert 0.0 <= wf.deflated_sharpe <= 1.0 and len(wf.oos_returns) == sum(w.out_of_sample["days"] for w in wf.windows)
    again = walk_forward(bars, build, {"fast": ("int", 5, 20), "slow": ("int", 30, 90), "stop_atr": ("float", 1.0, 4.0)},
                         windows=3, trials=6, seed=7, warmup_bars=100)
    assert [w.best_params for w in again.windows] == [w.best_params for w in wf.windows]  # seeded


def test_predictions_drive_the_model_strategy_and_bad_ones_are_refused():
    bars = _bars(3_000, seed=9)
    rng = np.random.default_rng(2)
    preds = bars.select("symbol", "timeframe", "ts", close_ts=pl.col("ts") + pl.duration(minutes=15),
                        fold=pl.lit(1), prediction=pl.lit(0.0), prob_up=pl.Series(np.clip(0.5 + rng.normal(0, 0.08, 3000), 0, 1)))
    preds = preds.filter(pl.int_range(pl.len()) >= 500)  # the first fold has no out-of-sample rows
    config = BacktestConfig(risk=RiskConfig(sizing=Sizing.KELLY, stop_atr=2.0, target_atr=3.0, kelly_cap=0.01))
    result = run_backtest(bars, ModelStrategy(long_above=0.58, short_below=0.42), config, predictions=preds)
    assert result.metrics["trades"] > 10
    first = result.orders["bar_ts"].min()
    assert first >= preds["ts"].min()  # no decision without a prediction
    rejected = result.risk_events.filter(~pl.col("approved") & (pl.col("kind") == "entry"))
    assert rejected.height == 0 or rejected["reason"].str.contains("kelly|working").all()
    with pytest.raises(ValueError, match="share a"):
        join_predictions(bars, pl.concat([preds, preds.head(1)]))
    with pytest.raises(ValueError, match="close_ts"):
        join_predictions(bars, preds.with_columns(close_ts=pl.col("ts")))
    _, counts = join_predictions(bars, preds.with_columns(pl.col("ts", "close_ts") + pl.duration(seconds=1)))
    assert counts["unmatched_predictions"] == preds.height


def test_tearsheet_has_every_figure(result):
    page = tearsheet_html(result)
    for title in ("Equity", "Drawdown", "Monthly returns", "Trade PnL", "Rolling Sharpe", "Exposure", "buy and hold"):
        assert title in page
    assert page.count("plotly.js") >= 1 and page.count("<script") >= 6 and len(page) < 6_000_000


def test_the_event_loop_leaves_no_reference_cycles_behind():
    """run_backtest pauses the cyclic collector for its event loop (a tenth of a run of thousands
    of trades); that is only safe while the engine's records form no cycles: refcounting must free
    every one of them. It also leaves the collector as it found it."""
    import gc

    bars = _bars(6_000)
    preds = bars.select("symbol", "timeframe", "ts",
                        prob_up=pl.Series(np.random.default_rng(3).uniform(0.3, 0.7, bars.height)))
    config = BacktestConfig(risk=RiskConfig(risk_fraction=0.005, stop_atr=2.0, target_atr=3.0, max_daily_loss=0.01),
                            fill=FillConfig(commission_per_lot=3.5))
    gc.collect()
    gc.disable()
    try:
        runs = [run_backtest(bars, SmaCross(fast=5, slow=20), CONFIG),
                run_backtest(bars, ModelStrategy(long_above=0.55, short_below=0.45), config, predictions=preds)]
        assert not gc.isenabled()  # left paused, as it was
        assert min(r.metrics["trades"] for r in runs) > 100 and runs[1].metrics["rejections"] > 0
        del runs
        assert gc.collect() == 0  # nothing unreachable that only the collector could free
    finally:
        gc.enable()
    run_backtest(bars, SmaCross(fast=5, slow=20), CONFIG)
    assert gc.isenabled()
