"""ConfigurableResources for everything outside the process; usable without Dagster."""
