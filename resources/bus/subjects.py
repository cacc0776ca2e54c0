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
