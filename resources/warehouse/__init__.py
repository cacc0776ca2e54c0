"""The ClickHouse warehouse: connection resource, schema migrations, market-data tables."""

from resources.warehouse.client import (
    WarehouseBusyError,
    WarehouseError,
    WarehouseResource,
    default_home,
    warehouse_from_env,
)

__all__ = ["WarehouseBusyError", "WarehouseError", "WarehouseResource", "default_home", "warehouse_from_env"]
