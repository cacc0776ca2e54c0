"""The look-ahead test the system runs on itself: truncate history, recompute, compare.

If any feature at bar ``t`` used a later bar, recomputing on the history cut at ``t`` would
change it. Used by the `ml_features` asset check and by the tests.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from models.features.compute import compute_features
from models.features.external import ExternalData
from models.features.registry import FEATURE_NAMES
from models.market.timeframes import DayBoundary, Timeframe


def lookahead_violations(
    bars: pl.DataFrame,
    tf: Timeframe,
    cuts: list[int],
    boundary: DayBoundary = DayBoundary.UTC,
    tolerance: float = 1e-9,
    full: pl.DataFrame | None = None,
    external: ExternalData | None = None,
) -> dict[str, float]:
    """Feature -> largest difference at the cut points between full and truncated history.

    ``full`` is ``compute_features(bars, ..., external)`` when the caller has it already.
    External data is cut too, to what could be known at the cut bar's close, so a join that
    peeked at later publications shows up like a bar that did. Empty when clean. A value
    that is null on one side and not on the other counts as inf.
    """
    if full is None:
        full = compute_features(bars, tf, boundary, external)
    reference_rows = full.select(FEATURE_NAMES).to_numpy().astype(np.float64)
    worst: dict[str, float] = {}
    for cut in cuts:
        known = external.known_by(full["close_ts"][cut]) if external is not None else None
        row = compute_features(bars.head(cut + 1), tf, boundary, known).select(FEATURE_NAMES).row(-1)
        truncated = np.array(row, dtype=np.float64)
        reference = reference_rows[cut]
        both_nan = np.isnan(truncated) & np.isnan(reference)
        diff = np.where(both_nan, 0.0, np.abs(truncated - reference))
        diff = np.where(np.isnan(diff), np.inf, diff)
        for index in np.flatnonzero(diff > tolerance):
            name = FEATURE_NAMES[index]
            worst[name] = max(worst.get(name, 0.0), float(diff[index]))
    return worst
