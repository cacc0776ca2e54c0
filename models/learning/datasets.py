"""Datasets from `ml_features` rows: one target, warm rows with a label, a fingerprint.

Rows are sorted by close time (then symbol), so a time fold is a contiguous slice and the
training set of a walk-forward fold is a view, never a copy. The fingerprint digests the
rows themselves (features, labels, keys), the columns, the range and the feature set: two
trainings with the same fingerprint saw exactly the same data.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum

import numpy as np
import polars as pl

from models.features.labels import BARRIER_HORIZON, HORIZONS, LABEL_NAMES
from models.features.registry import FEATURE_NAMES

KEY_COLUMNS = ("symbol", "timeframe", "ts", "close_ts")
PREVIOUS_RETURN = "ret_1"  # the 1-bar log return at the bar: the naive "previous bar" signal
_DAY_MS = 86_400_000


class Task(StrEnum):
    BINARY = "binary"          # direction_*: P(target > 0)
    MULTICLASS = "multiclass"  # barrier_4h: down / neither / up
    REGRESSION = "regression"  # fwd_ret_*: the forward log return


@dataclass(frozen=True, slots=True)
class Target:
    """A label column of `ml_features`, how it is learned and how far ahead it looks."""

    name: str
    task: Task
    horizon: timedelta

    @property
    def classes(self) -> tuple[int, ...]:
        """Target values of the encoded classes 0..k-1 (empty for regression)."""
        return {Task.BINARY: (0, 1), Task.MULTICLASS: (-1, 0, 1), Task.REGRESSION: ()}[self.task]

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def encode(self, values: np.ndarray) -> np.ndarray:
        """Raw label values -> what the learner fits: 1 = up (else 0), class index, or the return."""
        if self.task is Task.BINARY:
            return (values > 0).astype(np.int32)
        if self.task is Task.MULTICLASS:
            return (np.sign(values) + 1).astype(np.int32)
        return values.astype(np.float64)


def _targets() -> dict[str, Target]:
    targets = {}
    for name in LABEL_NAMES:
        if name.startswith("direction_"):
            targets[name] = Target(name, Task.BINARY, HORIZONS[name.removeprefix("direction_")])
        elif name.startswith("fwd_ret_"):
            targets[name] = Target(name, Task.REGRESSION, HORIZONS[name.removeprefix("fwd_ret_")])
        elif name.startswith("barrier_"):
            targets[name] = Target(name, Task.MULTICLASS, BARRIER_HORIZON)
    return targets


TARGETS: dict[str, Target] = _targets()


def target(name: str) -> Target:
    try:
        return TARGETS[name]
    except KeyError:
        raise ValueError(f"unknown target {name!r}; choose one of {', '.join(TARGETS)}") from None


@dataclass(frozen=True)
class Dataset:
    """Design matrix and target of one training, rows in time order."""

    X: np.ndarray                  # float32 (rows, features); NaN where a feature is null
    y: np.ndarray                  # encoded target (see Target.encode)
    label: np.ndarray              # the raw label values (float64)
    keys: pl.DataFrame             # symbol, timeframe, ts, close_ts of each row
    close_ms: np.ndarray           # close times, epoch ms, ascending
    previous_return: np.ndarray    # ret_1 of each row (the previous-direction baseline's input)
    feature_names: tuple[str, ...]
    target: Target
    feature_set: str
    fingerprint: str
    info: dict = field(default_factory=dict)

    @property
    def n_rows(self) -> int:
        return int(self.X.shape[0])

    @property
    def days(self) -> np.ndarray:
        """UTC day of each row's close (days since the epoch): the periods of ICIR."""
        return self.close_ms // _DAY_MS

    @property
    def symbols(self) -> list[str]:
        return sorted(self.keys["symbol"].unique().to_list())

    @property
    def start(self) -> datetime:
        return self.keys["ts"][0]

    @property
    def end(self) -> datetime:
        return self.keys["ts"][-1]


def build_dataset(
    rows: pl.DataFrame,
    target_name: str,
    feature_set: str,
    features: list[str] | None = None,
    exclude: list[str] | None = None,
) -> Dataset:
    """A dataset from `ml_features` rows of one feature set: warm rows whose label is known.

    ``features`` picks columns (default: every registered feature in ``rows``), ``exclude``
    drops some. Raises ``ValueError`` with the reason when nothing is left to learn from.
    """
    spec = target(target_name)
    if spec.name not in rows.columns:
        raise ValueError(f"the rows have no {spec.name} column")
    if "feature_set" in rows.columns and rows.height:
        other = sorted(set(rows["feature_set"].unique().to_list()) - {feature_set})
        if other:
            raise ValueError(f"rows of feature sets {other} mixed into a dataset of feature set {feature_set}")
    names = _feature_columns(rows, features, exclude)
    usable = rows.filter((pl.col("warm") == 1) & pl.col(spec.name).is_not_null() & pl.col(spec.name).is_not_nan())
    if usable.is_empty():
        raise ValueError(
            f"no warm rows with a {spec.name} label among {rows.height:,} rows of feature set {feature_set}"
        )
    usable = usable.sort("close_ts", "symbol")
    duplicated = usable.select(pl.struct("symbol", "timeframe", "ts").is_duplicated().any()).item()
    if duplicated:
        raise ValueError("duplicate (symbol, timeframe, ts) rows: read the committed rows of ml_features once")
    X = usable.select(pl.col(names).cast(pl.Float32)).to_numpy()
    if X.dtype != np.float32:  # all-null columns come back as object
        X = X.astype(np.float32)
    X = np.ascontiguousarray(X)
    label = usable[spec.name].cast(pl.Float64).to_numpy()
    keys = usable.select(KEY_COLUMNS)
    close_ms = keys["close_ts"].dt.epoch("ms").to_numpy()
    previous = (
        usable[PREVIOUS_RETURN].cast(pl.Float64).fill_null(0.0).to_numpy()
        if PREVIOUS_RETURN in usable.columns else np.zeros(usable.height)
    )
    digest = _fingerprint(X, label, keys, names, spec, feature_set)
    info = {
        "rows": int(usable.height),
        "rows_read": int(rows.height),
        "features": len(names),
        "symbols": sorted(keys["symbol"].unique().to_list()),
        "timeframes": sorted(keys["timeframe"].unique().to_list()),
        "first_ts": keys["ts"][0].isoformat(),
        "last_ts": keys["ts"][-1].isoformat(),
        "feature_set": feature_set,
        "target": spec.name,
    }
    return Dataset(X, spec.encode(label), label, keys, close_ms, previous, tuple(names), spec, feature_set, digest, info)


def _feature_columns(rows: pl.DataFrame, features: list[str] | None, exclude: list[str] | None) -> list[str]:
    wanted = list(features) if features else [name for name in FEATURE_NAMES if name in rows.columns]
    unknown = [name for name in wanted if name not in rows.columns]
    if unknown:
        raise ValueError(f"features not in the rows: {', '.join(unknown[:10])}")
    leaking = [name for name in wanted if name in LABEL_NAMES]
    if leaking:
        raise ValueError(f"labels cannot be features: {', '.join(leaking)}")
    names = [name for name in wanted if name not in set(exclude or ())]
    if not names:
        raise ValueError("no feature columns left to learn from")
    return names


def _fingerprint(X: np.ndarray, label: np.ndarray, keys: pl.DataFrame, names: list[str], spec: Target, feature_set: str) -> str:
    h = hashlib.blake2b(digest_size=16)
    header = f"{feature_set}|{spec.name}|{','.join(names)}|{X.shape[0]}|{keys['ts'][0]}|{keys['ts'][-1]}"
    h.update(header.encode())
    h.update(keys["symbol"].cast(pl.String).str.join("|").item().encode() if keys.height else b"")
    h.update(keys["timeframe"].cast(pl.String).unique().sort().str.join("|").item().encode())
    h.update(np.ascontiguousarray(keys["ts"].dt.epoch("ms").to_numpy()).tobytes())
    h.update(np.ascontiguousarray(label).tobytes())
    h.update(X.tobytes())
    return h.hexdigest()


def epoch_ms_to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)
