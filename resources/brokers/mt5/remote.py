"""The fake terminal in a process of its own, so its account outlives the runner.

A real MetaTrader 5 terminal keeps the account when the runner dies; the crash tests must
kill the runner and not the broker. :func:`serve` runs :class:`~resources.brokers.mt5.fake.FakeTerminal`
objects in a server process (``multiprocessing.managers``: each call is a request on a socket,
the results are the package's named tuples, pickled), and :func:`connect` hands back a proxy
with the package's functions, which :class:`~resources.brokers.mt5.broker.MT5Broker` drives
unchanged. Several named terminals can live in one server (a test's reference run and its
crashed run). Loopback only: the server trusts whoever knows its key.

    python -m resources.brokers.mt5.remote --port 18812          # a fake terminal server
    tradeforge live run ... --broker mt5 --mt5-fake 127.0.0.1:18812/demo
"""

from __future__ import annotations

import argparse
import inspect
import threading
from collections.abc import Callable
from multiprocessing.managers import BaseManager
from typing import Any

from resources.brokers.mt5.fake import FakeTerminal

AUTHKEY = b"tradeforge-fake-mt5"
#: Every public function of the fake (the package's API and the scenario controls).
EXPOSED = tuple(sorted(name for name, member in inspect.getmembers(FakeTerminal, inspect.isfunction)
                       if not name.startswith("_"))) + ("sent", "quote", "state")


class LockedTerminal:
    """One fake terminal behind a lock: the server answers each connection on its own thread."""

    def __init__(self, terminal: FakeTerminal) -> None:
        self._terminal = terminal
        self._lock = threading.Lock()

    def sent(self) -> list[tuple[str, int, str, float]]:
        """Every trade request received: (comment, action, symbol, volume), for tests to count."""
        with self._lock:
            return [(r.comment, r.action, r.symbol, r.volume) for name, r in self._terminal.calls if name == "order_send"]

    def quote(self, symbol: str) -> tuple[float, float, int]:
        with self._lock:
            q = self._terminal.quotes[symbol]
            return q.bid, q.ask, q.time_ms

    def state(self) -> dict[str, Any]:
        """The account as plain values: balance, positions by ticket, open orders, deals count."""
        with self._lock:
            t = self._terminal
            return {"balance": t.balance, "deals": len(t.deals),
                    "positions": {p.ticket: (p.symbol, p.type, p.volume, p.magic) for p in t.positions.values()},
                    "orders": {o.ticket: (o.symbol, o.type, o.volume_current, o.comment) for o in t.open_orders.values()}}


def _forward(name: str) -> Callable[..., Any]:
    def call(self: LockedTerminal, *args: Any, **kwargs: Any) -> Any:
        with self._lock:
            return getattr(self._terminal, name)(*args, **kwargs)

    call.__name__ = name
    return call


for _name in EXPOSED:
    if not hasattr(LockedTerminal, _name):
        setattr(LockedTerminal, _name, _forward(_name))

_TERMINALS: dict[str, LockedTerminal] = {}
_CREATE = threading.Lock()


def _terminal(name: str, settings: dict[str, Any] | None = None) -> LockedTerminal:
    """The server's terminal ``name``, created with ``settings`` (FakeTerminal's arguments) the first time."""
    with _CREATE:
        if name not in _TERMINALS:
            _TERMINALS[name] = LockedTerminal(FakeTerminal(**(settings or {})))
        return _TERMINALS[name]


class TerminalServer(BaseManager):
    """Serves named fake terminals (server side)."""


TerminalServer.register("terminal", callable=_terminal, exposed=EXPOSED)


class TerminalClient(BaseManager):
    """Connects to a :class:`TerminalServer` (client side)."""


TerminalClient.register("terminal", exposed=EXPOSED)


def serve(host: str = "127.0.0.1", port: int = 0) -> TerminalServer:
    """Start a server process (forked) and return its manager; ``manager.address`` is where it listens."""
    manager = TerminalServer(address=(host, port), authkey=AUTHKEY)
    manager.start()
    return manager


def parse_address(text: str) -> tuple[str, int, str]:
    """``host:port/name`` (name defaults to ``default``)."""
    where, _, name = text.partition("/")
    host, sep, port = where.rpartition(":")
    if not sep or not port.isdigit():
        raise ValueError(f"fake terminal address {text!r} is not HOST:PORT[/NAME]")
    return host or "127.0.0.1", int(port), name or "default"


def connect(address: str, settings: dict[str, Any] | None = None) -> Any:
    """A proxy of the named fake terminal at ``host:port/name``: the MetaTrader5 package's functions."""
    host, port, name = parse_address(address)
    client = TerminalClient(address=(host, port), authkey=AUTHKEY)
    try:
        client.connect()
    except OSError as exc:
        raise ConnectionError(f"no fake terminal server at {host}:{port} ({exc}): start one with "
                              f"python -m resources.brokers.mt5.remote --port {port}") from None
    return client.terminal(name, settings)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="serve fake MetaTrader 5 terminals on loopback")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18812)
    args = parser.parse_args(argv)
    server = TerminalServer(address=(args.host, args.port), authkey=AUTHKEY).get_server()
    print(f"fake MetaTrader 5 terminals on {args.host}:{args.port}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
