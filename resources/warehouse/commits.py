"""All-or-nothing partition replacement: every write is a batch, visible once committed.

A partitioned table carries two hidden columns: ``_scope``, the partition a row belongs to
(computed by the table's DEFAULT expression, e.g. ``EURUSD|2024-03-06``), and ``_batch``, the
write that stored it. A write inserts its rows under a fresh batch id (invisible so far), then
records ``(table, scope, batch)`` for every scope it replaces in ``partition_commits`` with one
INSERT (one part: atomic), then deletes the superseded batches. Readers see a row only when its
``(_scope, _batch)`` is the committed one (:func:`visible`). So a crash at any moment leaves a
reader with the old rows or the new rows of a partition, never none and never both: before
the commit the new rows are invisible, after it the old ones are; left-overs of a crashed
write stay invisible until the next write of that scope removes them.

Writes also no longer need a DELETE to replace a first load, which is what made them slow
down as history grew.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import date

COMMITS_TABLE = "partition_commits"


@dataclass(frozen=True, slots=True)
class Partitioned:
    """A table replaced by partition scope. ``scope_sql`` is the SQL expression of a row's
    scope (the ``_scope`` column's DEFAULT); :meth:`scope` formats the same key in Python."""

    table: str
    scope_sql: str
    parts: tuple[str, ...]  # what the key is made of, in order, for the docs and errors

    def scope(self, *parts: object) -> str:
        if len(parts) != len(self.parts):
            raise ValueError(f"{self.table}: a scope is ({', '.join(self.parts)}), got {parts!r}")
        return "|".join(p.isoformat() if isinstance(p, date) else str(p) for p in parts)


_DAY = "toString(toDate({}))"
PARTITIONED: dict[str, Partitioned] = {
    spec.table: spec
    for spec in (
        Partitioned("market_ticks", f"concat(symbol, '|', {_DAY.format('ts')})", ("symbol", "day")),
        Partitioned("market_ticks_quarantine", "concat(symbol, '|', toString(day))", ("symbol", "day")),
        Partitioned("vendor_candles", f"concat(symbol, '|', {_DAY.format('ts')})", ("symbol", "day")),
        Partitioned("vendor_candles_quarantine", "concat(symbol, '|', toString(day))", ("symbol", "day")),
        # a bar belongs to the last day of data that went into it (multi-day bars: one version per day)
        Partitioned("aggregates", f"concat(symbol, '|', {_DAY.format('covered_until - 1')})", ("symbol", "day")),
        Partitioned("ml_features", f"concat(symbol, '|', feature_set, '|', {_DAY.format('ts')})", ("symbol", "feature_set", "day")),
        Partitioned("external_fred_indicators", "toString(week)", ("week",)),
        Partitioned("external_commodity_prices", "toString(date)", ("day",)),
        Partitioned("external_economic_calendar", _DAY.format("ts"), ("day",)),
        *(Partitioned(table, "concat(model_name, '|', toString(model_version))", ("model_name", "model_version"))
          for table in ("model_predictions", "model_folds")),
        *(Partitioned(table, "run_id", ("run_id",))
          for table in ("training_runs", "training_metrics", "backtest_runs", "backtest_trades", "backtest_equity")),
    )
}


def visible(table: str, alias: str = "") -> str:
    """SQL condition: the row belongs to the committed batch of its partition scope."""
    if table not in PARTITIONED:
        raise KeyError(f"{table} is not a partitioned table: {sorted(PARTITIONED)}")
    prefix = f"{alias}." if alias else ""
    return (
        f"({prefix}_scope, {prefix}_batch) IN "
        f"(SELECT scope, batch FROM {COMMITS_TABLE} FINAL WHERE table_name = '{table}')"
    )


def new_batch(after: int = 0) -> int:
    """A batch id greater than ``after`` (the newest committed for the scopes written) and
    than any earlier id of this clock: newer writes win even if the clock stepped back."""
    return max(time.time_ns(), after + 1)


def hidden_columns_sql(table: str) -> tuple[str, str]:
    """The two ``ADD COLUMN`` clauses that make ``table`` partitioned."""
    spec = PARTITIONED[table]
    return (
        f"ADD COLUMN IF NOT EXISTS _scope LowCardinality(String) DEFAULT {spec.scope_sql}",
        "ADD COLUMN IF NOT EXISTS _batch UInt64 DEFAULT 0",
    )
