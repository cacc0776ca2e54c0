"""Runs the command line starts in-process: a range of days of one symbol as one Dagster run
(the assets' single-run backfill policy), and what a person needs to read from it."""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any

from dagster import AssetCheckSeverity, AssetsDefinition, DagsterInstance, materialize
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from assets.partitions import day_symbol_key


@dataclass(frozen=True)
class CheckOutcome:
    asset: str
    name: str
    passed: bool
    severity: str  # "ERROR" | "WARN"
    metadata: dict[str, Any]

    @property
    def label(self) -> str:
        return f"{self.asset}:{self.name}"


@dataclass
class RunReport:
    run_id: str
    success: bool
    metadata: dict[str, dict[str, Any]] = field(default_factory=dict)  # asset -> metadata values
    checks: list[CheckOutcome] = field(default_factory=list)
    failure: str | None = None  # the failing step and its reason

    @property
    def failed_checks(self) -> list[CheckOutcome]:
        return [c for c in self.checks if not c.passed and c.severity == "ERROR"]

    @property
    def warnings(self) -> list[CheckOutcome]:
        return [c for c in self.checks if not c.passed and c.severity == "WARN"]

    def value(self, asset: str, name: str, default: Any = 0) -> Any:
        return self.metadata.get(asset, {}).get(name, default)


def run_days(
    instance: DagsterInstance,
    resources: dict[str, Any],
    assets: Sequence[AssetsDefinition],
    symbol: str,
    first: date,
    last: date,
) -> RunReport:
    """Materialize ``assets`` for ``symbol`` over ``first..last`` as one run."""
    result = materialize(
        list(assets),
        instance=instance,
        resources=resources,
        tags={
            "tradeforge/source": "cli",
            ASSET_PARTITION_RANGE_START_TAG: str(day_symbol_key(first, symbol)),
            ASSET_PARTITION_RANGE_END_TAG: str(day_symbol_key(last, symbol)),
        },
        run_config={"loggers": {"console": {"config": {"log_level": "CRITICAL"}}}},
        raise_on_error=False,
    )
    report = RunReport(run_id=result.run_id, success=result.success)
    for event in result.get_asset_materialization_events():
        name = event.asset_key.to_user_string()
        if name not in report.metadata:  # a range run records the same metadata for every day
            report.metadata[name] = {k: v.value for k, v in event.materialization.metadata.items()}
    for evaluation in result.get_asset_check_evaluations():
        report.checks.append(CheckOutcome(
            asset=evaluation.asset_key.to_user_string(), name=evaluation.check_name, passed=evaluation.passed,
            severity="WARN" if evaluation.severity == AssetCheckSeverity.WARN else "ERROR",
            metadata={k: v.value for k, v in evaluation.metadata.items()},
        ))
    if not result.success:
        report.failure = failure_reason(result)
    return report


def failure_reason(result) -> str:
    """``step: reason`` of the first failed step: a Failure's description, or the innermost
    error message (the user's exception, not Dagster's wrapper)."""
    for event in result.all_events:
        if event.event_type_value != "STEP_FAILURE":
            continue
        data = event.event_specific_data
        user = getattr(data, "user_failure_data", None)
        if user is not None and user.description:
            return f"{event.step_key}: {user.description}"
        error = data.error
        while error is not None and error.cause is not None:
            error = error.cause
        message = (error.message if error is not None else "unknown error").strip().splitlines()[0]
        return f"{event.step_key}: {message}"
    return "the run did not succeed (no failed step recorded; see the run in the Dagster UI)"


class _ProgressPrinter(logging.Handler):
    """Prints the assets' progress lines (the ``tradeforge.progress`` logger) as they come."""

    def emit(self, record: logging.LogRecord) -> None:
        print(f"    {record.getMessage()}", file=sys.stdout, flush=True)


def show_progress() -> None:
    logger = logging.getLogger("tradeforge.progress")
    if not any(isinstance(h, _ProgressPrinter) for h in logger.handlers):
        logger.addHandler(_ProgressPrinter())
        logger.setLevel(logging.INFO)
        logger.propagate = False
