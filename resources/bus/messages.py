"""Wire formats on the bus that several programs share: a closed bar on ``bars.{SYM}.{TF}``.

A bar travels as JSON: the columns of :data:`models.market.candles.BAR_SCHEMA`, ``ts`` (the
bar's open) and ``close_ts`` as epoch milliseconds UTC. Its ``Nats-Msg-Id`` is
``bar:{SYM}:{TF}:{ts}``, so a bar published twice (a replay restarted, a collector reconnecting)
is stored once by JetStream. :func:`decode_bar` refuses anything a runner must not act on
with a :class:`BadMessage` naming the reason (the runner counts, publishes and skips it).
"""

from __future__ import annotations

import json
import math
from typing import Any

from models.market.timeframes import Timeframe

BAR_FIELDS = ("symbol", "timeframe", "ts", "close_ts", "open", "high", "low", "close", "bid_close", "ask_close",
              "volume", "tick_count", "quote_count", "spread_mean", "spread_max", "vwap", "source")
_PRICES = ("open", "high", "low", "close")
_OPTIONAL = ("bid_close", "ask_close", "spread_mean", "spread_max")
_COUNTS = ("tick_count", "quote_count")
_MAX_COUNT = 2**32 - 1  # UInt32 in BAR_SCHEMA
MIN_TS_MS = 0  # 1970-01-01
MAX_TS_MS = 4_102_444_800_000  # 2100-01-01: a bar time beyond is a unit error (ns, us) or garbage


class BadMessage(ValueError):
    """A message that is not a usable bar; ``reason`` is a short code for counting."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def decode_object(payload: bytes | str) -> dict[str, Any]:
    """``payload`` as a JSON object, the first check of every message on the bus."""
    try:
        value = json.loads(payload)
    except (ValueError, RecursionError) as exc:  # bad bytes, bad JSON, an integer of thousands of digits, deep nesting
        raise BadMessage("malformed", f"not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise BadMessage("malformed", f"a JSON {type(value).__name__}, not an object")
    return value


def bar_msg_id(symbol: str, timeframe: str, ts_ms: int) -> str:
    return f"bar:{symbol}:{timeframe}:{ts_ms}"


def encode_bar(bar: dict[str, Any]) -> bytes:
    """A bar (a row of BAR_SCHEMA plus ``close_ts``; datetimes or epoch ms) as JSON bytes."""
    out = {}
    for name in BAR_FIELDS:
        value = bar.get(name)
        if hasattr(value, "timestamp"):
            value = round(value.timestamp() * 1000)
        out[name] = value
    return json.dumps(out, separators=(",", ":")).encode()


def _number(bar: dict[str, Any], name: str) -> float:
    """``bar[name]`` as a finite float, or :class:`BadMessage` (a bool, a string, 1e999, 10**400)."""
    value = bar[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise BadMessage("malformed", f"{name} is not a number: {value!r}"[:200])
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise BadMessage("impossible", f"{name} is {value!r}"[:200])
    return number


def decode_bar(payload: bytes, subject: str | None = None) -> dict[str, Any]:
    """The bar in ``payload``, checked: JSON object, every field of the right type, a known
    timeframe, a symbol and timeframe that match ``subject``, integral times within
    :data:`MIN_TS_MS`..:data:`MAX_TS_MS` with ``close_ts > ts``, finite positive prices,
    low <= open, close <= high, quotes (when given) positive and not crossed, non-negative
    volume and counts that fit the bar schema. Prices come back as floats, counts as ints:
    whatever passes here builds a row of BAR_SCHEMA without an error."""
    bar = decode_object(payload)
    missing = [name for name in BAR_FIELDS if name not in bar]
    if missing:
        raise BadMessage("malformed", f"missing {', '.join(missing)}")
    for name in ("symbol", "timeframe"):
        if not isinstance(bar[name], str) or not bar[name]:
            raise BadMessage("malformed", f"{name} is not a name: {bar[name]!r}"[:200])
    if bar["source"] is not None and not isinstance(bar["source"], str):
        raise BadMessage("malformed", f"source is not text: {bar['source']!r}"[:200])
    if bar["timeframe"] not in Timeframe.__members__:
        raise BadMessage("malformed", f"unknown timeframe {bar['timeframe']!r}"[:200])
    if subject is not None and subject != f"bars.{bar['symbol']}.{bar['timeframe']}":
        raise BadMessage("wrong_subject", f"a {bar['symbol']} {bar['timeframe']} bar on {subject}"[:200])
    for name in ("ts", "close_ts"):
        if not isinstance(bar[name], int) or isinstance(bar[name], bool):
            raise BadMessage("malformed", f"{name} is not epoch milliseconds: {bar[name]!r}"[:200])
        if not MIN_TS_MS <= bar[name] <= MAX_TS_MS:
            raise BadMessage("impossible", f"{name} {bar[name]} is not a time between 1970 and 2100 in epoch milliseconds"[:200])
    if bar["close_ts"] <= bar["ts"]:
        raise BadMessage("impossible", f"close_ts {bar['close_ts']} not after ts {bar['ts']}")
    for name in (*_PRICES, "vwap", *_OPTIONAL, "volume"):
        if bar[name] is None and name in _OPTIONAL:
            continue
        bar[name] = _number(bar, name)
    for name in _COUNTS:
        count = _number(bar, name)
        if not count.is_integer() or not 0 <= count <= _MAX_COUNT:
            raise BadMessage("impossible", f"{name} {bar[name]!r} is not a count (0 to {_MAX_COUNT:,})"[:200])
        bar[name] = int(count)
    if min(bar[name] for name in (*_PRICES, "vwap")) <= 0:
        raise BadMessage("impossible", "a price is not positive")
    if bar["low"] > min(bar["open"], bar["close"]) or bar["high"] < max(bar["open"], bar["close"]):
        raise BadMessage("impossible", f"low {bar['low']} / high {bar['high']} do not hold open {bar['open']} and close {bar['close']}")
    if bar["volume"] < 0:
        raise BadMessage("impossible", "negative volume")
    bid, ask = bar["bid_close"], bar["ask_close"]
    if (bid is not None and bid <= 0) or (ask is not None and ask <= 0):
        raise BadMessage("impossible", f"a quote is not positive: bid {bid} ask {ask}")
    if bid is not None and ask is not None and bid > ask:
        raise BadMessage("impossible", f"crossed quotes: bid {bid} above ask {ask}")
    return bar


TICK_FIELDS = ("ts", "bid", "ask", "price", "size", "vendor_seq")


def encode_ticks(symbol: str, source: str, ticks: Any) -> bytes:
    """Ticks of one symbol (a polars frame of :data:`models.market.ticks.TICK_SCHEMA`) as one
    JSON object of columns on ``ticks.{SYM}``: ``ts`` in epoch ms, null where a tick has no
    such value (a quote has no price, a trade no bid)."""
    columns = {name: ticks[name].to_list() for name in TICK_FIELDS if name != "ts"}
    columns["ts"] = ticks["ts"].dt.epoch("ms").to_list()
    return json.dumps({"symbol": symbol, "source": source, **columns}, separators=(",", ":")).encode()


def decode_ticks(payload: bytes) -> dict[str, Any]:
    """The columns of a ``ticks.{SYM}`` message (see :func:`encode_ticks`)."""
    message = decode_object(payload)
    if any(name not in message for name in ("symbol", *TICK_FIELDS)):
        raise BadMessage("malformed", "not a ticks message")
    lengths = {len(message[name]) for name in TICK_FIELDS if isinstance(message[name], list)}
    if len(lengths) != 1 or any(not isinstance(message[name], list) for name in TICK_FIELDS):
        raise BadMessage("malformed", "tick columns of different lengths")
    return message


# -- the user's broker data (stream BROKER_DATA): one row of the sampler's frames a message ------

BROKER_KINDS = ("account", "quote", "deal")
_BROKER_NULLABLE = {"margin_level", "client_id"}


def _broker_schema(kind: str) -> dict:
    from resources.brokers.mt5.sampler import ACCOUNT_SCHEMA, QUOTE_SCHEMA, TRADE_SCHEMA

    return {"account": ACCOUNT_SCHEMA, "quote": QUOTE_SCHEMA, "deal": TRADE_SCHEMA}[kind]


def broker_msg_id(kind: str, row: dict[str, Any]) -> str:
    """The row's key in its table, so a re-sampled row (deals overlap by an hour) is stored once."""
    ts = row["ts"]
    ts_ms = round(ts.timestamp() * 1000) if hasattr(ts, "timestamp") else int(ts)
    if kind == "account":
        return f"broker-account:{row['login']}:{ts_ms}"
    if kind == "quote":
        return f"broker-quote:{row['server']}:{row['symbol']}:{ts_ms}"
    return f"broker-deal:{row['server']}:{row['login']}:{row['deal']}"


def encode_broker_row(row: dict[str, Any]) -> bytes:
    """A row of the sampler's account, quote or deal frames as JSON (``ts`` in epoch ms)."""
    out = {k: (round(v.timestamp() * 1000) if hasattr(v, "timestamp") else v) for k, v in row.items()}
    return json.dumps(out, separators=(",", ":")).encode()


def decode_broker_row(kind: str, payload: bytes) -> dict[str, Any]:
    """The row in ``payload``, checked against its table's columns (:class:`BadMessage` says
    what is wrong); ``ts`` stays epoch ms."""
    import polars as pl

    if kind not in BROKER_KINDS:
        raise BadMessage("malformed", f"unknown broker data kind {kind!r}")
    row = decode_object(payload)
    schema = _broker_schema(kind)
    missing = [name for name in schema if name not in row]
    if missing:
        raise BadMessage("malformed", f"{kind} lacks {', '.join(missing)}")
    for name, dtype in schema.items():
        value = row[name]
        if value is None:
            if name in _BROKER_NULLABLE:
                continue
            raise BadMessage("malformed", f"{kind} {name} is null")
        if isinstance(dtype, pl.String):
            ok = isinstance(value, str)
        elif isinstance(dtype, pl.Float64):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        else:  # integers and the epoch-ms time
            ok = isinstance(value, int) and not isinstance(value, bool) and (value >= 0 or dtype == pl.Int8())
        if not ok:
            raise BadMessage("malformed", f"{kind} {name} is {value!r}")
    return {name: row[name] for name in schema}


def broker_frame(kind: str, rows: list[dict[str, Any]]) -> Any:
    """Decoded rows of one kind as the sampler's polars frame (the table's columns)."""
    import polars as pl

    schema = _broker_schema(kind)
    raw = {name: (pl.Int64() if name == "ts" else dtype) for name, dtype in schema.items()}
    return pl.DataFrame(rows, schema=raw, strict=False).cast(schema)  # type: ignore[arg-type]
