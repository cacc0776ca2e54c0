"""JetStream streams of the live data path, defined once for publishers and consumers.

- ``BARS`` (``bars.>``): closed bars from the collector or a replay, consumed by the runner
  with a durable consumer. Every bar carries ``Nats-Msg-Id`` ``bar:SYM:TF:ts``
  (:func:`resources.bus.messages.bar_msg_id`): a retry inside the duplicate window is stored
  once, and publishers resume after the last bar the stream holds per subject
  (:func:`last_bar_ts`), so a restart after the window publishes nothing twice either.
- ``BROKER_DATA`` (``broker.account.*``, ``broker.quote.*``, ``broker.deal.*``): the MT5
  terminal's account snapshots, quotes and deals, published next to the terminal and drained
  into the warehouse by a Dagster sensor. Deliberately not ``broker.>``: the runner's own
  ``broker.fill.*`` / ``broker.error.*`` belong to its ledger stream (JetStream refuses two
  streams with overlapping subjects).
- The runner's ledger: ``SIGNALS`` (``signals.>``), ``ORDERS`` (``orders.>``), ``BROKER``
  (``broker.fill.*``, ``broker.error.*``), ``RISK`` (``risk.>``), ``PORTFOLIO`` (``portfolio.>``):
  what it decided, sent, got filled and refused, and its account per bar, each message with a
  deterministic ``Nats-Msg-Id``; the data-bridge sensor drains them into the warehouse and is
  idempotent beyond the duplicate window (by row key).
- ``EXTERNAL`` (``market.external.>``): recent FRED, commodity and calendar rows for running
  runners, published by Dagster when those tables change (:mod:`resources.bus.external`).

Retention is configurable from the environment when a stream is first created
(``ensure_stream`` leaves an existing stream as it is): ``TRADEFORGE_BARS_RETENTION_DAYS``
(default 30, 0 keeps bars forever), ``TRADEFORGE_BARS_DEDUP_MINUTES`` (default 120),
``TRADEFORGE_BROKER_RETENTION_DAYS`` (default 7: the sensor drains it every minute),
``TRADEFORGE_LEDGER_RETENTION_DAYS`` (default 30, the runner's ledger streams),
``TRADEFORGE_LEDGER_DEDUP_MINUTES`` (default 120, as the bars: a runner restarted up to that
long after a crash redoes the bar and its ledger messages are stored once).
"""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import timedelta
from typing import Any

from resources.bus.client import StreamSpec

BARS_SUBJECTS = ("bars.>",)
BROKER_DATA_SUBJECTS = ("broker.account.*", "broker.quote.*", "broker.deal.*")


def _number(name: str, default: float) -> float:
    text = os.environ.get(name, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{name}={text!r} is not a number") from None
    if value < 0:
        raise ValueError(f"{name}={text!r} must not be negative")
    return value


def _retention(days: float) -> timedelta | None:
    return timedelta(days=days) if days > 0 else None


def bars_stream(retention_days: float | None = None, dedup_minutes: float | None = None) -> StreamSpec:
    """The ``BARS`` stream; arguments override the environment (see the module doc)."""
    days = _number("TRADEFORGE_BARS_RETENTION_DAYS", 30.0) if retention_days is None else retention_days
    minutes = _number("TRADEFORGE_BARS_DEDUP_MINUTES", 120.0) if dedup_minutes is None else dedup_minutes
    max_age = _retention(days)
    return StreamSpec("BARS", BARS_SUBJECTS, max_age=max_age, duplicate_window=_window(minutes, max_age))


def _window(minutes: float, max_age: timedelta | None) -> timedelta:
    window = timedelta(minutes=max(minutes, 1 / 60))
    if max_age is not None and window > max_age:  # JetStream refuses a window longer than the retention
        window = max_age
    return window


def broker_data_stream(retention_days: float | None = None) -> StreamSpec:
    """The ``BROKER_DATA`` stream (account snapshots, quotes, deals of the MT5 terminal)."""
    days = _number("TRADEFORGE_BROKER_RETENTION_DAYS", 7.0) if retention_days is None else retention_days
    return StreamSpec("BROKER_DATA", BROKER_DATA_SUBJECTS, max_age=_retention(days), duplicate_window=timedelta(hours=1))


BARS_STREAM = bars_stream(30.0, 120.0)
"""The defaults, for code that needs a name and subjects at import time."""
BROKER_DATA_STREAM = broker_data_stream(7.0)


async def last_message(js: Any, stream: str, subject: str) -> Any | None:
    """The newest message of ``subject`` in ``stream`` (nats-py ``RawStreamMsg``), or None
    when the stream holds none (or does not exist yet)."""
    from nats.js.errors import NotFoundError

    try:
        return await js.get_last_msg(stream, subject)
    except NotFoundError:
        return None


async def last_bar_ts(js: Any, symbol: str, timeframe: str, stream: str = "BARS") -> int | None:
    """Open time (epoch ms) of the newest bar stored on ``bars.{symbol}.{timeframe}``: a
    publisher that restarts resumes after it."""
    from resources.bus.messages import BadMessage, decode_bar
    from resources.bus.subjects import bars

    message = await last_message(js, stream, bars(symbol, timeframe))
    if message is None:
        return None
    try:
        return int(decode_bar(message.data)["ts"])
    except BadMessage:  # something else on the subject: take the id, which every bar carries
        msg_id = (message.headers or {}).get("Nats-Msg-Id", "")
        tail = msg_id.rsplit(":", 1)[-1]
        return int(tail) if tail.isdigit() else None


EXTERNAL_STREAM = StreamSpec("EXTERNAL", ("market.external.>",), max_age=timedelta(days=7))
"""New external data for running live runners (:mod:`resources.bus.external`); a runner started
later reads the warehouse, so a week is plenty."""

LEDGER_STREAMS = (
    StreamSpec("SIGNALS", ("signals.>",), max_age=timedelta(days=30)),
    StreamSpec("ORDERS", ("orders.>",), max_age=timedelta(days=30)),
    StreamSpec("BROKER", ("broker.fill.*", "broker.error.*"), max_age=timedelta(days=30)),
    StreamSpec("RISK", ("risk.>",), max_age=timedelta(days=30)),
    StreamSpec("PORTFOLIO", ("portfolio.>",), max_age=timedelta(days=30)),
)
"""The runner's ledger streams with the default retention (names and subjects)."""


def ledger_streams(retention_days: float | None = None, dedup_minutes: float | None = None) -> tuple[StreamSpec, ...]:
    """The ledger streams with ``TRADEFORGE_LEDGER_RETENTION_DAYS`` and
    ``TRADEFORGE_LEDGER_DEDUP_MINUTES`` (or the arguments)."""
    days = _number("TRADEFORGE_LEDGER_RETENTION_DAYS", 30.0) if retention_days is None else retention_days
    minutes = _number("TRADEFORGE_LEDGER_DEDUP_MINUTES", 120.0) if dedup_minutes is None else dedup_minutes
    max_age = _retention(days)
    return tuple(replace(spec, max_age=max_age, duplicate_window=_window(minutes, max_age)) for spec in LEDGER_STREAMS)
