"""Monte Carlo of a backtest: how much of its result was the order of its trades or its days.

Two resamplings, each seeded and vectorised (paths x steps arrays):
- trade-order bootstrap: draw the run's trades (their returns on equity at entry) with
  replacement, compound them -> distributions of final return and maximum drawdown;
- circular block bootstrap of the per-period returns (blocks keep volatility clustering).
Probability of ruin: the share of paths whose equity falls below ``1 - ruin`` of the start.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MonteCarloResult:
    method: str
    final_return: np.ndarray  # per path
    max_drawdown: np.ndarray  # per path, <= 0
    prob_ruin: float
    ruin_level: float

    def quantiles(self, qs: tuple[float, ...] = (0.05, 0.25, 0.5, 0.75, 0.95)) -> dict[str, dict[str, float]]:
        return {
            "final_return": {f"p{int(q * 100)}": float(np.quantile(self.final_return, q)) for q in qs},
            "max_drawdown": {f"p{int(q * 100)}": float(np.quantile(self.max_drawdown, q)) for q in qs},
        }

    def summary(self) -> dict[str, float]:
        q = self.quantiles()
        return {"paths": len(self.final_return), "prob_ruin": self.prob_ruin,
                **{f"final_return_{k}": v for k, v in q["final_return"].items()},
                **{f"max_drawdown_{k}": v for k, v in q["max_drawdown"].items()}}


def _paths(returns: np.ndarray, method: str, ruin: float) -> MonteCarloResult:
    curves = np.cumprod(1.0 + returns, axis=1)
    curves = np.concatenate([np.ones((curves.shape[0], 1)), curves], axis=1)
    drawdowns = (curves / np.maximum.accumulate(curves, axis=1) - 1.0).min(axis=1)
    ruined = (curves.min(axis=1) <= 1.0 - ruin).mean()
    return MonteCarloResult(method, curves[:, -1] - 1.0, drawdowns, float(ruined), ruin)


def trade_bootstrap(trade_returns: np.ndarray, paths: int = 2000, seed: int = 0, ruin: float = 0.5) -> MonteCarloResult:
    """``trade_returns``: each trade's PnL over the equity at its entry."""
    trade_returns = np.asarray(trade_returns, dtype=np.float64)
    if len(trade_returns) == 0:
        raise ValueError("no closed trades to resample")
    rng = np.random.default_rng(seed)
    draws = trade_returns[rng.integers(0, len(trade_returns), size=(paths, len(trade_returns)))]
    return _paths(draws, "trade_bootstrap", ruin)


def block_bootstrap(returns: np.ndarray, block: int = 20, paths: int = 2000, seed: int = 0, ruin: float = 0.5) -> MonteCarloResult:
    """Circular block bootstrap of per-period returns, paths as long as the original."""
    returns = np.asarray(returns, dtype=np.float64)
    n = len(returns)
    if n < 2:
        raise ValueError("need at least two returns to resample")
    block = max(1, min(block, n))
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, n, size=(paths, -(-n // block)))
    index = (starts[:, :, None] + np.arange(block)[None, None, :]).reshape(paths, -1)[:, :n] % n
    return _paths(returns[index], "block_bootstrap", ruin)
