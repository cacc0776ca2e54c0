"""What a runner saves after every bar, and where: NATS KV.

Bucket ``tradeforge_live``, key ``state.{runner}``: one JSON value holding the engine's
snapshot (positions, orders, fills, last bar per symbol, kill switch, limits), the paper
broker's account (saved in the same write, so the two can never disagree), the stream
sequence of the last bar message handled, and the runner's counters. One KV put is atomic:
a crash leaves the state of the last bar finished or of the one before, never a mix. The bar
message is acknowledged only after the put, so the bar a crash interrupted is delivered again
and done again, with the same client order ids (see :mod:`live.runner`).

Bucket ``tradeforge_live_control``: ``kill.{runner}``, the kill switch as the operator set it
(``tradeforge live kill``; the runner applies each revision once, within one bar), and
``status.{runner}``, the heartbeat (``tradeforge live status`` reads both).

History is bounded: at the first bar of each hour the engine's and the paper account's
finished orders, fills, closed round trips and risk records from before the previous hour are
dropped (the ledger streams and the warehouse keep them), in memory and so in the saved value,
which stays small (tens of kilobytes) and cheap to write after months of trading. The points
are fixed by bar time, so a restarted runner compacts where an uninterrupted one does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from typing import Any

from models.trading.orders import TERMINAL, OrderState

STATE_BUCKET = "tradeforge_live"
CONTROL_BUCKET = "tradeforge_live_control"
COMPACT_MS = 3_600_000  # compaction period (bar time)
FORMAT = 1


def state_key(runner: str) -> str:
    return f"state.{runner}"


def kill_key(runner: str) -> str:
    return f"kill.{runner}"


def status_key(runner: str) -> str:
    return f"status.{runner}"


@dataclass
class RunnerState:
    runner: str
    strategy: str
    engine: dict | None = None  # TradingEngine.snapshot()
    broker: dict | None = None  # PaperBroker.state(); None for MT5 (the account lives at the broker)
    last_seq: int = 0  # stream sequence of the last bar message handled
    first_seq: int = 0  # stream sequence of the first bar this runner processed (for rebuilding features)
    bars: int = 0  # bars processed (the bar_seq of the last one)
    last_ts: dict[str, int] = field(default_factory=dict)  # symbol -> open (ms) of the last bar processed
    warmup_end: dict[str, int] = field(default_factory=dict)  # symbol -> open (ms) of the newest warm-up bar at first start
    compacted: int = -1  # the compaction period (bar ts // COMPACT_MS) last compacted
    kill_revision: int = 0  # the last kill command (KV revision) applied
    model_version: str = ""
    peak: float = 0.0  # the account's equity peak, for the drawdown shown
    starts: int = 0
    format: int = FORMAT

    def to_json(self) -> bytes:
        # fields() and not asdict(): asdict deep-copies the engine's snapshot first
        return json.dumps({f.name: getattr(self, f.name) for f in fields(self)}, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, payload: bytes | str | dict) -> RunnerState:
        data = payload if isinstance(payload, dict) else json.loads(payload)
        if data.get("format") != FORMAT:
            raise ValueError(f"saved runner state has format {data.get('format')!r}, this code reads {FORMAT}")
        return cls(**data)


def compact_snapshot(snapshot: dict[str, Any], before_ms: int, order_window_ms: int) -> dict[str, Any]:
    """An engine snapshot without what finished before ``before_ms``: terminal orders decided
    earlier (not the parents of orders kept), their fills, closed round trips and risk records.
    Open trades keep their place; round trips are numbered again from 1. Nothing the engine
    decides with is dropped (working orders, positions, limits, the order-rate window)."""
    out = dict(snapshot)
    orders = snapshot["orders"]
    by_id = {o["client_id"]: o for o in orders}
    keep = {cid for st in snapshot["symbols"].values() for cid in st["live"]}
    for o in orders:
        if OrderState(o["state"]) not in TERMINAL or o["bar_ts"] >= before_ms:
            keep.add(o["client_id"])
    for cid in list(keep):
        parent = by_id.get(cid, {}).get("parent_id")
        while parent is not None and parent not in keep and parent in by_id:
            keep.add(parent)
            parent = by_id[parent].get("parent_id")
    out["orders"] = [o for o in orders if o["client_id"] in keep]
    out["fills"] = [f for f in snapshot["fills"] if f["ts"] >= before_ms or f["client_id"] in keep]
    out["risk_events"] = [e for e in snapshot["risk_events"] if e["ts"] >= before_ms]
    out["order_times"] = [t for t in snapshot["order_times"] if t >= before_ms - order_window_ms]
    portfolio = dict(snapshot["portfolio"])
    open_ids = set(portfolio["open"].values())
    kept = [t for t in portfolio["trades"] if t["trade_id"] in open_ids or (t["exit_ts"] or 0) >= before_ms]
    renumber = {t["trade_id"]: i + 1 for i, t in enumerate(kept)}
    portfolio["trades"] = [{**t, "trade_id": renumber[t["trade_id"]]} for t in kept]
    portfolio["open"] = {s: renumber[i] for s, i in portfolio["open"].items()}
    out["portfolio"] = portfolio
    return out
