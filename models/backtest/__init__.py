"""Backtests on the trading engine: the event loop over history, metrics, Monte Carlo,
walk-forward optimisation and tearsheet figures. Pure: no I/O, no Dagster."""
