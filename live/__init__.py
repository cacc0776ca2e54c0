"""The live runner daemon and live collector (no Dagster imports here); arrives with the live issue."""
