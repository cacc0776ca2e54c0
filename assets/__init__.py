"""Software-defined assets: read inputs -> call models/ -> write -> metadata and checks."""

import warnings

from dagster import BetaWarning

# Deliberate uses of Dagster's beta API (single-run backfill policies, partition mappings):
# their warnings would only clutter every command and code-server start.
warnings.filterwarnings("ignore", category=BetaWarning)
