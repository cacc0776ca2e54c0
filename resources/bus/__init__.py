"""The message bus (NATS): plain client classes, importable without Dagster; the Dagster
resource lives in ``resources.bus.resource``."""

from resources.bus.client import (
    TRAINING_STREAM,
    BlockingBus,
    BusError,
    EmbeddedNatsServer,
    EventPublisher,
    NatsBus,
    StreamSpec,
    decode,
    nats_server_binary,
)

__all__ = [
    "TRAINING_STREAM", "BlockingBus", "BusError", "EmbeddedNatsServer", "EventPublisher", "NatsBus", "StreamSpec",
    "decode", "nats_server_binary",
]
