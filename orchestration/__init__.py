"""The Dagster code location and the tradeforge command line: wiring only."""
