"""The user's broker data, read from the terminal as polars frames: account snapshots, the
broker's quotes, the account's deals (every deal: by hand, by other programs, ours).

Plain (no Dagster): the live runner samples with it and publishes the frames on the bus; a
sensor drains them into ``broker_account``, ``broker_quotes`` and ``broker_trades``
(:mod:`resources.warehouse.broker`), which :func:`store_sample` also does directly. Times
are UTC (the server's clock minus its offset), columns are the tables'.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Sequence
from typing import Any

import polars as pl

from resources.brokers.mt5 import constants as C

ACCOUNT_SCHEMA = {"login": pl.UInt64(), "server": pl.String(), "ts": pl.Datetime("ms", "UTC"), "currency": pl.String(),
                  "balance": pl.Float64(), "equity": pl.Float64(), "margin": pl.Float64(), "margin_free": pl.Float64(),
                  "margin_level": pl.Float64(), "profit": pl.Float64(), "leverage": pl.UInt32()}
QUOTE_SCHEMA = {"server": pl.String(), "symbol": pl.String(), "ts": pl.Datetime("ms", "UTC"), "bid": pl.Float64(),
                "ask": pl.Float64()}
TRADE_SCHEMA = {"login": pl.UInt64(), "server": pl.String(), "deal": pl.UInt64(), "order_ticket": pl.UInt64(),
                "position_id": pl.UInt64(), "ts": pl.Datetime("ms", "UTC"), "symbol": pl.String(), "side": pl.Int8(),
                "entry": pl.String(), "volume": pl.Float64(), "units": pl.Float64(), "price": pl.Float64(),
                "commission": pl.Float64(), "swap": pl.Float64(), "fee": pl.Float64(), "profit": pl.Float64(),
                "magic": pl.UInt64(), "reason": pl.String(), "comment": pl.String(), "client_id": pl.String()}
_ENTRY = {C.DEAL_ENTRY_IN: "in", C.DEAL_ENTRY_OUT: "out", C.DEAL_ENTRY_INOUT: "inout", C.DEAL_ENTRY_OUT_BY: "out_by"}
_REASON = {C.DEAL_REASON_CLIENT: "client", C.DEAL_REASON_MOBILE: "mobile", C.DEAL_REASON_WEB: "web",
           C.DEAL_REASON_EXPERT: "expert", C.DEAL_REASON_SL: "sl", C.DEAL_REASON_TP: "tp", C.DEAL_REASON_SO: "so",
           C.DEAL_REASON_ROLLOVER: "rollover", C.DEAL_REASON_VMARGIN: "vmargin", C.DEAL_REASON_SPLIT: "split"}
_CLIENT_ID = re.compile(r"^tf[0-9a-f]{16}$")


class SamplerError(RuntimeError):
    """The terminal did not answer; the message says which call."""


class BrokerDataSampler:
    """Reads the account, quotes and deals from an ``mt5`` module object (the real package or
    the fake). ``magics``: our strategies' magic numbers, to mark our deals with their client id."""

    def __init__(self, mt5: Any, symbols: Sequence[str], *, server_utc_offset_s: int = 0,
                 magics: Sequence[int] = (), clock: Callable[[], float] = time.time) -> None:
        self.mt5 = mt5
        self.symbols = tuple(symbols)
        self.offset_ms = server_utc_offset_s * 1000
        self.magics = frozenset(magics)
        self.clock = clock
        self._last_tick: dict[str, int] = {}
        self._deals_from = 0  # server seconds
        self._contracts: dict[str, float] = {}

    def _call(self, name: str, *args: Any, **kwargs: Any) -> Any:
        value = getattr(self.mt5, name)(*args, **kwargs)
        if value is None:
            code, text = self.mt5.last_error()
            raise SamplerError(f"{name} got no answer from the terminal: {text} ({code})")
        return value

    def account(self) -> pl.DataFrame:
        """One snapshot: balance, equity, margin, free margin, margin level (null without margin)."""
        a = self._call("account_info")
        row = {"login": a.login, "server": a.server, "ts": int(self.clock() * 1000), "currency": a.currency,
               "balance": a.balance, "equity": a.equity, "margin": a.margin, "margin_free": a.margin_free,
               "margin_level": a.margin_level if a.margin > 0 else None, "profit": a.profit, "leverage": a.leverage}
        return pl.DataFrame([row], schema=ACCOUNT_SCHEMA)

    def quotes(self) -> pl.DataFrame:
        """The latest quote of each symbol, once per tick (a quote already sampled is skipped)."""
        server = self._call("account_info").server
        rows = []
        for symbol in self.symbols:
            tick = self._call("symbol_info_tick", symbol)
            if tick.time_msc == self._last_tick.get(symbol) or not tick.bid or not tick.ask:
                continue
            self._last_tick[symbol] = tick.time_msc
            rows.append({"server": server, "symbol": symbol, "ts": tick.time_msc - self.offset_ms, "bid": tick.bid,
                         "ask": tick.ask})
        return pl.DataFrame(rows, schema=QUOTE_SCHEMA)

    def deals(self, since_ms: int | None = None) -> pl.DataFrame:
        """The account's trades (buy and sell deals) since ``since_ms`` (UTC), or since the last
        call (overlapping by an hour: the tables keep one row per deal)."""
        account = self._call("account_info")
        now = int(self.clock()) + self.offset_ms // 1000
        start = (since_ms + self.offset_ms) // 1000 if since_ms is not None else (self._deals_from or now - 86_400)
        deals = self._call("history_deals_get", start, now + 2 * 86_400)
        rows = []
        for d in deals:
            if d.type not in (C.DEAL_TYPE_BUY, C.DEAL_TYPE_SELL):
                continue
            ours = d.magic in self.magics and _CLIENT_ID.match(d.comment or "")
            rows.append({"login": account.login, "server": account.server, "deal": d.ticket, "order_ticket": d.order,
                         "position_id": d.position_id, "ts": d.time_msc - self.offset_ms, "symbol": d.symbol,
                         "side": 1 if d.type == C.DEAL_TYPE_BUY else -1, "entry": _ENTRY.get(d.entry, str(d.entry)),
                         "volume": d.volume, "units": d.volume * self._contract(d.symbol), "price": d.price,
                         "commission": d.commission, "swap": d.swap, "fee": d.fee, "profit": d.profit, "magic": d.magic,
                         "reason": _REASON.get(d.reason, str(d.reason)), "comment": d.comment,
                         "client_id": d.comment if ours else None})
        newest = max((d.time for d in deals), default=start)
        self._deals_from = max(self._deals_from, newest - 3600)
        return pl.DataFrame(rows, schema=TRADE_SCHEMA).sort("ts", "deal")

    def _contract(self, symbol: str) -> float:
        if symbol not in self._contracts:
            self._contracts[symbol] = self._call("symbol_info", symbol).trade_contract_size
        return self._contracts[symbol]
