"""A local WebSocket server that speaks Polygon's (Massive's) real-time wire format.

As ``socket.massive.com`` does: a market per path (``/forex``, ``/crypto``); on connect
``[{"ev":"status","status":"connected",...}]``; ``{"action":"auth","params":KEY}`` answered
with ``auth_success`` or ``auth_failed`` (then closed); ``{"action":"subscribe","params":
"C.EUR/USD,XT.BTC-USD"}`` answered with one ``success`` status per topic; events in JSON
arrays: forex quotes ``{"ev":"C","p":"EUR/USD","x":48,"a":ask,"b":bid,"t":ms}``, crypto trades
``{"ev":"XT","pair":"BTC-USD","p":price,"s":size,"t":ms,"c":[..],"i":"id","x":exchange,"r":ms}``.

The test drives it: :meth:`send_ticks` pushes a frame of ticks to the subscribers of the
symbol's topic (``batch`` events per message), :meth:`drop` cuts every connection the way a
network failure does (no close frame), and ``down`` refuses new connections with HTTP 503.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

import polars as pl
from websockets.asyncio.server import ServerConnection, serve

from models.market.instruments import AssetClass, instrument
from tests.stubs import stub_trade_id


def topic_of(symbol: str) -> str:
    base, quote = instrument(symbol).currencies
    if instrument(symbol).asset_class is AssetClass.CRYPTO:
        return f"XT.{base}-{quote}"
    return f"C.{base}/{quote}"


class PolygonWebSocketStub:
    def __init__(self, api_key: str = "test-key", batch: int = 25) -> None:
        self.api_key = api_key
        self.batch = batch
        self.down = False
        self.connections: dict[ServerConnection, tuple[str, set[str]]] = {}  # -> (market, topics)
        self.subscriptions: list[tuple[str, str]] = []  # (market, topic) in the order asked
        self.refused = 0
        self.server: Any = None
        self.url = ""

    async def start(self) -> PolygonWebSocketStub:
        self.server = await serve(self._handle, "127.0.0.1", 0, process_request=self._gate)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        self.server.close()
        await self.server.wait_closed()

    def _gate(self, connection: ServerConnection, request: Any) -> Any:
        if self.down:
            self.refused += 1
            return connection.respond(503, "Service Unavailable\n")
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        market = ws.request.path.strip("/")
        await ws.send(json.dumps([{"ev": "status", "status": "connected", "message": "Connected Successfully"}]))
        try:
            auth = json.loads(await ws.recv())
            if auth.get("action") != "auth" or auth.get("params") != self.api_key:
                await ws.send(json.dumps([{"ev": "status", "status": "auth_failed", "message": "authentication failed"}]))
                await ws.close()
                return
            await ws.send(json.dumps([{"ev": "status", "status": "auth_success", "message": "authenticated"}]))
            topics: set[str] = set()
            self.connections[ws] = (market, topics)
            async for raw in ws:
                request = json.loads(raw)
                params = [p.strip() for p in str(request.get("params", "")).split(",") if p.strip()]
                if request.get("action") == "subscribe":
                    topics.update(params)
                    self.subscriptions.extend((market, p) for p in params)
                    await ws.send(json.dumps([{"ev": "status", "status": "success", "message": f"subscribed to: {p}"}
                                              for p in params]))
                elif request.get("action") == "unsubscribe":
                    topics.difference_update(params)
        except Exception:  # the connection went away (a drop)
            pass
        finally:
            self.connections.pop(ws, None)

    def subscribed(self, topic: str) -> int:
        """How many open connections hold ``topic``."""
        return sum(topic in topics for _, topics in self.connections.values())

    @staticmethod
    def events(symbol: str, ticks: pl.DataFrame, first_row: int = 0) -> list[dict]:
        """Polygon's events for ``ticks`` (rows of TICK_SCHEMA); a crypto trade's exchange and id
        derive from its row in the symbol's whole tape, as in :class:`tests.stubs.PolygonStub`."""
        base, quote = instrument(symbol).currencies
        ms = ticks["ts"].dt.epoch("ms").to_list()
        if instrument(symbol).asset_class is AssetClass.CRYPTO:
            out = []
            for n, (t, p, s) in enumerate(zip(ms, ticks["price"].to_list(), ticks["size"].to_list(), strict=True)):
                exchange, trade_id = stub_trade_id(first_row + n)
                out.append({"ev": "XT", "pair": f"{base}-{quote}", "p": p, "s": s, "t": t, "c": [1], "i": trade_id,
                            "x": exchange, "r": t + 3})
            return out
        return [{"ev": "C", "p": f"{base}/{quote}", "x": 48, "a": a, "b": b, "t": t}
                for t, b, a in zip(ms, ticks["bid"].to_list(), ticks["ask"].to_list(), strict=True)]

    async def send_ticks(self, symbol: str, ticks: pl.DataFrame, first_row: int = 0) -> int:
        """Push ``ticks`` to every connection subscribed to the symbol's topic; returns how many
        connections got them."""
        topic = topic_of(symbol)
        events = self.events(symbol, ticks, first_row)
        targets = [ws for ws, (_, topics) in list(self.connections.items()) if topic in topics]
        for ws in targets:
            for i in range(0, len(events), self.batch):
                await ws.send(json.dumps(events[i : i + self.batch]))
        return len(targets)

    async def send_raw(self, market: str, payload: str) -> None:
        for ws, (m, _) in list(self.connections.items()):
            if m == market:
                await ws.send(payload)

    def drop(self) -> int:
        """Cut every connection without a close frame (the client sees code 1006)."""
        cut = 0
        for ws in list(self.connections):
            ws.transport.abort()
            cut += 1
        return cut

    async def wait_closed(self) -> None:
        while self.connections:
            await asyncio.sleep(0.005)
