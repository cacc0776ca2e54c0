"""New external data for running live runners: ``market.external.update`` on the ``EXTERNAL`` stream.

A live runner reads FRED, commodity and calendar rows once, with its warm-up, and never opens
the warehouse while it trades. When those tables change, Dagster's ``external_update`` asset
re-reads a recent window of them, shaped as the features join them (the values with their
``known_at``, the high-impact calendar events), and publishes it here; each runner replaces that window
of what it holds (:meth:`ExternalUpdate.apply`), so its next bars see
what a fresh read would give them, point-in-time as in the batch features (the values exactly;
the events from ``since`` on, further back than a runner started now would read, which only
matters to the hours since the last event when the symbol's currencies had none in a month).

A message that is not an update (bad JSON, a missing or mistyped field, a feature that is not
registered) is refused with :class:`~resources.bus.messages.BadMessage`; the runner logs it and
keeps what it had.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import polars as pl

from models.features.compute import EXTERNAL_FEATURES
from models.features.external import UTC_MS, ExternalData, symbol_events
from resources.bus.messages import BadMessage, decode_object
from resources.bus.subjects import market_external

SUBJECT = market_external("update")
_EVENT_FIELDS = ("ts", "known_at", "currency", "impact", "actual", "forecast")
_MS_LIMIT = 2**42  # epoch ms until the year 2109 (the features' lookup keys need it)


@dataclass(frozen=True)
class ExternalUpdate:
    read_at: datetime  # when the warehouse was read: a runner applies only reads newer than its own
    since: datetime  # values known from here on, and events scheduled from here on, are replaced
    events_until: datetime  # ... events scheduled before this
    values: pl.DataFrame  # known_at, name, value (the features' long rows)
    events: pl.DataFrame  # ts, known_at, currency, impact, actual, forecast (every currency)

    def apply(self, data: ExternalData | None, currencies: tuple[str, ...]) -> ExternalData:
        """``data`` (one symbol's) with this read's window: the values known from ``since`` on
        and the events (of ``currencies``) scheduled in ``[since, events_until)`` replaced, the
        rest kept. Both reads are point-in-time, so what a bar closing after ``since`` can see
        is what a fresh read gives. (Kept here, not in models/features: that code defines the
        feature set, and taking in new rows changes no feature's definition.)"""
        since = pl.lit(self.since).cast(UTC_MS)
        scheduled = pl.col("ts").cast(UTC_MS)
        in_window = (scheduled >= since) & (scheduled < pl.lit(self.events_until).cast(UTC_MS))
        events = symbol_events(self.events.filter(in_window), currencies)  # only what it replaces: one row per release time
        values = self.values.filter(pl.col("known_at").cast(UTC_MS) >= since)
        if data is None:
            return ExternalData(values, events)
        if data.values is not None:
            kept = data.values.filter(pl.col("known_at").cast(UTC_MS) < since)
            values = pl.concat([kept, values.select(kept.columns)], how="vertical_relaxed")
        if data.events is not None:
            kept = data.events.filter(~in_window)
            events = pl.concat([kept, events.select(kept.columns)], how="vertical_relaxed")
        return ExternalData(values, events)

    def encode(self) -> bytes:
        def ms(column: pl.Series) -> list[int]:
            return column.cast(UTC_MS).dt.epoch("ms").to_list()

        values = self.values.filter(pl.col("value").cast(pl.Float64).is_finite())  # as the features drop a missing value
        events = self.events
        return json.dumps({
            "read_at": _ms(self.read_at), "since": _ms(self.since), "events_until": _ms(self.events_until),
            "values": [list(row) for row in zip(ms(values["known_at"]), values["name"].to_list(), _floats(values["value"]),
                                                strict=True)],
            "events": [list(row) for row in zip(ms(events["ts"]), ms(events["known_at"]), events["currency"].to_list(),
                                                events["impact"].to_list(), _floats(events["actual"]),
                                                _floats(events["forecast"]), strict=True)],
        }, separators=(",", ":"), allow_nan=False).encode()

    def msg_id(self, payload: bytes) -> str:
        """The same payload is the same message: a retried publish is stored once."""
        return f"ext:{_ms(self.since)}:{hashlib.blake2b(payload, digest_size=8).hexdigest()}"

    @classmethod
    def decode(cls, payload: bytes) -> ExternalUpdate:
        data = decode_object(payload)
        read_at, since, until = (_ms_value(data.get(name), name) for name in ("read_at", "since", "events_until"))
        values, events = data.get("values"), data.get("events")
        if not isinstance(values, list) or not isinstance(events, list):
            raise BadMessage("malformed", "an external update needs the lists values and events")
        rows: dict[str, list] = {"known_at": [], "name": [], "value": []}
        for row in values:
            if not (isinstance(row, list) and len(row) == 3):
                raise BadMessage("malformed", f"a value row is [known_at, name, value], got {row!r:.80}")
            known_at, name, value = row
            if name not in EXTERNAL_FEATURES:
                raise BadMessage("malformed", f"{name!r:.40} is not a registered external feature")
            rows["known_at"].append(_ms_value(known_at, "known_at"))
            rows["name"].append(name)
            rows["value"].append(_number(value, name))
        event_rows: dict[str, list] = {name: [] for name in _EVENT_FIELDS}
        for row in events:
            if not (isinstance(row, list) and len(row) == len(_EVENT_FIELDS)):
                raise BadMessage("malformed", f"an event row is [{', '.join(_EVENT_FIELDS)}], got {row!r:.80}")
            ts, known_at, currency, impact, actual, forecast = row
            if not (isinstance(currency, str) and isinstance(impact, str)):
                raise BadMessage("malformed", f"an event's currency and impact are text, got {currency!r:.20}, {impact!r:.20}")
            for name, value in (("ts", _ms_value(ts, "event ts")), ("known_at", _ms_value(known_at, "event known_at")),
                                ("currency", currency), ("impact", impact), ("actual", _number(actual, "actual")),
                                ("forecast", _number(forecast, "forecast"))):
                event_rows[name].append(value)
        return cls(
            read_at=_datetime(read_at), since=_datetime(since), events_until=_datetime(until),
            values=pl.DataFrame(rows, schema={"known_at": pl.Int64, "name": pl.String, "value": pl.Float64})
            .with_columns(pl.col("known_at").cast(UTC_MS)),
            events=pl.DataFrame(event_rows, schema={"ts": pl.Int64, "known_at": pl.Int64, "currency": pl.String,
                                                    "impact": pl.String, "actual": pl.Float64, "forecast": pl.Float64})
            .with_columns(pl.col("ts", "known_at").cast(UTC_MS)),
        )


def _ms(moment: datetime) -> int:
    return round(moment.timestamp() * 1000)


def _datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


def _floats(column: pl.Series) -> list[float | None]:
    """JSON has no NaN or infinity: a number that is not one travels as null."""
    return [v if v is not None and math.isfinite(v) else None for v in column.cast(pl.Float64).to_list()]


def _ms_value(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < _MS_LIMIT:
        raise BadMessage("malformed", f"{name} is epoch milliseconds, got {value!r:.40}")
    return value


def _number(value: Any, name: str) -> float | None:
    if value is None:
        return None
    try:
        number = float(value) if not isinstance(value, bool) and isinstance(value, int | float) else math.nan
    except OverflowError:  # an integer beyond a float
        number = math.nan
    if not math.isfinite(number):
        raise BadMessage("malformed", f"{name!r:.40} is a finite number or null, got {str(value):.40}")
    return number
