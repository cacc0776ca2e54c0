"""The ClickHouse warehouse: connection resource, schema migrations, market-data tables."""

from resources.warehouse.client import (
    TableWrite,
    Warehouse,
    WarehouseBusyError,
    WarehouseError,
    WarehouseResource,
    WarehouseSession,
    default_home,
    warehouse_from_env,
)

__all__ = [
    "TableWrite",
    "Warehouse",
    "WarehouseBusyError",
    "WarehouseError",
    "WarehouseResource",
    "WarehouseSession",
    "default_home",
    "warehouse_from_env",
]
