"""The trading engine shared by backtests and the live runner: strategy -> risk -> orders ->
broker port -> fills -> portfolio (see engine.py). Pure: no I/O, no Dagster."""
