"""The user's broker against the data vendor and the system: pure computations over the
broker data tables (quotes, deals) and the research tables (aggregates, model_predictions)."""
