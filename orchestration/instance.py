"""The Dagster instance: SQLite under ``DAGSTER_HOME`` by default, Postgres when configured."""

from __future__ import annotations

import os
from pathlib import Path

from resources.warehouse import default_home

_MARKER = "# written by tradeforge from dagster.yaml; edit the repository's dagster.yaml instead\n"
_TEMPLATE = Path(__file__).resolve().parents[1] / "dagster.yaml"
POSTGRES_VARIABLES = ("DAGSTER_PG_HOST", "DAGSTER_PG_USER", "DAGSTER_PG_PASSWORD", "DAGSTER_PG_DB")


def dagster_home() -> Path:
    return Path(os.environ.get("DAGSTER_HOME") or default_home() / "dagster").resolve()


def postgres_storage_yaml() -> str:
    """A storage block that reads every connection setting from the environment at start-up,
    so no credential is ever written to disk."""
    port = "      port: {env: DAGSTER_PG_PORT}\n" if os.environ.get("DAGSTER_PG_PORT") else ""
    return (
        "storage:\n"
        "  postgres:\n"
        "    postgres_db:\n"
        "      hostname: {env: DAGSTER_PG_HOST}\n"
        "      username: {env: DAGSTER_PG_USER}\n"
        "      password: {env: DAGSTER_PG_PASSWORD}\n"
        "      db_name: {env: DAGSTER_PG_DB}\n"
        f"{port}"
        "      scheme: postgresql+psycopg2\n"
    )


def sqlite_event_log_yaml(home: Path) -> str:
    """The embedded instance's event log: Dagster's SQLite storage with kept connections and
    WAL commits (orchestration/storage.py), at Dagster's default place."""
    return (
        "event_log_storage:\n"
        "  module: orchestration.storage\n"
        "  class: FastSqliteEventLogStorage\n"
        "  config:\n"
        f"    base_dir: {home / 'history' / 'runs'}\n"
    )


def uses_postgres() -> bool:
    configured = [name for name in POSTGRES_VARIABLES if os.environ.get(name) is not None]
    if configured and len(configured) < len(POSTGRES_VARIABLES):
        missing = sorted(set(POSTGRES_VARIABLES) - set(configured))
        raise RuntimeError(f"Dagster on Postgres needs {', '.join(POSTGRES_VARIABLES)}; missing {', '.join(missing)}")
    return bool(configured)


def ensure_dagster_home() -> Path:
    """Create ``DAGSTER_HOME`` with this project's instance settings and export it.

    A ``dagster.yaml`` already there that tradeforge did not write is left alone: it is the
    operator's (a production deployment, say).
    """
    home = dagster_home()
    home.mkdir(parents=True, exist_ok=True)
    target = home / "dagster.yaml"
    if not target.exists() or target.read_text().startswith(_MARKER):
        text = _MARKER + _TEMPLATE.read_text()
        text += "\n" + (postgres_storage_yaml() if uses_postgres() else sqlite_event_log_yaml(home))
        target.write_text(text)
    os.environ["DAGSTER_HOME"] = str(home)
    return home
