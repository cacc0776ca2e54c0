"""External data sources: FRED/ALFRED, Yahoo Finance, the economic calendar."""
