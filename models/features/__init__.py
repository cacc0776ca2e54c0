"""Features and labels: one registry, one engine for batch and live."""
