"""The Dagster resource over the bus client (kept apart so the client imports without Dagster)."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable
from typing import TypeVar

from dagster import ConfigurableResource, EnvVar
from pydantic import Field

from resources.bus.client import (
    BACKTEST_STREAM,
    DEFAULT_PORT,
    TRAINING_STREAM,
    BlockingBus,
    BusError,
    EventPublisher,
    NatsBus,
    StreamSpec,
)

T = TypeVar("T")


class BusResource(ConfigurableResource):
    """NATS: ``url`` (``NATS_URL``) selects a server or cluster; unset, a local nats-server
    with JetStream under ``$TRADEFORGE_HOME/nats`` is started on demand."""

    url: str | None = Field(default=None, description="nats://host:4222 (several: comma-separated); unset: embedded")
    store_dir: str | None = Field(default=None, description="JetStream folder of the embedded server")
    embedded_port: int = Field(default=DEFAULT_PORT, description="port of the embedded server on 127.0.0.1")
    connect_timeout_s: float = Field(default=2.0, gt=0)

    def get_client(self) -> NatsBus:
        return NatsBus(self.url or None, self.store_dir, self.connect_timeout_s, embedded_port=self.embedded_port)

    def blocking(self) -> BlockingBus:
        return BlockingBus(self.get_client())

    def training_events(self, logger: logging.Logger | None = None) -> EventPublisher:
        """Publisher of ``training.*`` events; never raises."""
        return EventPublisher(self.blocking, TRAINING_STREAM, logger)

    def backtest_events(self, logger: logging.Logger | None = None) -> EventPublisher:
        """Publisher of ``backtest.*`` events; never raises."""
        return EventPublisher(self.blocking, BACKTEST_STREAM, logger)

    def drain(self, run: Callable[[NatsBus], Awaitable[T]]) -> T | str:
        """``run(client)`` to completion, for the sensors that drain a stream; a string says why it
        did not run: no bus to drain (the embedded server is not running: starting one would drain
        nothing) or the bus unreachable."""
        client = self.get_client()
        if (absent := _not_running(client, "to drain")) is not None:
            return absent
        try:
            return asyncio.run(run(client))
        except BusError as exc:
            return f"bus unreachable: {exc}"

    def publish_if_running(self, stream: StreamSpec, subject: str, payload: bytes, msg_id: str) -> str:
        """Publish one message on a bus that is up, for whoever listens (a live runner); never
        starts the embedded server. Says what happened: published, already published (the same
        ``msg_id`` within the duplicate window), or that there is no bus (the embedded server not
        running: nobody listens). A bus that is there but does not answer (``NATS_URL`` down, a
        restart) raises :class:`BusError`, for the caller to retry; a refusal (a payload over the
        server's limit) raises as it is: it would be refused again."""
        from nats.errors import ConnectionClosedError, NoRespondersError, NoServersError

        client = self.get_client()
        if (absent := _not_running(client, "to publish on")) is not None:
            return absent
        bus = BlockingBus(client)
        try:
            bus.connect()
            bus.ensure_stream(stream)
            return "published" if bus.publish_durable(subject, payload, msg_id) else "already published"
        except (BusError, TimeoutError, OSError, ConnectionClosedError, NoRespondersError, NoServersError) as exc:
            raise BusError(f"bus unreachable: {exc or type(exc).__name__}") from exc
        finally:
            bus.close()


def _not_running(client: NatsBus, what: str) -> str | None:
    """Why there is no bus ``what`` (the embedded server not running), or None."""
    if client.embedded is not None and not client.embedded.running():
        return f"no bus {what}: NATS_URL is unset and the embedded nats-server on {client.embedded.url} is not running"
    return None


def bus_from_env() -> BusResource:
    """``NATS_URL`` stays an ``EnvVar`` (it may carry a token or credentials)."""
    return BusResource(url=EnvVar("NATS_URL")) if os.environ.get("NATS_URL") else BusResource()
