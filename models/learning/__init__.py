"""Learning from `ml_features`: datasets, walk-forward purged folds, estimators behind one
interface (XGBoost, LightGBM, CatBoost and naive baselines), metrics, search and the
promotion gate. Pure computation: no Dagster, no I/O (callers hand in frames and studies)."""
