"""Performance metrics, with empyrical's conventions (tests hold them equal to empyrical).

Conventions: returns are simple daily returns of the equity at each UTC day's last bar, the
first measured from the initial equity. Annualisation by ``periods_per_year`` (252, or 365
when the market trades at weekends). Sharpe = mean / sample std (ddof 1) x sqrt(periods);
Sortino = mean x periods / (root-mean-square of the negative returns x sqrt(periods));
annual return = compound growth over len(returns) / periods years; Calmar = annual return /
|max drawdown of the daily curve|. ``max_drawdown`` is measured on the equity at every bar
(intraday drops count), its duration from the peak to the recovery (or the end).
Trade statistics are on net PnL (after commissions): win rate = share of trades with PnL > 0,
profit factor = gross profit / gross loss, expectancy = mean PnL, SQN = sqrt(n) x mean / std
(ddof 1), R multiple = PnL / money at the initial stop.
"""

from __future__ import annotations

import math

import numpy as np
from scipy.stats import norm

_DAY_MS = 86_400_000


def daily_equity(ts_ms: np.ndarray, equity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(day index, equity at the day's last bar) for every UTC day with bars."""
    day = ts_ms // _DAY_MS
    last = np.r_[day[1:] != day[:-1], True]
    return day[last], equity[last]


def returns_from_equity(equity: np.ndarray, initial: float) -> np.ndarray:
    values = np.r_[initial, equity]
    return values[1:] / values[:-1] - 1.0


def periods_per_year(ts_ms: np.ndarray) -> int:
    """365 when weekends are traded (crypto), else 252 (empyrical's daily default)."""
    days = np.unique(ts_ms // _DAY_MS)
    weekday = (days + 3) % 7  # 1970-01-01 was a Thursday: 0 = Monday
    return 365 if len(days) and np.mean(weekday >= 5) > 2 / 7 * 0.6 else 252


def annual_return(returns: np.ndarray, periods: int) -> float:
    if len(returns) < 1:
        return math.nan
    return float(np.prod(1.0 + returns) ** (periods / len(returns)) - 1.0)


def annual_volatility(returns: np.ndarray, periods: int) -> float:
    return float(np.std(returns, ddof=1) * math.sqrt(periods)) if len(returns) > 1 else math.nan


def sharpe_ratio(returns: np.ndarray, periods: int) -> float:
    if len(returns) < 2:
        return math.nan
    std = np.std(returns, ddof=1)
    if np.max(returns) == np.min(returns):
        std = 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.mean(returns) / std * math.sqrt(periods))


def sortino_ratio(returns: np.ndarray, periods: int) -> float:
    if len(returns) < 2:
        return math.nan
    downside = math.sqrt(np.mean(np.minimum(returns, 0.0) ** 2)) * math.sqrt(periods)
    with np.errstate(divide="ignore", invalid="ignore"):
        return float(np.float64(np.mean(returns) * periods) / np.float64(downside))


def drawdown(equity: np.ndarray) -> np.ndarray:
    """Fraction below the running peak at each point (<= 0)."""
    peak = np.maximum.accumulate(equity)
    return equity / peak - 1.0


def max_drawdown_of_returns(returns: np.ndarray) -> float:
    """empyrical's: the curve starts at 1 before the first return."""
    if len(returns) < 1:
        return math.nan
    return float(np.min(drawdown(np.r_[1.0, np.cumprod(1.0 + returns)])))


def calmar_ratio(returns: np.ndarray, periods: int) -> float:
    mdd = max_drawdown_of_returns(returns)
    if not mdd < 0:
        return math.nan
    value = annual_return(returns, periods) / abs(mdd)
    return math.nan if math.isinf(value) else value


def drawdown_duration(ts_ms: np.ndarray, equity: np.ndarray) -> tuple[float, int]:
    """Longest time (days) and number of bars from a peak until equity is back at it (or the end)."""
    if len(equity) == 0:
        return 0.0, 0
    peak = np.maximum.accumulate(equity)
    at_peak = np.flatnonzero(equity >= peak)
    ends = np.r_[at_peak[1:], len(equity) - 1]
    bars = ends - at_peak
    if not bars.any():
        return 0.0, 0
    k = int(np.argmax((ts_ms[ends] - ts_ms[at_peak])))
    longest = int(np.argmax(bars))
    return float((ts_ms[ends[k]] - ts_ms[at_peak[k]]) / _DAY_MS), int(bars[longest])


def profit_factor(pnl: np.ndarray) -> float:
    loss = -pnl[pnl < 0].sum()
    return float(pnl[pnl > 0].sum() / loss) if loss > 0 else math.nan


def sqn(pnl: np.ndarray) -> float:
    if len(pnl) < 2:
        return math.nan
    std = np.std(pnl, ddof=1)
    return float(math.sqrt(len(pnl)) * np.mean(pnl) / std) if std > 0 else math.nan


def trade_stats(pnl: np.ndarray, r_multiples: np.ndarray) -> dict[str, float]:
    n = len(pnl)
    wins, losses = pnl[pnl > 0], pnl[pnl < 0]
    r = r_multiples[np.isfinite(r_multiples)]
    return {
        "trades": n,
        "win_rate": float(len(wins) / n) if n else math.nan,
        "profit_factor": profit_factor(pnl),
        "expectancy": float(pnl.mean()) if n else math.nan,
        "avg_win": float(wins.mean()) if len(wins) else math.nan,
        "avg_loss": float(losses.mean()) if len(losses) else math.nan,
        "best_trade": float(pnl.max()) if n else math.nan,
        "worst_trade": float(pnl.min()) if n else math.nan,
        "avg_r_multiple": float(r.mean()) if len(r) else math.nan,
        "sqn": sqn(pnl),
    }


def probabilistic_sharpe_ratio(sr: float, sr_benchmark: float, n: int, skew: float, kurtosis: float) -> float:
    """P(true Sharpe > benchmark) for a per-period Sharpe ``sr`` measured on ``n`` returns with
    this skewness and (non-excess) kurtosis (Bailey and Lopez de Prado, 2012)."""
    denom = math.sqrt(max(1.0 - skew * sr + (kurtosis - 1.0) / 4.0 * sr * sr, 1e-12))
    return float(norm.cdf((sr - sr_benchmark) * math.sqrt(n - 1) / denom))


def expected_max_sharpe(trial_sharpe_variance: float, trials: int) -> float:
    """The Sharpe the best of ``trials`` unskilled trials would show (the DSR's benchmark)."""
    if trials < 2:
        return 0.0
    gamma = 0.5772156649015329
    return math.sqrt(trial_sharpe_variance) * ((1 - gamma) * norm.ppf(1 - 1 / trials) + gamma * norm.ppf(1 - 1 / (trials * math.e)))


def deflated_sharpe_ratio(sr: float, n: int, skew: float, kurtosis: float, trial_sharpe_variance: float, trials: int) -> float:
    """PSR against the best Sharpe expected from ``trials`` tries of no skill (Bailey and
    Lopez de Prado, 2014): the probability the strategy's Sharpe is not a selection fluke."""
    return probabilistic_sharpe_ratio(sr, expected_max_sharpe(trial_sharpe_variance, trials), n, skew, kurtosis)


def summarize(ts_ms: np.ndarray, equity: np.ndarray, initial: float, pnl: np.ndarray, r_multiples: np.ndarray,
              in_market: np.ndarray, traded_notional: float, commission: float, costs: float,
              benchmark_close: np.ndarray | None = None, periods: int | None = None) -> dict[str, float]:
    """Every headline number of a run (see the module doc for the conventions)."""
    periods = periods or periods_per_year(ts_ms)
    _, day_equity = daily_equity(ts_ms, equity)
    daily = returns_from_equity(day_equity, initial)
    dd_days, dd_bars = drawdown_duration(ts_ms, np.r_[initial, equity][1:])
    out = {
        "total_return": float(equity[-1] / initial - 1.0) if len(equity) else 0.0,
        "annual_return": annual_return(daily, periods),
        "annual_volatility": annual_volatility(daily, periods),
        "sharpe": sharpe_ratio(daily, periods),
        "sortino": sortino_ratio(daily, periods),
        "calmar": calmar_ratio(daily, periods),
        "max_drawdown": float(np.min(drawdown(np.r_[initial, equity]))) if len(equity) else 0.0,
        "max_drawdown_daily": max_drawdown_of_returns(daily),
        "max_drawdown_days": dd_days,
        "max_drawdown_bars": dd_bars,
        "exposure": float(np.mean(in_market)) if len(in_market) else 0.0,
        "turnover": float(traded_notional / np.mean(equity)) if len(equity) else 0.0,
        "commission": commission,
        "spread_slippage": costs,
        "costs_pct": (commission + costs) / initial,
        "final_equity": float(equity[-1]) if len(equity) else initial,
        "periods_per_year": periods,
        "days": len(daily),
    }
    out.update(trade_stats(pnl, r_multiples))
    if benchmark_close is not None and len(benchmark_close):
        out["buy_hold_return"] = float(benchmark_close[-1] / benchmark_close[0] - 1.0)
    return out
