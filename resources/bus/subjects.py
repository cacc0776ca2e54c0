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


def market_external(kind: str) -> str:
    """``market.external.{kind}``: new external data for the live runners (``update``)."""
    return f"market.external.{kind}"


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


BACKTEST_EVENTS = ("started", "progress", "completed", "failed")


def backtest(event: str, run_id: str) -> str:
    """``backtest.{started|progress|completed|failed}.{run_id}`` (a run id is one token: no dots)."""
    if event not in BACKTEST_EVENTS:
        raise ValueError(f"unknown backtest event {event!r}")
    if not run_id or any(c in run_id for c in ".*> "):
        raise ValueError(f"a backtest run id is one subject token, got {run_id!r}")
    return f"backtest.{event}.{run_id}"


def ticks(symbol: str) -> str:
    """``ticks.{SYM}``: every tick the collector receives (core NATS, not stored)."""
    return f"ticks.{symbol}"


def token(name: str) -> str:
    """``name`` as one subject token: brokers' symbols may hold dots or spaces (``EURUSD.m``,
    ``US30 Cash``), which NATS reads as separators; they become ``_`` (the payload keeps the name)."""
    cleaned = "".join("_" if c in ".*> \t\r\n" else c for c in str(name))
    return cleaned or "_"


def broker_account(login: int | str) -> str:
    """``broker.account.{login}``: an MT5 account snapshot (stream ``BROKER_DATA``)."""
    return f"broker.account.{token(str(login))}"


def broker_quote(symbol: str) -> str:
    """``broker.quote.{SYM}``: the broker's bid/ask samples (stream ``BROKER_DATA``)."""
    return f"broker.quote.{token(symbol)}"


def broker_deal(symbol: str) -> str:
    """``broker.deal.{SYM}``: the account's deals (stream ``BROKER_DATA``)."""
    return f"broker.deal.{token(symbol)}"
