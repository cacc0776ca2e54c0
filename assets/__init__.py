"""Software-defined assets: read inputs, call models/, write, report metadata and checks."""
