"""Training assets: `trained_model` (one partition per model spec) and `champion_model`.

`trained_model` trains a spec on its walk-forward purged folds (see assets/training_run.py),
logs the run and registers a version with alias `challenger`. Its checks: `purge_verified`
(no training label reaches its test fold; blocking), `label_balance` (warns on a rare
class) and `promotion_gate` (blocking: the challenger beats the champion, refitted on the
same folds, by the spec's margin, and the naive baselines). `champion_model` runs only when
the gate passed: it moves alias `champion` to the new version and records the promotion.
Specs are data (orchestration/model_specs.yaml): a new spec becomes a partition, no code.
"""


import logging
import math

from dagster import (
    AllPartitionMapping,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    AssetKey,
    AssetRecordsFilter,
    Config,
    DynamicPartitionsDefinition,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from assets.training_run import BASELINE_DEFAULT, TrainingOutcome, TrainingRun, promotion_row
from models.learning.datasets import Task
from models.learning.gate import GateDecision
from resources.bus.resource import BusResource
from resources.registry.resource import RegistryResource
from resources.registry.tracking import CHAMPION
from resources.training import TrainingResource
from resources.warehouse import WarehouseResource
from resources.warehouse.learning import write_promotion

MODEL_SPECS = DynamicPartitionsDefinition(name="model_specs")
MIN_CLASS_SHARE = 0.05
log = logging.getLogger("tradeforge.training")


class TrainConfig(Config):
    n_trials: int | None = Field(default=None, description="override the spec's search budget (trials)")


def _progress(context: AssetExecutionContext):
    def report(message: str) -> None:
        context.log.info(message)
        log.info(message)

    return report


def _table(rows: dict[str, dict[str, float]], metrics: tuple[str, ...]) -> str:
    head = "| candidate | " + " | ".join(metrics) + " |\n|---|" + "---|" * len(metrics) + "\n"
    body = "".join(
        f"| {name} | " + " | ".join("-" if math.isnan(v.get(m, math.nan)) else f"{v[m]:.5f}" for m in metrics) + " |\n"
        for name, v in rows.items()
    )
    return head + body


def _checks(outcome: TrainingOutcome) -> list[AssetCheckResult]:
    balance = outcome.label_balance
    shares = [*outcome.label_balance["overall"].values(), *(v for fold in balance["per_fold"] for v in fold.values())]
    rare = outcome.spec.task is not Task.REGRESSION and min(shares) < MIN_CLASS_SHARE
    gate = outcome.gate
    return [
        AssetCheckResult(
            check_name="purge_verified", passed=not outcome.purge_problems, severity=AssetCheckSeverity.ERROR,
            description="no training row's label window reaches its test fold (nor its embargo)",
            metadata={"problems": MetadataValue.json(outcome.purge_problems),
                      "purged_rows": sum(f.purged for f in outcome.folds),
                      "embargoed_rows": sum(f.embargoed for f in outcome.folds),
                      "smallest_gap_s": min(outcome.label_gaps_s) if outcome.label_gaps_s else 0.0,
                      "label_gaps_s": MetadataValue.json(outcome.label_gaps_s)},
        ),
        AssetCheckResult(
            check_name="label_balance", passed=not rare, severity=AssetCheckSeverity.WARN,
            description=f"every class holds at least {MIN_CLASS_SHARE:.0%} of the rows, overall and in each test fold",
            metadata={"overall": MetadataValue.json(balance["overall"]), "per_fold": MetadataValue.json(balance["per_fold"])},
        ),
        AssetCheckResult(
            check_name="promotion_gate", passed=gate.passed, severity=AssetCheckSeverity.ERROR,
            description=gate.reason,
            metadata={"decision": gate.decision, "metric": gate.metric, "challenger": _num(gate.challenger),
                      "champion": _num(gate.champion), "champion_version": gate.champion_version or "-",
                      "margin": gate.margin, "baselines": MetadataValue.json({k: _num(v) for k, v in gate.baselines.items()}),
                      "reasons": MetadataValue.json(gate.reasons),
                      **({"backtest": MetadataValue.json({k: _num(v) for k, v in gate.backtest.items()})} if gate.backtest else {})},
        ),
    ]


def _num(value: float | None) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


@asset(
    partitions_def=MODEL_SPECS,
    group_name="training",
    kinds={"mlflow", "clickhouse"},
    deps=[AssetDep("ml_features", partition_mapping=AllPartitionMapping())],
    check_specs=[
        AssetCheckSpec("purge_verified", asset="trained_model", blocking=True,
                       description="no training label overlaps its test fold (nor its embargo)"),
        AssetCheckSpec("label_balance", asset="trained_model", description="no class is too rare overall or in a test fold"),
        AssetCheckSpec("promotion_gate", asset="trained_model", blocking=True,
                       description="beats the champion (refitted on the same folds) by the margin, and the naive baselines"),
    ],
    description="A model spec trained on walk-forward purged folds, tracked in MLflow, registered as `challenger`.",
)
def trained_model(
    context: AssetExecutionContext, config: TrainConfig, warehouse: WarehouseResource, registry: RegistryResource,
    bus: BusResource, training: TrainingResource,
) -> MaterializeResult:
    spec = training.spec(context.partition_key)
    events = bus.training_events(log)
    try:
        outcome = TrainingRun(
            spec, warehouse, registry.get_client(), events, training.threads_for(spec), training.storage(),
            progress=_progress(context), dagster_run_id=context.run_id, n_trials=config.n_trials,
        ).run()
    except ValueError as exc:  # the data or the spec: retrying reads the same, so fail once, clearly
        raise Failure(description=str(exc), allow_retries=False) from exc
    finally:
        events.close()
    metrics = ("log_loss", "auc", "accuracy", "brier") if spec.task is not Task.REGRESSION else ("ic", "rank_ic", "icir", "rmse")
    per_fold = {f"fold {i}": m for i, m in enumerate(outcome.model.per_fold)}
    return MaterializeResult(
        metadata={
            "dagster/row_count": int(len(outcome.model.index)),
            "mlflow_run": MetadataValue.url(outcome.run_url),
            "registered_model": f"{outcome.model_name} v{outcome.model_version}",
            "model_version": int(outcome.model_version or 0),
            "registered_model_url": MetadataValue.url(outcome.model_url),
            "run_id": outcome.run_id,
            "family": spec.family,
            "metric": outcome.metric,
            outcome.metric: _num(outcome.value),
            f"baseline_{outcome.metric}": _num(outcome.comparison[BASELINE_DEFAULT][outcome.metric]),
            "beats_baseline": outcome.beats_default,
            "gate": outcome.gate.decision,
            "gate_reason": outcome.gate.reason,
            "comparison": MetadataValue.md(_table(outcome.comparison, metrics)),
            "comparison_values": MetadataValue.json({k: {m: _num(v) for m, v in c.items()} for k, c in outcome.comparison.items()}),
            "per_fold": MetadataValue.md(_table(per_fold, metrics)),
            "rows": outcome.dataset["rows"],
            "features": outcome.dataset["features"],
            "symbols": ", ".join(outcome.dataset["symbols"]),
            "data_range": f"{outcome.dataset['first_ts']} .. {outcome.dataset['last_ts']}",
            "feature_set": outcome.dataset["feature_set"],
            "fingerprint": outcome.fingerprint,
            "params": MetadataValue.json(outcome.params),
            "search_trials": (outcome.search.complete + outcome.search.pruned) if outcome.search else 0,
            "bus_events": events.published,
            "seconds": round(outcome.seconds, 2),
            "learner_share": round(outcome.learner_seconds / outcome.seconds, 3) if outcome.seconds else 0.0,
        },
        check_results=_checks(outcome),
    )


@asset(
    partitions_def=MODEL_SPECS,
    group_name="training",
    kinds={"mlflow"},
    deps=[trained_model],
    description="Alias `champion` on the spec's newest version, moved only after its promotion gate passed.",
)
def champion_model(
    context: AssetExecutionContext, warehouse: WarehouseResource, registry: RegistryResource, training: TrainingResource,
) -> MaterializeResult:
    spec = training.spec(context.partition_key)
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey("trained_model"), asset_partitions=[context.partition_key]), limit=1
    ).records
    if not records:
        raise Failure(description=f"trained_model has no materialization for {spec.name}: train it first", allow_retries=False)
    metadata = records[0].asset_materialization.metadata  # type: ignore[union-attr]
    version = str(metadata["model_version"].value)
    client = registry.get_client()
    name = spec.registered_model_name
    candidate = client.version(name, version)
    if candidate.tags.get("gate.decision") != "approved":
        raise Failure(description=f"{name} v{version} did not pass its promotion gate: {candidate.tags.get('gate.reason', '?')}",
                      allow_retries=False)
    current = client.alias(name, CHAMPION)
    compared_with = candidate.tags.get("gate.champion_version") or None
    if current is not None and current.version == version:
        context.log.info(f"{name} v{version} is already the champion")
        return MaterializeResult(metadata={"champion": f"{name} v{version}", "changed": False})
    if (current.version if current else None) != compared_with:
        raise Failure(
            description=f"the champion of {name} changed since the gate compared v{version} with "
            f"{'v' + compared_with if compared_with else 'no champion'} (now v{current.version if current else '-'}): retrain to compare again",
            allow_retries=False,
        )
    client.set_alias(name, CHAMPION, version)
    reason = f"promoted over {'v' + current.version if current else 'no champion'}: {candidate.tags.get('gate.reason', '')}"
    client.tag_version(name, version, {"promoted": "true", "promotion.reason": reason[:5000],
                                       "promotion.dagster_run_id": context.run_id})
    client.set_tags(candidate.run_id, {"tradeforge.promoted": "true", "tradeforge.promotion_reason": reason[:5000]})
    metric = candidate.tags.get("metric", spec.metric)
    gate = GateDecision(True, [reason], metric, float(candidate.tags.get(metric, "nan")), None, compared_with, spec.gate.margin)
    write_promotion(warehouse, promotion_row(name, int(version), candidate.run_id, gate, decision="promoted", reason=reason))
    context.log.info(f"{name}: alias {CHAMPION} -> v{version} ({reason})")
    return MaterializeResult(metadata={
        "champion": f"{name} v{version}", "previous": f"v{current.version}" if current else "-", "changed": True,
        "reason": reason, "registered_model_url": MetadataValue.url(client.model_url(name, version)),
    })
