"""The ClickHouse warehouse: connection, schema migrations, market-data tables.

Importing the package (or its table modules) does not import Dagster: the plain connection
is :mod:`resources.warehouse.connection`; the Dagster resource (``WarehouseResource``,
``warehouse_from_env``) loads on first use of those names.
"""

from typing import Any

from resources.warehouse.connection import (
    TableWrite,
    Warehouse,
    WarehouseBusyError,
    WarehouseClient,
    WarehouseError,
    WarehouseSession,
    default_home,
)

_DAGSTER_NAMES = ("WarehouseResource", "warehouse_from_env")


def __getattr__(name: str) -> Any:
    if name in _DAGSTER_NAMES:
        from resources.warehouse import client

        return getattr(client, name)
    raise AttributeError(f"module 'resources.warehouse' has no attribute {name!r}")


__all__ = [
    "TableWrite",
    "Warehouse",
    "WarehouseBusyError",
    "WarehouseClient",
    "WarehouseError",
    "WarehouseResource",
    "WarehouseSession",
    "default_home",
    "warehouse_from_env",
]
