"""NATS subjects (DESIGN.md's convention), built in one place so publishers and subscribers
agree."""

from __future__ import annotations

TRAINING_EVENTS = ("started", "progress", "completed", "failed")


def training(event: str, run_id: str) -> str:
    """``training.{started|progress|completed|failed}.{run_id}``."""
    if event not in TRAINING_EVENTS:
        raise ValueError(f"unknown training event {event!r}")
    return f"training.{event}.{run_id}"


def bars(symbol: str, timeframe: str) -> str:
    return f"bars.{symbol}.{timeframe}"


def features(symbol: str, timeframe: str) -> str:
    return f"features.{symbol}.{timeframe}"


def signals(symbol: str) -> str:
    return f"signals.{symbol}"


# -- the live runner's subjects (see live/ and resources/bus/streams.py) ------------------------
ORDER_STATUSES = ("new", "submitted", "accepted", "partially_filled", "pending_cancel", "filled", "cancelled",
                  "rejected", "expired", "unknown")


def signal_decision(approved: bool, symbol: str) -> str:
    """``signals.approved.{SYM}`` / ``signals.rejected.{SYM}``: the risk model's answer to a signal."""
    return f"signals.{'approved' if approved else 'rejected'}.{symbol}"


def orders(status: str, symbol: str) -> str:
    """``orders.{status}.{SYM}``: an order moved to ``status`` (one message per transition)."""
    if status not in ORDER_STATUSES:
        raise ValueError(f"unknown order status {status!r}")
    return f"orders.{status}.{symbol}"


def broker_fill(symbol: str) -> str:
    return f"broker.fill.{symbol}"


def broker_error(symbol: str) -> str:
    return f"broker.error.{symbol}"


def risk_alert(kind: str) -> str:
    """``risk.alert.{kind}``: kill switch, limits, broker halts, bad bars, model refusals."""
    return f"risk.alert.{kind}"


def portfolio(runner: str) -> str:
    """``portfolio.{runner}``: a runner's account after each bar (equity, positions)."""
    return f"portfolio.{runner}"


def heartbeat(runner: str) -> str:
    """``live.heartbeat.{runner}``: core NATS, not stored."""
    return f"live.heartbeat.{runner}"
