"""Retraining: when new features land (a sensor) and on a schedule.

`sync_model_specs` (on by default, cheap) keeps the `model_specs` partitions in step with
the specs file: a spec added there appears in Dagster within a minute, no code, no reload.
`retrain_on_new_features`, when `ml_features` partitions were materialized since its last
tick, requests one training run per spec whose universe holds one of their symbols, at most
one per spec per tick. The weekly schedule retrains every spec.
"""


from dagster import (
    AddDynamicPartitionsRequest,
    AssetKey,
    AssetRecordsFilter,
    DefaultScheduleStatus,
    DefaultSensorStatus,
    RunRequest,
    ScheduleEvaluationContext,
    SensorEvaluationContext,
    SensorResult,
    SkipReason,
    define_asset_job,
    schedule,
    sensor,
)

from assets.training import MODEL_SPECS, champion_model, trained_model
from resources.training import TrainingResource

train_models = define_asset_job(
    "train_models",
    selection=[trained_model, champion_model],
    partitions_def=MODEL_SPECS,
    description="Train a model spec, gate it, and promote it to champion when the gate passes.",
)

_BATCH = 1000


def _symbol_of(partition_key: str | None) -> str | None:
    """The symbol of an `ml_features` partition key ("2024-03-04|EURUSD": day|symbol)."""
    if not partition_key or "|" not in partition_key:
        return None
    return partition_key.split("|")[1]


def _add_new_specs(context: SensorEvaluationContext, training: TrainingResource) -> list[AddDynamicPartitionsRequest]:
    new = sorted(set(training.specs()) - set(context.instance.get_dynamic_partitions(MODEL_SPECS.name)))
    return [AddDynamicPartitionsRequest(MODEL_SPECS.name, new)] if new else []


@sensor(minimum_interval_seconds=60, default_status=DefaultSensorStatus.RUNNING)
def sync_model_specs(context: SensorEvaluationContext, training: TrainingResource) -> SensorResult | SkipReason:
    requests = _add_new_specs(context, training)
    if not requests:
        return SkipReason("every spec in the specs file is a partition")
    return SensorResult(dynamic_partitions_requests=requests)


@sensor(job=train_models, minimum_interval_seconds=1800, default_status=DefaultSensorStatus.STOPPED)
def retrain_on_new_features(context: SensorEvaluationContext, training: TrainingResource) -> SensorResult:
    specs = training.specs()
    new_specs = _add_new_specs(context, training)  # a spec added since the last sync can train at once
    after = int(context.cursor) if context.cursor else None
    symbols: set[str] = set()
    last = after
    if after is None:  # the first tick only remembers where the history ends: no retrain of all of it
        newest = context.instance.fetch_materializations(AssetKey("ml_features"), limit=1).records
        return SensorResult(
            cursor=str(newest[0].storage_id if newest else 0),
            dynamic_partitions_requests=new_specs,
        )
    while True:
        records = context.instance.fetch_materializations(
            AssetRecordsFilter(asset_key=AssetKey("ml_features"), after_storage_id=last), limit=_BATCH, ascending=True
        ).records
        for record in records:
            symbol = _symbol_of(record.partition_key)
            if symbol:
                symbols.add(symbol)
            last = record.storage_id
        if len(records) < _BATCH:
            break
    requests = []
    if symbols:
        for name, spec in sorted(specs.items()):
            if symbols & set(spec.symbols):
                requests.append(RunRequest(run_key=f"{name}:{last}", partition_key=name,
                                           tags={"tradeforge/trigger": "new_features"}))
    return SensorResult(
        run_requests=requests,
        cursor=str(last if last is not None else 0),
        dynamic_partitions_requests=new_specs,
    )


@schedule(cron_schedule="0 3 * * 6", job=train_models, execution_timezone="UTC", default_status=DefaultScheduleStatus.STOPPED)
def weekly_retrain(context: ScheduleEvaluationContext, training: TrainingResource):
    """Saturday 03:00 UTC, with FX closed: every spec that is a partition."""
    known = set(context.instance.get_dynamic_partitions(MODEL_SPECS.name))
    week = context.scheduled_execution_time.date().isoformat()
    for name in sorted(set(training.specs()) & known):
        yield RunRequest(run_key=f"{week}|{name}", partition_key=name, tags={"tradeforge/trigger": "schedule"})
