"""Engines for the training tests: a real nats-server (JetStream) on its own port, stopped
afterwards, and empty MLflow stores."""

from __future__ import annotations

import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from resources.bus import EmbeddedNatsServer


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def dead_url() -> str:
    """A loopback URL where nothing listens: the unreachable bus."""
    return f"nats://127.0.0.1:{free_port()}"


@pytest.fixture(scope="module")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedNatsServer]:
    server = EmbeddedNatsServer(Path(tmp_path_factory.mktemp("nats")), port=free_port())
    server.start(detach=False)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats(tmp_path: Path) -> Iterator[EmbeddedNatsServer]:
    """A nats-server of the test's own (a fresh JetStream store), stopped afterwards."""
    server = EmbeddedNatsServer(tmp_path / "nats", port=free_port())
    server.start(detach=False)
    try:
        yield server
    finally:
        server.stop()


_TEMPLATE: list[Path] = []


def fresh_mlflow_store(directory: Path) -> str:
    """A new, empty MLflow SQLite store in ``directory``. Creating MLflow's schema costs
    seconds of SQLite commits; after the first, a copy of an empty store is as good."""
    import shutil

    from resources.registry import ModelRegistry

    directory.mkdir(parents=True, exist_ok=True)
    target = directory / "mlflow.db"
    if not _TEMPLATE:
        template = Path(tempfile.mkdtemp(prefix="mlflow-template-")) / "mlflow.db"
        ModelRegistry(f"sqlite:///{template}").client.search_experiments()
        _TEMPLATE.append(template)
    shutil.copyfile(_TEMPLATE[0], target)
    return f"sqlite:///{target}"
