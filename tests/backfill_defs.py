"""The market assets as a code location for the backfill test: the same assets and checks as
orchestration.definitions, with the test's warehouse and a small synthetic market (the
test sets TF_TEST_WAREHOUSE and TF_TEST_DATABASE before the location loads)."""

import os

from dagster import Definitions

from assets.features import ml_features
from assets.market_data import aggregates, market_ticks, vendor_candles
from resources.conventions import MarketConventionsResource
from resources.market_data import MarketDataResource, SyntheticMarketResource
from resources.warehouse import WarehouseResource

defs = Definitions(
    assets=[market_ticks, vendor_candles, aggregates, ml_features],
    resources={
        "warehouse": WarehouseResource(embedded_path=os.environ["TF_TEST_WAREHOUSE"], database=os.environ["TF_TEST_DATABASE"]),
        "market_data": MarketDataResource(synthetic=SyntheticMarketResource(seed=7, tick_rate_scale=0.1)),
        "conventions": MarketConventionsResource(feature_timeframes=["M5"]),
    },
)
