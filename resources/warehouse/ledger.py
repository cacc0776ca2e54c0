"""The live runner's ledger in the warehouse: ``trading_signals``, ``orders`` (one row per
transition), ``executions``, ``positions`` (per symbol per bar), ``portfolio_value`` (per bar),
``risk_events``.

The rows come from the ledger messages :mod:`live.ledger` publishes (drained by
:mod:`sensors.ledger`). :func:`ledger_rows` reads one message into rows of its tables and
refuses, with a :class:`~resources.bus.messages.BadMessage` naming what is wrong, anything that
is not a row: a missing or mistyped field, a subject that contradicts the payload. Each table's
key (migration 14) is the message's identity, so a redelivered message replaces its rows and
reads use FINAL.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

import polars as pl

from resources.bus.messages import BadMessage, decode_object
from resources.bus.subjects import token
from resources.warehouse.client import Warehouse

_MS = pl.Datetime("ms", "UTC")

SIGNAL_SCHEMA = {"runner": pl.String(), "symbol": pl.String(), "timeframe": pl.String(), "ts": _MS, "close_ts": _MS,
                 "model_name": pl.String(), "model_version": pl.String(), "feature_set": pl.String(),
                 "model_column": pl.String(), "value": pl.Float64(), "side": pl.Int8(), "confidence": pl.Float64(),
                 "prob": pl.Float64(), "status": pl.String(), "reason": pl.String()}
ORDER_SCHEMA = {"runner": pl.String(), "client_id": pl.String(), "seq": pl.UInt16(), "event": pl.String(),
                "status": pl.String(), "symbol": pl.String(), "side": pl.Int8(), "type": pl.String(), "qty": pl.Float64(),
                "intent": pl.String(), "bar_ts": _MS, "price": pl.Float64(), "stop_loss": pl.Float64(),
                "take_profit": pl.Float64(), "filled_qty": pl.Float64(), "avg_fill_price": pl.Float64(),
                "parent_id": pl.String(), "reason": pl.String(), "model_version": pl.String(), "ts": _MS}
EXECUTION_SCHEMA = {"runner": pl.String(), "fill_id": pl.String(), "client_id": pl.String(), "symbol": pl.String(),
                    "side": pl.Int8(), "qty": pl.Float64(), "price": pl.Float64(), "commission": pl.Float64(), "ts": _MS,
                    "conv": pl.Float64(), "mid": pl.Float64(), "reason": pl.String()}
POSITION_SCHEMA = {"runner": pl.String(), "bar_seq": pl.UInt64(), "ts": _MS, "symbol": pl.String(), "units": pl.Float64(),
                   "avg_price": pl.Float64(), "mark": pl.Float64()}
PORTFOLIO_SCHEMA = {"runner": pl.String(), "bar_seq": pl.UInt64(), "ts": _MS, "symbol": pl.String(),
                    "equity": pl.Float64(), "balance": pl.Float64(), "margin": pl.Float64(), "exposure": pl.Float64(),
                    "open_positions": pl.UInt16(), "peak": pl.Float64(), "drawdown": pl.Float64(), "kill": pl.String(),
                    "kill_reason": pl.String(), "model_version": pl.String()}
RISK_EVENT_SCHEMA = {"runner": pl.String(), "event_id": pl.String(), "ts": _MS, "symbol": pl.String(), "kind": pl.String(),
                     "approved": pl.Boolean(), "reason": pl.String(), "client_id": pl.String(), "qty": pl.Float64(),
                     "source": pl.String(), "model_version": pl.String(), "details": pl.String()}

#: table -> (columns, the order reads return)
LEDGER_TABLES: dict[str, tuple[dict, str]] = {
    "trading_signals": (SIGNAL_SCHEMA, "runner, ts, symbol"),
    "orders": (ORDER_SCHEMA, "runner, ts, client_id, seq"),
    "executions": (EXECUTION_SCHEMA, "runner, ts, fill_id"),
    "positions": (POSITION_SCHEMA, "runner, bar_seq, symbol"),
    "portfolio_value": (PORTFOLIO_SCHEMA, "runner, bar_seq"),
    "risk_events": (RISK_EVENT_SCHEMA, "runner, ts, event_id"),
}

# Field checks: str, int (>= 0), float (finite), ms (epoch ms >= 0), bool, side (-1, 0, +1, ints or
# integral floats); a trailing "?" allows null (and reads NaN as null).
_SIGNAL = {"runner": "str", "symbol": "str", "timeframe": "str", "ts": "ms", "close_ts": "ms", "model_name": "str",
           "model_version": "version", "feature_set": "str", "column": "str", "value": "float?", "side": "side?",
           "confidence": "float?", "prob": "float?", "status": "str", "reason": "str"}
_ORDER = {"runner": "str", "client_id": "str", "seq": "int", "event": "str", "status": "str", "symbol": "str",
          "side": "side", "type": "str", "qty": "float", "intent": "str", "bar_ts": "ms", "price": "float?",
          "stop_loss": "float?", "take_profit": "float?", "filled_qty": "float", "avg_fill_price": "float",
          "parent_id": "str?", "reason": "str", "model_version": "version", "ts": "ms"}
# An MT5 fill may not know the conversion rate or the mid: null, not refused.
_FILL = {"runner": "str", "fill_id": "str", "client_id": "str", "symbol": "str", "side": "side", "qty": "float",
         "price": "float", "commission": "float", "ts": "ms", "conv": "float?", "mid": "float?", "reason": "str"}
_RISK = {"runner": "str", "event_id": "str", "ts": "ms", "symbol": "str", "kind": "str", "approved": "bool",
         "reason": "str", "client_id": "str", "qty": "float", "source": "str"}
_PORTFOLIO = {"runner": "str", "bar_seq": "int", "ts": "ms", "symbol": "str", "equity": "float", "balance": "float",
              "positions": "dict", "peak": "float", "drawdown": "float", "kill": "str", "kill_reason": "str",
              "model_version": "version"}
_POSITION = {"units": "float", "avg": "float", "mark": "float?"}
_PORTFOLIO_OPTIONAL = {"margin": "float?", "exposure": "float?"}  # from runners that publish them


def _value(what: str, name: str, kind: str, value: Any) -> Any:
    nullable = kind.endswith("?")
    kind = kind.rstrip("?")
    if value is None or (nullable and isinstance(value, float) and math.isnan(value)):
        if nullable:
            return None
        raise BadMessage("malformed", f"{what} {name} is null")
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "str":
        ok = isinstance(value, str)
    elif kind == "version":  # a registry version: "3", or 3 from a client that sent a number
        ok = isinstance(value, str) or (number and float(value).is_integer())
        value = str(int(value)) if ok and number else value
    elif kind == "float":
        ok = number and math.isfinite(value)
    elif kind in ("int", "ms"):
        ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
    elif kind == "bool":
        ok = isinstance(value, bool)
    elif kind == "side":
        ok = number and math.isfinite(value) and value in (-1, 0, 1)
        value = int(value) if ok else value
    else:  # dict
        ok = isinstance(value, dict)
    if not ok:
        raise BadMessage("malformed", f"{what} {name} is {value!r}")
    return value


def _checked(what: str, data: Mapping[str, Any], fields: Mapping[str, str]) -> dict[str, Any]:
    missing = [name for name in fields if name not in data and not fields[name].endswith("?")]
    if missing:
        raise BadMessage("malformed", f"{what} lacks {', '.join(missing)}")
    return {name: _value(what, name, kind, data.get(name)) for name, kind in fields.items()}


def _agrees(what: str, subject: str, token_: str, value: str) -> None:
    if token_ != token(value):
        raise BadMessage("mismatch", f"{what} on {subject} says {value!r}")


def ledger_rows(subject: str, payload: bytes) -> dict[str, list[dict[str, Any]]]:
    """The rows one ledger message makes, by table (times stay epoch ms)."""
    data = decode_object(payload)
    parts = subject.split(".")
    head = parts[0]
    if head == "signals" and len(parts) == 2:
        row = _checked("signal", data, _SIGNAL)
        _agrees("signal symbol", subject, parts[1], row["symbol"])
        row["model_column"] = row.pop("column")
        return {"trading_signals": [row]}
    if (head == "signals" and len(parts) == 3 and parts[1] in ("approved", "rejected")) or (
            head == "risk" and len(parts) == 3 and parts[1] == "alert") or (
            head == "broker" and len(parts) == 3 and parts[1] == "error"):
        row = _checked("risk event", data, _RISK)
        if head == "signals":
            if row["approved"] != (parts[1] == "approved"):
                raise BadMessage("mismatch", f"risk event on {subject} says approved={row['approved']}")
            _agrees("risk event symbol", subject, parts[2], row["symbol"])
        elif head == "risk":
            _agrees("risk event kind", subject, parts[2], row["kind"])
        else:
            _agrees("broker error symbol", subject, parts[2], row["symbol"])
        row["model_version"] = _value("risk event", "model_version", "version?", data.get("model_version")) or ""
        extra = {k: v for k, v in data.items() if k not in _RISK and k != "model_version"}
        row["details"] = json.dumps(extra, sort_keys=True, separators=(",", ":")) if extra else ""
        return {"risk_events": [row]}
    if head == "orders" and len(parts) == 3:
        row = _checked("order", data, _ORDER)
        _agrees("order status", subject, parts[1], row["status"])
        _agrees("order symbol", subject, parts[2], row["symbol"])
        if row["seq"] > 65_535:
            raise BadMessage("malformed", f"order seq is {row['seq']}")
        return {"orders": [row]}
    if head == "broker" and len(parts) == 3 and parts[1] == "fill":
        row = _checked("fill", data, _FILL)
        _agrees("fill symbol", subject, parts[2], row["symbol"])
        return {"executions": [row]}
    if head == "portfolio" and len(parts) == 2:
        row = _checked("portfolio", data, _PORTFOLIO)
        _agrees("portfolio runner", subject, parts[1], row["runner"])
        row.update(_checked("portfolio", data, _PORTFOLIO_OPTIONAL))
        positions = []
        for symbol, position in row.pop("positions").items():
            if not isinstance(position, dict):
                raise BadMessage("malformed", f"portfolio position {symbol} is {position!r}")
            p = _checked(f"portfolio position {symbol}", position, _POSITION)
            positions.append({"runner": row["runner"], "bar_seq": row["bar_seq"], "ts": row["ts"], "symbol": symbol,
                              "units": p["units"], "avg_price": p["avg"], "mark": p["mark"]})
        row["open_positions"] = len(positions)
        return {"portfolio_value": [row], "positions": positions}
    raise BadMessage("malformed", f"no ledger table for subject {subject}")


def ledger_frame(table: str, rows: list[dict[str, Any]]) -> pl.DataFrame:
    """Rows of ``table`` (times in epoch ms) as a frame of its columns."""
    schema = LEDGER_TABLES[table][0]
    raw = {name: (pl.Int64() if dtype == _MS else dtype) for name, dtype in schema.items()}
    return pl.DataFrame(rows, schema=raw, strict=False).cast(schema)  # type: ignore[arg-type]


def write_ledger(warehouse: Warehouse, table: str, frame: pl.DataFrame) -> int:
    schema = LEDGER_TABLES[table][0]
    missing = set(schema) - set(frame.columns)
    if missing:
        raise ValueError(f"{table}: the frame lacks {sorted(missing)}")
    return warehouse.insert_frame(table, frame.select(list(schema)).cast(schema))  # type: ignore[arg-type]


def read_ledger(warehouse: Warehouse, table: str, runner: str | None = None) -> pl.DataFrame:
    """Every row of a ledger table (of one runner), each key once."""
    schema, order = LEDGER_TABLES[table]
    where, params = ("runner = {runner:String}", {"runner": runner}) if runner is not None else ("1", {})
    frame = warehouse.query_frame(f"SELECT {', '.join(schema)} FROM {table} FINAL WHERE {where} ORDER BY {order}", params)
    if frame.is_empty():
        return pl.DataFrame(schema=schema)
    return frame.cast(schema)  # type: ignore[arg-type]


def read_order_states(warehouse: Warehouse, runner: str | None = None) -> pl.DataFrame:
    """Each order once, in its latest state (its last transition)."""
    orders = read_ledger(warehouse, "orders", runner)
    latest = orders.sort("seq").group_by("runner", "client_id", maintain_order=True).last()
    return latest.sort("runner", "bar_ts", "client_id")


def read_signals(warehouse: Warehouse, runner: str | None = None) -> pl.DataFrame:
    """``trading_signals`` beside the risk model's answers on the same bar: ``entry_approved`` /
    ``entry_reason`` and ``exit_approved`` / ``exit_reason`` (null where nothing was asked; a
    reversal asks both)."""
    signals = read_ledger(warehouse, "trading_signals", runner)
    events = read_ledger(warehouse, "risk_events", runner).filter(pl.col("kind").is_in(["entry", "exit"]))
    for kind in ("entry", "exit"):
        answers = (events.filter(pl.col("kind") == kind)
                   .unique(["runner", "symbol", "ts"], keep="last", maintain_order=True)
                   .select("runner", "symbol", "ts", pl.col("approved").alias(f"{kind}_approved"),
                           pl.col("reason").alias(f"{kind}_reason")))
        signals = signals.join(answers, on=["runner", "symbol", "ts"], how="left", maintain_order="left")
    return signals
