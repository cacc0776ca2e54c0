"""The resources of the code location, configured from the environment (see README)."""

from __future__ import annotations

import os
from typing import Any

from dagster import EnvVar

from resources.conventions import MarketConventionsResource
from resources.market_data import SyntheticMarketResource
from resources.warehouse import warehouse_from_env


def resources_from_env() -> dict[str, Any]:
    """Embedded defaults unless the environment names production services."""
    seed: Any = EnvVar.int("TRADEFORGE_SYNTHETIC_SEED") if os.environ.get("TRADEFORGE_SYNTHETIC_SEED") else 7
    return {
        "warehouse": warehouse_from_env(),
        "market_data": SyntheticMarketResource(seed=seed),
        "conventions": MarketConventionsResource(day_boundary=os.environ.get("TRADEFORGE_DAY_BOUNDARY", "utc")),
    }
