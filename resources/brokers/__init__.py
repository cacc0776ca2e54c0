"""Brokers behind the trading engine's port (:mod:`models.trading.broker`): MetaTrader 5 in
:mod:`resources.brokers.mt5`. Plain classes, no Dagster: the live runner imports them."""
