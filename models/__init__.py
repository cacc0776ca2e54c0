"""Pure computation: candles, sessions, instruments, synthetic market, tick validation. No I/O, no Dagster."""
