"""The JetStream streams of the live path, in one place: the bar feed (written by the collector
and the replay publisher, read by the runner) and the runner's ledger (read by the data-bridge
sensor into the warehouse).

Retention is configurable per stream with ``TRADEFORGE_STREAM_DAYS_<NAME>`` (days, e.g.
``TRADEFORGE_STREAM_DAYS_BARS=14``); :func:`stream` applies it. Every message that must not
repeat carries a deterministic ``Nats-Msg-Id``; the duplicate window is the server's default
(2 minutes), and the consumers are idempotent beyond it (the runner by bar time, the bridge by
row key).
"""

from __future__ import annotations

import os
from dataclasses import replace
from datetime import timedelta

from resources.bus.client import StreamSpec

#: Closed bars, ``bars.{SYM}.{TF}`` (messages: resources/bus/messages.py). A restarted runner
#: rebuilds its feature window from the warehouse plus these, so keep more than the longest
#: outage you want to ride out without a gap.
BARS_STREAM = StreamSpec("BARS", ("bars.*.*",), max_age=timedelta(days=7))

#: The runner's ledger: what it decided, sent, got filled and refused, and its account per bar.
SIGNALS_STREAM = StreamSpec("SIGNALS", ("signals.>",), max_age=timedelta(days=30))
ORDERS_STREAM = StreamSpec("ORDERS", ("orders.>",), max_age=timedelta(days=30))
BROKER_STREAM = StreamSpec("BROKER", ("broker.>",), max_age=timedelta(days=30))
RISK_STREAM = StreamSpec("RISK", ("risk.>",), max_age=timedelta(days=30))
PORTFOLIO_STREAM = StreamSpec("PORTFOLIO", ("portfolio.>",), max_age=timedelta(days=30))
LEDGER_STREAMS = (SIGNALS_STREAM, ORDERS_STREAM, BROKER_STREAM, RISK_STREAM, PORTFOLIO_STREAM)


def stream(spec: StreamSpec) -> StreamSpec:
    """``spec`` with the retention ``TRADEFORGE_STREAM_DAYS_<NAME>`` asks for, if set."""
    value = os.environ.get(f"TRADEFORGE_STREAM_DAYS_{spec.name}")
    if not value:
        return spec
    try:
        days = float(value)
    except ValueError:
        raise ValueError(f"TRADEFORGE_STREAM_DAYS_{spec.name}={value!r} is not a number of days") from None
    if days <= 0:
        raise ValueError(f"TRADEFORGE_STREAM_DAYS_{spec.name} must be positive, got {value}")
    return replace(spec, max_age=timedelta(days=days))
