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
) -> GateDecision:
    """Compare mean out-of-fold ``metric`` values. ``blockers`` are failures found elsewhere
    (a leaking fold, say) that refuse the challenger whatever its numbers."""
    direction = "higher" if HIGHER_IS_BETTER[metric] else "lower"
    reasons: list[str] = list(blockers or [])
    passed = not reasons
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
    return GateDecision(passed, reasons, metric, challenger, champion, champion_version, margin, dict(baselines))
