"""Walk-forward folds in time, purged of label overlap, with an embargo.

Folds cut the timeline, not the rows: every symbol's rows at a moment fall in the same fold,
so several symbols (and markets closed over a weekend while crypto trades) share the folds.
With rows sorted by close time:

- the test folds are consecutive blocks of distinct close times; by default the timeline
  splits into ``n_folds + 1`` equal blocks and the first one only trains (the blocks of
  scikit-learn's ``TimeSeriesSplit`` on the distinct times), or each test fold spans
  ``test_window`` and together they end the data;
- a training row precedes its test fold; it is **purged** when its label window
  ``[close_ts, close_ts + horizon]`` reaches the test fold's start (its label was not known
  when the test fold began), and **embargoed** when its label ends less than ``embargo``
  before that start (de Prado's buffer against serially correlated data, which in a
  walk-forward sits between a training set and its test fold);
- ``expanding`` trains on everything before that; ``sliding`` only on rows closing within
  ``train_window`` of the test start.

Since the horizon is one duration per target, the training set of a fold is a contiguous
slice: a view of the data, never a copy.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from enum import StrEnum

import numpy as np


END_PAD_MS = 1000  # the last fold ends a second after the last close: whole seconds, as the warehouse stores times


class Scheme(StrEnum):
    EXPANDING = "expanding"
    SLIDING = "sliding"


@dataclass(frozen=True, slots=True)
class FoldConfig:
    n_folds: int = 5
    scheme: Scheme = Scheme.EXPANDING
    train_window: timedelta | None = None  # sliding: default the length of the first training block
    test_window: timedelta | None = None   # default: n_folds + 1 equal blocks of distinct times
    embargo: timedelta = timedelta(0)
    min_train_rows: int = 50

    def __post_init__(self) -> None:
        if self.n_folds < 1:
            raise ValueError("n_folds must be at least 1")
        if self.embargo < timedelta(0):
            raise ValueError("embargo cannot be negative")
        for name in ("train_window", "test_window"):
            value = getattr(self, name)
            if value is not None and value <= timedelta(0):
                raise ValueError(f"{name} must be positive")


@dataclass(frozen=True, slots=True)
class Fold:
    """One split: rows ``[train_start, train_stop)`` train, rows ``[test_start, test_stop)`` test."""

    index: int
    train_start: int
    train_stop: int
    test_start: int
    test_stop: int
    test_from_ms: int   # the fold's first moment (the block boundary), epoch ms
    test_until_ms: int  # the next block's boundary (exclusive)
    purged: int         # rows before the test fold dropped because their label reached it
    embargoed: int      # rows dropped because their label ended inside the embargo

    @property
    def train(self) -> slice:
        return slice(self.train_start, self.train_stop)

    @property
    def test(self) -> slice:
        return slice(self.test_start, self.test_stop)

    @property
    def train_rows(self) -> int:
        return self.train_stop - self.train_start

    @property
    def test_rows(self) -> int:
        return self.test_stop - self.test_start


def _ms(value: timedelta) -> int:
    return int(value.total_seconds() * 1000)


def _test_blocks(times: np.ndarray, config: FoldConfig) -> list[tuple[int, int]]:
    """``(from_ms, until_ms)`` of each test fold, from the distinct close times."""
    if config.test_window is None:
        n = len(times)
        size = n // (config.n_folds + 1)
        if size < 1:
            raise ValueError(f"{n} distinct close times cannot make {config.n_folds} folds")
        starts = [n - (config.n_folds - k) * size for k in range(config.n_folds)]
        ends = [*starts[1:], n]
        return [(int(times[s]), int(times[e]) if e < n else int(times[-1]) + END_PAD_MS) for s, e in zip(starts, ends, strict=True)]
    width = _ms(config.test_window)
    end = int(times[-1]) + END_PAD_MS
    first = end - config.n_folds * width
    if first <= int(times[0]):
        raise ValueError(f"{config.n_folds} test windows of {config.test_window} do not fit in the data")
    return [(first + k * width, first + (k + 1) * width) for k in range(config.n_folds)]


def walk_forward(close_ms: np.ndarray, horizon: timedelta, config: FoldConfig) -> list[Fold]:
    """Folds over rows sorted by close time (epoch ms); see the module docstring."""
    if len(close_ms) == 0:
        raise ValueError("no rows to split")
    if np.any(np.diff(close_ms) < 0):
        raise ValueError("rows must be sorted by close time")
    times = np.unique(close_ms)
    blocks = _test_blocks(times, config)
    h, embargo = _ms(horizon), _ms(config.embargo)
    window = _ms(config.train_window) if config.train_window else blocks[0][0] - int(times[0])
    folds = []
    for index, (start_ms, until_ms) in enumerate(blocks):
        test_start = int(np.searchsorted(close_ms, start_ms, side="left"))
        test_stop = int(np.searchsorted(close_ms, until_ms, side="left"))
        # Training rows need close + h < start - embargo; the rest before the test are dropped.
        label_known = int(np.searchsorted(close_ms, start_ms - h, side="left"))           # close + h < start
        clear = int(np.searchsorted(close_ms, start_ms - h - embargo, side="left"))       # ... - embargo
        train_start = 0
        if config.scheme is Scheme.SLIDING:
            train_start = min(int(np.searchsorted(close_ms, start_ms - window, side="left")), clear)
        fold = Fold(
            index=index, train_start=train_start, train_stop=clear, test_start=test_start, test_stop=test_stop,
            test_from_ms=start_ms, test_until_ms=until_ms,
            purged=test_start - label_known, embargoed=label_known - clear,
        )
        if fold.test_rows == 0:
            raise ValueError(f"fold {index} has no test rows (a window without data); use fewer folds or no test_window")
        if fold.train_rows < config.min_train_rows:
            raise ValueError(
                f"fold {index} has {fold.train_rows} training rows after purging {fold.purged} and embargoing "
                f"{fold.embargoed} (at least {config.min_train_rows} needed): use fewer folds or more data"
            )
        folds.append(fold)
    return folds


def purge_violations(close_ms: np.ndarray, folds: list[Fold], horizon: timedelta, embargo: timedelta) -> list[str]:
    """What a fold breaks, read from the rows themselves: a training row at or after a test
    row, a training label reaching a test row's close minus the embargo. Empty when sound."""
    h, gap = _ms(horizon), _ms(embargo)
    problems = []
    for fold in folds:
        train, test = close_ms[fold.train], close_ms[fold.test]
        if not len(train) or not len(test):
            problems.append(f"fold {fold.index}: empty {'training' if not len(train) else 'test'} set")
            continue
        if fold.train_stop > fold.test_start:
            problems.append(f"fold {fold.index}: training rows overlap the test rows")
        latest_label_end = int(train.max()) + h
        if latest_label_end + gap >= int(test.min()):
            problems.append(
                f"fold {fold.index}: a training label ends at {latest_label_end} ms, within the embargo of "
                f"the first test close {int(test.min())} ms"
            )
    return problems


def label_gaps_ms(close_ms: np.ndarray, folds: list[Fold], horizon: timedelta) -> list[int]:
    """Per fold: time from the last training label's end to the first test close (ms)."""
    h = _ms(horizon)
    return [int(close_ms[f.test].min()) - (int(close_ms[f.train].max()) + h) for f in folds]
