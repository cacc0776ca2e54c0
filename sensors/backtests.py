"""Backtests follow the registry: every new challenger is backtested out of sample.

`backtest_new_challengers` (on by default) asks MLflow, every minute, which version holds
alias `challenger` for each registered model the specs file trains; a version without a
`model_backtest` materialization becomes a partition (``NAME@VERSION``) and a run. Refused
challengers are backtested too: the numbers are what a trader reads next to the refusal.
"""

from dagster import (
    AddDynamicPartitionsRequest,
    AssetKey,
    AssetRecordsFilter,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    sensor,
)

from assets.model_backtests import MODEL_VERSIONS, model_backtest, version_key
from resources.registry.resource import RegistryResource
from resources.registry.tracking import CHALLENGER
from resources.training import TrainingResource

backtest_models = define_asset_job(
    "backtest_models",
    selection=[model_backtest],
    partitions_def=MODEL_VERSIONS,
    description="Backtest a registered model version walk-forward on its out-of-sample predictions.",
)


def _backtested(context: SensorEvaluationContext, key: str) -> bool:
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("model_backtest"), asset_partitions=[key]), limit=1
    ).records
    return bool(records)


@sensor(job=backtest_models, minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING)
def backtest_new_challengers(context: SensorEvaluationContext, registry: RegistryResource,
                             training: TrainingResource) -> SensorResult | SkipReason:
    client = registry.get_client()
    try:
        names = sorted({spec.registered_model_name for spec in training.specs().values()})
    except ValueError as exc:  # a broken specs file: say so on the tick, try again next minute
        return SkipReason(str(exc))
    known = set(context.instance.get_dynamic_partitions(MODEL_VERSIONS.name))
    new_keys, requests = [], []
    for name in names:
        challenger = client.alias(name, CHALLENGER)
        if challenger is None:
            continue
        key = version_key(name, challenger.version)
        if key not in known:
            new_keys.append(key)
        elif _backtested(context, key):
            continue
        requests.append(RunRequest(run_key=key, partition_key=key, tags={"tradeforge/trigger": "new_challenger"}))
    if not requests:
        return SkipReason(f"every challenger of {len(names)} registered model(s) is backtested")
    return SensorResult(run_requests=requests,
                        dynamic_partitions_requests=[AddDynamicPartitionsRequest(MODEL_VERSIONS.name, new_keys)] if new_keys else [])
