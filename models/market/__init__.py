"""Market data concepts: timeframes, sessions, instruments, ticks, candles, quality, the synthetic market."""
