"""The promotion gate: a challenger becomes champion only when, out of sample on the same
folds, it beats the champion by a margin and beats the naive baselines.

All values are mean out-of-fold metrics over the same folds of the same dataset (the
champion's recipe is refitted on the challenger's folds, so nobody compares numbers from
different data). Every decision carries its reasons, in words a trader can read.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from models.learning.metrics import HIGHER_IS_BETTER, is_better


@dataclass(frozen=True)
class GateDecision:
    passed: bool
    reasons: list[str]
    metric: str
    challenger: float
    champion: float | None
    champion_version: str | None
    margin: float
    baselines: dict[str, float] = field(default_factory=dict)
    backtest: dict[str, float] = field(default_factory=dict)  # the out-of-sample backtest's numbers, when required

    @property
    def decision(self) -> str:
        return "approved" if self.passed else "refused"

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons)


def _fmt(value: float | None) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.5f}"


def decide(
    metric: str,
    challenger: float,
    baselines: dict[str, float],
    champion: float | None = None,
    champion_version: str | None = None,
    margin: float = 0.0,
    blockers: list[str] | None = None,
    requirements: list[tuple[bool, str]] | None = None,
    backtest: dict[str, float] | None = None,
) -> GateDecision:
    """Compare mean out-of-fold ``metric`` values. ``blockers`` are failures found elsewhere
    (a leaking fold, say) that refuse the challenger whatever its numbers; ``requirements``
    are further conditions with their reason either way (the out-of-sample backtest after
    costs: :func:`backtest_requirement`), and ``backtest`` its numbers, for the record."""
    direction = "higher" if HIGHER_IS_BETTER[metric] else "lower"
    reasons: list[str] = list(blockers or [])
    passed = not reasons
    for ok, reason in requirements or []:
        passed = passed and ok
        reasons.append(reason)
    if math.isnan(challenger):
        passed = False
        reasons.append(f"{metric} is undefined for the challenger")
    for name, value in baselines.items():
        if not is_better(metric, challenger, value):
            passed = False
            reasons.append(f"does not beat the {name} baseline: {metric} {_fmt(challenger)} vs {_fmt(value)} ({direction} is better)")
    if champion_version is None:
        if passed:
            reasons.append(f"no champion yet; beats every baseline on {metric} ({_fmt(challenger)})")
    elif champion is None or math.isnan(champion):
        if passed:
            reasons.append(f"champion v{champion_version} could not be scored on these folds; beats every baseline")
    elif not is_better(metric, challenger, champion, margin):
        passed = False
        reasons.append(
            f"does not beat champion v{champion_version} by the margin {margin:g}: {metric} {_fmt(challenger)} "
            f"vs {_fmt(champion)} on the same folds ({direction} is better)"
        )
    elif passed:
        reasons.append(
            f"beats champion v{champion_version} by more than {margin:g}: {metric} {_fmt(challenger)} vs "
            f"{_fmt(champion)} on the same folds, and every baseline"
        )
    return GateDecision(passed, reasons, metric, challenger, champion, champion_version, margin, dict(baselines),
                        dict(backtest or {}))


def backtest_requirement(metrics: dict[str, float], min_sharpe: float | None = None, min_return: float | None = None,
                         min_trades: int = 1) -> tuple[bool, str]:
    """Whether an out-of-sample backtest's numbers (after costs) meet the spec's minimums,
    with the reason in words. A Sharpe that is undefined (no variation) fails a minimum."""
    sharpe, total, trades = metrics.get("sharpe", math.nan), metrics.get("total_return", math.nan), int(metrics.get("trades", 0))
    shown = f"Sharpe {_fmt2(sharpe)}, return {_pct(total)}, {trades} trades, costs {_pct(metrics.get('costs_pct', math.nan))} of equity"
    failures = []
    if trades < min_trades:
        failures.append(f"{trades} closed trades, fewer than {min_trades}")
    if min_sharpe is not None and not (sharpe >= min_sharpe):
        failures.append(f"Sharpe {_fmt2(sharpe)} below the minimum {min_sharpe:g}")
    if min_return is not None and not (total >= min_return):
        failures.append(f"return {_pct(total)} below the minimum {_pct(min_return)}")
    if failures:
        return False, f"out-of-sample backtest after costs fails: {'; '.join(failures)} ({shown})"
    wanted = ", ".join(w for w in (f"Sharpe >= {min_sharpe:g}" if min_sharpe is not None else "",
                                   f"return >= {_pct(min_return)}" if min_return is not None else "") if w)
    return True, f"out-of-sample backtest after costs meets {wanted} ({shown})"


def _fmt2(value: float) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.2f}"


def _pct(value: float | None) -> str:
    return "nan" if value is None or math.isnan(value) else f"{value:.2%}"
