"""One training of a model spec, end to end: dataset -> folds -> (search) -> out-of-fold
predictions of the model, the baselines and the current champion on the same folds -> the
gate's decision -> the model fitted on every row -> MLflow (run, model, version with alias
`challenger`) -> ClickHouse (predictions, folds, run, metrics, decision) -> bus events.

Composes resources and models/; no Dagster here, so the asset and anything else drive the
same code. Progress goes to a callback (the asset sends it to Dagster's log) and to the bus
as ``training.progress.{run_id}``.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import polars as pl

from models.features.registry import feature_set_version
from models.learning.datasets import Dataset, Task, build_dataset, epoch_ms_to_datetime
from models.learning.estimators import LearnerSettings, make_estimator, probabilities_by_side, signed_prediction
from models.learning.evaluation import CVResult, cross_validate
from models.learning.folds import Fold, label_gaps_ms, purge_violations, walk_forward
from models.learning.gate import GateDecision, decide
from models.learning.metrics import is_better
from models.learning.plots import training_figures
from models.learning.search import SearchResult, new_sampler_and_pruner, run_search
from models.learning.specs import ModelSpec
from resources.bus.client import EventPublisher
from resources.bus.subjects import training as training_subject
from resources.registry.tracking import CHALLENGER, CHAMPION, RECIPE_ARTIFACT, ModelRegistry, code_version
from resources.warehouse.client import WarehouseResource
from resources.warehouse.learning import feature_sets, read_training_rows, write_promotion, write_run, write_training

Progress = Callable[[str], None]
BASELINE_DEFAULT = "lightgbm_default"  # LightGBM with the library's defaults: the bar every model is held to


@dataclass(frozen=True)
class Candidate:
    """Something scored on the folds: the model, a baseline, or the refitted champion."""

    name: str
    family: str
    params: dict[str, Any] = field(default_factory=dict)
    inputs: str = "features"
    seed: int | None = None


@dataclass
class TrainingOutcome:
    spec: ModelSpec
    run_id: str
    model_name: str
    model_version: str | None
    run_url: str
    model_url: str
    dataset: dict[str, Any]
    fingerprint: str
    folds: list[Fold]
    purge_problems: list[str]
    label_gaps_s: list[float]
    label_balance: dict[str, Any]
    metric: str
    params: dict[str, Any]
    model: CVResult
    comparison: dict[str, dict[str, float]]  # candidate -> mean out-of-fold metrics
    beats_default: bool
    gate: GateDecision
    search: SearchResult | None
    seconds: float
    learner_seconds: float

    @property
    def value(self) -> float:
        return self.model.mean[self.metric]


def resolve_feature_set(spec: ModelSpec) -> str:
    return feature_set_version() if spec.feature_set == "current" else spec.feature_set


class TrainingRun:
    """Train ``spec`` once. ``run()`` returns the outcome or raises with the reason (the
    MLflow run, the ``training_runs`` row and the bus then say it failed)."""

    def __init__(
        self,
        spec: ModelSpec,
        warehouse: WarehouseResource,
        registry: ModelRegistry,
        events: EventPublisher,
        threads: int,
        optuna_storage: str,
        progress: Progress = lambda message: None,
        dagster_run_id: str = "",
        n_trials: int | None = None,
    ) -> None:
        self.spec, self.warehouse, self.registry, self.events = spec, warehouse, registry, events
        self.settings = LearnerSettings(seed=spec.seed, n_jobs=threads, device=spec.device)
        self.optuna_storage = optuna_storage
        self._progress = progress
        self.dagster_run_id = dagster_run_id
        self.n_trials = n_trials
        self.run_id = ""
        self.dataset: Dataset | None = None
        self._sequence = 0

    # -- reporting -------------------------------------------------------------------------
    def progress(self, message: str, **event: Any) -> None:
        self._progress(message)
        if self.run_id:
            self._sequence += 1
            self.events.publish(
                training_subject("progress", self.run_id),
                {"run_id": self.run_id, "spec": self.spec.name, "message": message, **event},
                msg_id=f"{self.run_id}.progress.{self._sequence}",
            )

    def _event(self, kind: str, payload: dict[str, Any]) -> None:
        self.events.publish(training_subject(kind, self.run_id), {"run_id": self.run_id, "spec": self.spec.name, **payload},
                            msg_id=f"{self.run_id}.{kind}")

    # -- the steps -------------------------------------------------------------------------
    def run(self) -> TrainingOutcome:
        spec = self.spec
        started_at = datetime.now(UTC)
        started = time.perf_counter()
        feature_set = resolve_feature_set(spec)
        self.run_id = self.registry.start_run(
            spec.registered_model_name, f"{spec.name} {started_at:%Y-%m-%d %H:%M:%S}",
            tags={"tradeforge.spec": spec.name, "tradeforge.family": spec.family, "tradeforge.target": spec.target,
                  "tradeforge.timeframe": spec.timeframe.value, "tradeforge.universe": spec.universe,
                  "tradeforge.feature_set": feature_set, "tradeforge.code_version": code_version(),
                  "tradeforge.dagster_run_id": self.dagster_run_id, "mlflow.note.content": spec.description},
        )
        self._event("started", {"model_name": spec.registered_model_name, "family": spec.family, "target": spec.target,
                                "symbols": spec.symbols, "timeframe": spec.timeframe.value, "feature_set": feature_set})
        try:
            outcome = self._train(feature_set, started_at, started)
        except Exception as exc:
            self._fail(exc, feature_set, started_at, started)
            raise
        self._event("completed", {"model_name": outcome.model_name, "model_version": outcome.model_version,
                                  "metric": outcome.metric, "value": outcome.value, "gate": outcome.gate.decision,
                                  "reason": outcome.gate.reason, "seconds": round(outcome.seconds, 3)})
        return outcome

    def _fail(self, exc: Exception, feature_set: str, started_at: datetime, started: float) -> None:
        error = f"{type(exc).__name__}: {exc}"
        try:
            self.registry.set_tags(self.run_id, {"tradeforge.error": error[:5000]})
            self.registry.finish_run(self.run_id, failed=True)
        except Exception:  # the registry itself may be what failed
            pass
        try:
            write_run(self.warehouse, self._run_row(None, feature_set, started_at, started, status="failed", error=error))
        except Exception:
            pass
        self._event("failed", {"error": error})

    def _load(self, feature_set: str) -> Dataset:
        spec = self.spec
        rows = read_training_rows(self.warehouse, spec.symbols, spec.timeframe.value, feature_set, spec.target,
                                  spec.start, spec.end, spec.features)
        if rows.is_empty():
            present = feature_sets(self.warehouse, spec.symbols, spec.timeframe.value)
            held = ", ".join(f"{fs} ({warm:,} warm rows)" for fs, _, warm, _ in present.iter_rows()) or "nothing"
            raise ValueError(
                f"no warm {spec.timeframe.value} rows with a {spec.target} label for {', '.join(spec.symbols)} in feature set "
                f"{feature_set}{self._range_text()}; ml_features holds {held} for them"
            )
        return build_dataset(rows, spec.target, feature_set, spec.features, spec.exclude_features)

    def _range_text(self) -> str:
        if not (self.spec.start or self.spec.end):
            return ""
        return f" between {self.spec.start or '...'} and {self.spec.end or '...'}"

    def _train(self, feature_set: str, started_at: datetime, started: float) -> TrainingOutcome:
        spec = self.spec
        self.dataset = dataset = self._load(feature_set)
        info = dataset.info
        self.progress(
            f"dataset: {dataset.n_rows:,} rows x {len(dataset.feature_names)} features, {', '.join(info['symbols'])} "
            f"{spec.timeframe.value}, {info['first_ts'][:16]} .. {info['last_ts'][:16]}, feature set {feature_set}, "
            f"fingerprint {dataset.fingerprint[:12]}",
            stage="dataset", rows=dataset.n_rows,
        )
        config = spec.folds.config()
        folds = walk_forward(dataset.close_ms, dataset.target.horizon, config)
        problems = purge_violations(dataset.close_ms, folds, dataset.target.horizon, config.embargo)
        gaps = [g / 1000 for g in label_gaps_ms(dataset.close_ms, folds, dataset.target.horizon)]
        self.progress(
            f"folds: {len(folds)} {config.scheme.value}, test rows {', '.join(str(f.test_rows) for f in folds)}, "
            f"purged {sum(f.purged for f in folds):,}, embargoed {sum(f.embargoed for f in folds):,} "
            f"(horizon {dataset.target.horizon}, embargo {config.embargo}): "
            + ("purge verified" if not problems else "PURGE VIOLATED: " + "; ".join(problems)),
            stage="folds",
        )
        search = None
        params = dict(spec.params)
        if spec.search is not None:
            search = self._search(dataset, folds)
            params = search.best_params
        model = self._cv(Candidate("model", spec.family, params), dataset, folds, announce=True)
        comparison = {"model": model.mean}
        results = {"model": model}
        for candidate in (Candidate("majority", "majority"), Candidate("previous_direction", "previous_direction", inputs="previous_return"),
                          Candidate(BASELINE_DEFAULT, "lightgbm")):
            if candidate.name == BASELINE_DEFAULT and spec.family == "lightgbm" and not params:
                result = model  # the model is LightGBM with defaults: the same fit
            else:
                result = self._cv(candidate, dataset, folds)
            results[candidate.name] = result
            comparison[candidate.name] = result.mean
            self.progress(f"baseline {candidate.name}: {self._fmt(result.mean)}", stage="baseline", candidate=candidate.name,
                          metrics=result.mean)
        champion = self.registry.alias(spec.registered_model_name, CHAMPION)
        champion_value = None
        notes: list[str] = []
        if champion is not None:
            refit = self._refit_champion(champion, dataset, folds, notes)
            if refit is not None:
                results["champion"] = refit
                comparison["champion"] = refit.mean
                champion_value = refit.mean[spec.metric]
        metric = spec.metric
        blockers = [f"purge check failed: {p}" for p in problems]
        # A champion that cannot be refitted on these rows cannot be compared: refuse rather
        # than promote on the baselines alone, which could replace a better model.
        blockers += [f"{note}: refused, since the champion cannot be compared on the same folds (remove alias "
                     f"{CHAMPION!r} from v{champion.version} to promote on the baselines alone)" for note in notes]
        requirements, backtest = [], {}
        if spec.gate.backtest is not None:
            check, backtest = self._gate_backtest(model, folds, feature_set)
            requirements.append(check)
        gate = decide(
            metric, model.mean[metric], {name: comparison[name][metric] for name in spec.gate.baselines},
            champion=champion_value, champion_version=champion.version if champion else None, margin=spec.gate.margin,
            blockers=blockers, requirements=requirements, backtest=backtest,
        )
        beats_default = is_better(metric, model.mean[metric], comparison[BASELINE_DEFAULT][metric])
        verdict = "beats" if beats_default else "does not beat"
        self.progress(
            f"{spec.family}: {metric} {model.mean[metric]:.5f} {verdict} the baseline (LightGBM with defaults: "
            f"{comparison[BASELINE_DEFAULT][metric]:.5f}); gate: {gate.decision}: {gate.reason}",
            stage="gate", decision=gate.decision,
        )
        t0 = time.perf_counter()
        final = make_estimator(spec.family, dataset.target.task, params, self.settings, dataset.target.n_classes)
        final.fit(dataset.X, dataset.y, dataset.feature_names)
        learner_final = time.perf_counter() - t0
        self.progress(f"fitted on all {dataset.n_rows:,} rows in {learner_final:.1f}s", stage="final")
        balance = label_balance(dataset, folds)
        outcome = TrainingOutcome(
            spec=spec, run_id=self.run_id, model_name=spec.registered_model_name, model_version=None,
            run_url=self.registry.run_url(self.run_id), model_url="", dataset=info, fingerprint=dataset.fingerprint,
            folds=folds, purge_problems=problems, label_gaps_s=gaps, label_balance=balance, metric=metric, params=params,
            model=model, comparison=comparison, beats_default=beats_default, gate=gate, search=search, seconds=0.0,
            learner_seconds=sum(r.learner_seconds for r in {id(r): r for r in results.values()}.values()) + learner_final,
        )
        self._log(outcome, results, final)
        outcome.seconds = time.perf_counter() - started
        self._store(outcome, results, feature_set, started_at, started)
        self.registry.finish_run(self.run_id)
        return outcome

    # -- pieces ----------------------------------------------------------------------------
    def _fmt(self, metrics: dict[str, float]) -> str:
        keys = ("log_loss", "auc", "accuracy") if self.spec.task is not Task.REGRESSION else ("ic", "rank_ic", "icir")
        return "  ".join(f"{k} {metrics[k]:.4f}" for k in keys if k in metrics and not math.isnan(metrics[k]))

    def _cv(self, candidate: Candidate, dataset: Dataset, folds: list[Fold], announce: bool = False) -> CVResult:
        task, k = dataset.target.task, dataset.target.n_classes
        settings = self.settings if candidate.seed is None else LearnerSettings(candidate.seed, self.settings.n_jobs, self.settings.device)
        fold_started = [time.perf_counter()]

        def after_fold(index: int, metrics: dict[str, float], _: dict[str, float]) -> None:
            if announce:
                elapsed = time.perf_counter() - fold_started[0]
                self.progress(f"{candidate.family} fold {index + 1}/{len(folds)}: {self._fmt(metrics)}  ({elapsed:.1f}s)",
                              stage="cv", fold=index, folds=len(folds), metrics=metrics)
            fold_started[0] = time.perf_counter()

        return cross_validate(candidate.name, dataset, folds,
                              lambda: make_estimator(candidate.family, task, candidate.params, settings, k),
                              inputs=candidate.inputs, after_fold=after_fold)

    def _search(self, dataset: Dataset, folds: list[Fold]) -> SearchResult:
        import optuna

        spec = self.spec
        assert spec.search is not None
        n_trials = self.n_trials or spec.search.n_trials
        sampler, pruner = new_sampler_and_pruner(spec.seed)
        storage = optuna.storages.RDBStorage(self.optuna_storage, heartbeat_interval=60, grace_period=180)
        name = f"{spec.name}.{dataset.fingerprint[:12]}"
        study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner, load_if_exists=True,
                                    direction="maximize" if spec.higher_is_better else "minimize")
        done = len([t for t in study.trials if t.state.is_finished()])
        self.progress(f"search: study {name} ({done} trials done, budget {n_trials}"
                      + (f", at most {spec.search.timeout}" if spec.search.timeout else "") + ")", stage="search")
        optuna.logging.set_verbosity(optuna.logging.WARNING)

        def on_trial(trial: Any, study: Any, budget: int) -> None:
            state = trial.state.name.lower()
            value = f"{spec.metric} {trial.value:.5f}" if trial.value is not None else f"at fold {trial.last_step}"
            try:
                best = f"best {study.best_value:.5f} (#{study.best_trial.number})"
            except ValueError:
                best = "no complete trial yet"
            seconds = trial.duration.total_seconds() if trial.duration else 0.0
            self.progress(f"trial {trial.number + 1}/{budget} {state}: {value}; {best}  ({seconds:.1f}s)",
                          stage="search", trial=trial.number, state=state, value=trial.value)

        result = run_search(study, dataset, folds, spec.family, spec.metric, self.settings, n_trials,
                            spec.search.timeout_seconds, spec.search.space, on_trial)
        self.progress(f"search: best {spec.metric} {result.best_value:.5f} at trial {result.best_trial + 1}; "
                      f"{result.complete} complete, {result.pruned} pruned; params {json.dumps(result.best_params)}",
                      stage="search")
        return result

    def _refit_champion(self, champion: Any, dataset: Dataset, folds: list[Fold], notes: list[str]) -> CVResult | None:
        """The champion's recorded recipe refitted on the challenger's folds: the same rows
        (its own feature columns read for them when it used others), the seed it was trained
        with; deterministic, so an unchanged champion scores what it scored. None, with the
        reason in ``notes``, when that is impossible: the gate then refuses."""
        try:
            recipe = self.registry.read_recipe(champion.run_id)
        except Exception as exc:
            notes.append(f"champion v{champion.version} has no readable recipe ({exc})")
            return None
        if recipe.get("target") != dataset.target.name:
            notes.append(f"champion v{champion.version} learned {recipe.get('target')}, not {dataset.target.name}")
            return None
        features = tuple(recipe["features"])
        if set(features) <= set(dataset.feature_names):
            data = _subset(dataset, features)
        else:
            spec = self.spec
            try:
                rows = read_training_rows(self.warehouse, spec.symbols, spec.timeframe.value, dataset.feature_set,
                                          spec.target, spec.start, spec.end, list(features))
                data = build_dataset(rows, spec.target, dataset.feature_set, list(features))
            except ValueError as exc:
                notes.append(f"champion v{champion.version}'s features cannot be read for these rows ({exc})")
                return None
            if not data.keys.equals(dataset.keys):
                notes.append(f"champion v{champion.version}'s features are missing on some of these rows")
                return None
        candidate = Candidate("champion", recipe["family"], recipe["params"], seed=int(recipe["seed"]))
        result = self._cv(candidate, data, folds)
        self.progress(f"champion v{champion.version} ({recipe['family']}) refitted on these folds: {self._fmt(result.mean)}",
                      stage="champion", metrics=result.mean)
        return result

    def _recipe(self, outcome: TrainingOutcome) -> dict[str, Any]:
        spec, dataset = self.spec, self.dataset
        return {"spec": spec.name, "family": spec.family, "task": dataset.target.task.value, "target": dataset.target.name,
                "timeframe": spec.timeframe.value, "symbols": spec.symbols, "universe": spec.universe,
                "feature_set": dataset.feature_set, "features": list(dataset.feature_names), "params": outcome.params,
                "seed": spec.seed, "classes": list(dataset.target.classes), "fingerprint": dataset.fingerprint,
                "folds": spec.folds.model_dump(), "horizon_s": dataset.target.horizon.total_seconds()}

    def _log(self, outcome: TrainingOutcome, results: dict[str, CVResult], final: Any) -> None:
        """Everything about the run in MLflow, then the registered version (alias challenger)."""
        spec, dataset, registry, run_id = self.spec, self.dataset, self.registry, self.run_id
        model = outcome.model
        params = {
            "spec": spec.name, "family": spec.family, "task": spec.task.value, "target": spec.target,
            "timeframe": spec.timeframe.value, "universe": spec.universe, "symbols": ",".join(spec.symbols),
            "feature_set": dataset.feature_set, "rows": dataset.n_rows, "features": len(dataset.feature_names),
            "data_start": dataset.info["first_ts"], "data_end": dataset.info["last_ts"], "range_start": spec.start,
            "range_end": spec.end, "seed": spec.seed, "threads": self.settings.n_jobs, "device": spec.device,
            "metric": outcome.metric, "gate_margin": spec.gate.margin,
            **{f"folds.{k}": v for k, v in spec.folds.model_dump().items()},
            **{f"model.{k}": v for k, v in outcome.params.items()},
        }
        if spec.search is not None and outcome.search is not None:
            params |= {"search.n_trials": self.n_trials or spec.search.n_trials, "search.timeout": spec.search.timeout,
                       "search.complete": outcome.search.complete, "search.pruned": outcome.search.pruned}
        registry.log_params(run_id, params)
        metrics = {**model.mean, **{f"oos_{k}": v for k, v in model.overall.items()},
                   "learner_seconds": outcome.learner_seconds}
        for name, result in results.items():
            if name != "model":
                metrics |= {f"{name}.{k}": v for k, v in result.mean.items()}
        metrics |= {f"gate_backtest_{k}": v for k, v in outcome.gate.backtest.items()}
        registry.log_metrics(run_id, metrics)
        for fold, values in enumerate(model.per_fold):
            registry.log_metrics(run_id, {f"fold_{k}": v for k, v in values.items()}, step=fold)
        registry.set_tags(run_id, {"tradeforge.fingerprint": dataset.fingerprint, "tradeforge.gate": outcome.gate.decision,
                                   "tradeforge.gate_reason": outcome.gate.reason[:5000],
                                   "tradeforge.beats_baseline": str(outcome.beats_default).lower()})
        registry.log_dataset(run_id, f"ml_features.{spec.timeframe.value}.{spec.universe}", dataset.fingerprint,
                             f"ml_features feature_set={dataset.feature_set}", dataset.info)
        registry.log_dict(run_id, self._recipe(outcome), RECIPE_ARTIFACT)
        registry.log_dict(run_id, [{"fold": f.index, "train_rows": f.train_rows, "test_rows": f.test_rows, "purged": f.purged,
                                    "embargoed": f.embargoed, "test_from": epoch_ms_to_datetime(f.test_from_ms).isoformat(),
                                    "test_until": epoch_ms_to_datetime(f.test_until_ms).isoformat(),
                                    "label_gap_s": g, "metrics": m}
                                   for f, g, m in zip(outcome.folds, outcome.label_gaps_s, model.per_fold, strict=True)],
                          "folds.json")
        registry.log_dict(run_id, {"metric": outcome.metric, "comparison": outcome.comparison,
                                   "gate": {"decision": outcome.gate.decision, "reasons": outcome.gate.reasons}},
                          "comparison.json")
        y = dataset.y[model.index]
        roc = None
        if spec.task is not Task.REGRESSION:
            up = (dataset.label[model.index] > 0).astype(np.int32)
            roc = {name: (up, r.raw[:, -1]) for name, r in results.items() if r.raw.ndim == 2}
        per_fold = {name: [f[outcome.metric] for f in r.per_fold] for name, r in results.items()}
        figures = training_figures(spec.task, dataset.feature_names, model.importance, y, model.raw,
                                   dataset.label[model.index], outcome.metric, per_fold, roc)
        for path, figure in figures.items():
            registry.log_figure(run_id, figure, f"plots/{path}")
        import pandas as pd

        example = pd.DataFrame(dataset.X[:5], columns=list(dataset.feature_names))
        source = registry.log_model(run_id, spec.family, final.native, example, final.native.predict(example))
        version = registry.register(
            spec.registered_model_name, run_id, source,
            tags={"spec": spec.name, "family": spec.family, "task": spec.task.value, "target": spec.target,
                  "timeframe": spec.timeframe.value, "universe": spec.universe, "feature_set": dataset.feature_set,
                  "fingerprint": dataset.fingerprint, "features": len(dataset.feature_names),
                  "classes": json.dumps(list(dataset.target.classes)), "metric": outcome.metric,
                  outcome.metric: f"{outcome.value:.6f}", "gate.decision": outcome.gate.decision,
                  "gate.reason": outcome.gate.reason[:5000],
                  "gate.champion_version": outcome.gate.champion_version or ""},
            description=f"{spec.family} on {spec.target} ({spec.timeframe.value}, {spec.universe}); spec {spec.name}",
        )
        registry.set_alias(spec.registered_model_name, CHALLENGER, version)
        outcome.model_version = version
        outcome.model_url = registry.model_url(spec.registered_model_name, version)
        self.progress(f"registered {spec.registered_model_name} v{version} (alias {CHALLENGER}); run {outcome.run_url}",
                      stage="registered", version=version)

    def _predictions(self, model: CVResult, model_name: str, version: int, feature_set: str) -> pl.DataFrame:
        """The model's out-of-fold predictions in the columns of `model_predictions`."""
        dataset = self.dataset
        keys = dataset.keys[model.index]
        probs = probabilities_by_side(model.raw, dataset.target.task)
        return keys.with_columns(
            pl.lit(model_name).alias("model_name"), pl.lit(version, pl.UInt32).alias("model_version"),
            pl.lit(self.run_id).alias("run_id"), pl.Series("fold", model.fold_of.astype(np.uint16)),
            pl.lit(dataset.target.name).alias("target"), pl.Series("label", dataset.label[model.index]),
            pl.Series("prediction", signed_prediction(model.raw, dataset.target.task)),
            *[pl.Series(name, values, pl.Float64) if values is not None else pl.lit(None, pl.Float64).alias(name)
              for name, values in probs.items()],
            pl.lit(feature_set).alias("feature_set"),
        )

    def _gate_backtest(self, model: CVResult, folds: list[Fold], feature_set: str) -> tuple[tuple[bool, str], dict[str, float]]:
        """The spec's gate requires an out-of-sample backtest after costs: trade the out-of-fold
        predictions just made (the very rows `model_predictions` will hold) on the warehouse's
        bars, as the `model_backtest` asset will, and hold its numbers to the spec's minimums."""
        from assets.model_backtest_run import backtest_predictions
        from models.learning.gate import backtest_requirement

        spec, dataset = self.spec, self.dataset
        requirement = spec.gate.backtest
        assert requirement is not None
        predictions = self._predictions(model, spec.registered_model_name, 0, feature_set)
        tested = pl.DataFrame({"fold": [f.index for f in folds],
                               "test_start": [epoch_ms_to_datetime(f.test_from_ms) for f in folds],
                               "test_end": [epoch_ms_to_datetime(f.test_until_ms) for f in folds]},
                              schema={"fold": pl.Int64, "test_start": pl.Datetime("ms", "UTC"), "test_end": pl.Datetime("ms", "UTC")})
        try:
            run = backtest_predictions(self.warehouse, predictions, tested, spec.backtest, dataset.target.task is Task.REGRESSION,
                                       f"{spec.name} (challenger)", say=self._progress)
        except ValueError as exc:
            return (False, f"out-of-sample backtest after costs could not run: {exc}"), {}
        metrics = run.result.metrics
        check = backtest_requirement(metrics, requirement.min_sharpe, requirement.min_return, requirement.min_trades)
        numbers = {k: float(metrics[k]) for k in ("sharpe", "total_return", "max_drawdown", "trades", "costs_pct", "final_equity")}
        self.progress(check[1], stage="backtest", passed=check[0], **numbers)
        return check, numbers

    def _store(self, outcome: TrainingOutcome, results: dict[str, CVResult], feature_set: str, started_at: datetime, started: float) -> None:
        dataset, model, spec = self.dataset, outcome.model, self.spec
        version = int(outcome.model_version or 0)
        predictions = self._predictions(model, outcome.model_name, version, feature_set)
        folds = fold_rows(outcome, dataset, spec)
        write_training(self.warehouse, outcome.model_name, version, predictions, folds,
                       self._run_row(outcome, feature_set, started_at, started), metric_rows(outcome, results, version))
        write_promotion(self.warehouse, promotion_row(outcome.model_name, version, self.run_id, outcome.gate))

    def _run_row(self, outcome: TrainingOutcome | None, feature_set: str, started_at: datetime, started: float,
                 status: str = "completed", error: str = "") -> pl.DataFrame:
        spec = self.spec
        dataset = self.dataset
        finished = datetime.now(UTC)
        return pl.DataFrame([{
            "run_id": self.run_id, "spec": spec.name, "model_name": spec.registered_model_name,
            "model_version": int(outcome.model_version) if outcome and outcome.model_version else None,
            "family": spec.family, "target": spec.target, "timeframe": spec.timeframe.value, "symbols": spec.symbols,
            "feature_set": feature_set, "fingerprint": dataset.fingerprint if dataset else "",
            "rows": dataset.n_rows if dataset else 0, "features": len(dataset.feature_names) if dataset else 0,
            "data_start": dataset.start if dataset else None, "data_end": dataset.end if dataset else None,
            "folds": len(outcome.folds) if outcome else 0, "params": json.dumps(outcome.params if outcome else spec.params, default=str),
            "search_trials": outcome.search.complete + outcome.search.pruned if outcome and outcome.search else 0,
            "metric": spec.metric, "value": _finite(outcome.value) if outcome else None,
            "baseline_value": _finite(outcome.comparison[BASELINE_DEFAULT][spec.metric]) if outcome else None,
            "beats_baselines": int(bool(outcome and outcome.beats_default and _beats_naive(outcome))),
            "gate_decision": outcome.gate.decision if outcome else "", "status": status, "error": error[:2000],
            "seed": spec.seed, "code_version": code_version(), "dagster_run_id": self.dagster_run_id,
            "started_at": started_at, "finished_at": finished, "seconds": time.perf_counter() - started,
            "learner_seconds": outcome.learner_seconds if outcome else 0.0,
        }], schema_overrides={"model_version": pl.UInt32, "data_start": pl.Datetime("ms", "UTC"),
                              "data_end": pl.Datetime("ms", "UTC"), "value": pl.Float64, "baseline_value": pl.Float64,
                              "started_at": pl.Datetime("ms", "UTC"), "finished_at": pl.Datetime("ms", "UTC"),
                              "rows": pl.UInt32, "features": pl.UInt16, "folds": pl.UInt16, "search_trials": pl.UInt32,
                              "beats_baselines": pl.UInt8, "seed": pl.Int64})


def _finite(value: float) -> float | None:
    return None if value is None or math.isnan(value) else float(value)


def _beats_naive(outcome: TrainingOutcome) -> bool:
    metric = outcome.metric
    return all(is_better(metric, outcome.value, outcome.comparison[name][metric]) for name in ("majority", "previous_direction"))


def _subset(dataset: Dataset, names: tuple[str, ...]) -> Dataset:
    """The same rows with only ``names`` as columns (a champion trained on fewer features)."""
    from dataclasses import replace

    index = [dataset.feature_names.index(name) for name in names]
    return replace(dataset, X=np.ascontiguousarray(dataset.X[:, index]), feature_names=tuple(names))


def label_balance(dataset: Dataset, folds: list[Fold]) -> dict[str, Any]:
    """Share of each class (of up-moves for returns) overall and in each fold's test rows."""
    if dataset.target.task is Task.REGRESSION:
        up = dataset.label > 0
        overall = {"up": float(up.mean())}
        per_fold = [{"up": float(up[f.test].mean())} for f in folds]
    else:
        classes = dataset.target.classes
        names = ["up" if c == 1 else ("down" if c == -1 else ("not_up" if dataset.target.task is Task.BINARY else "flat"))
                 for c in classes]
        counts = np.bincount(dataset.y, minlength=len(classes)) / len(dataset.y)
        overall = {name: float(share) for name, share in zip(names, counts, strict=True)}
        per_fold = [{name: float(share) for name, share in zip(names, np.bincount(dataset.y[f.test], minlength=len(classes)) / f.test_rows, strict=True)}
                    for f in folds]
    return {"overall": overall, "per_fold": per_fold}


def fold_rows(outcome: TrainingOutcome, dataset: Dataset, spec: ModelSpec) -> pl.DataFrame:
    """`model_folds`: every fold's training and test ranges (bar closes), and row -1: the
    registered model, fitted on every row."""
    close = dataset.keys["close_ts"]
    horizon = dataset.target.horizon
    config = spec.folds.config()
    rows = []
    for fold in outcome.folds:
        rows.append({"fold": fold.index, "train_start": close[fold.train_start], "train_end": close[fold.train_stop - 1],
                     "train_label_end": close[fold.train_stop - 1] + horizon,
                     "test_start": epoch_ms_to_datetime(fold.test_from_ms), "test_end": epoch_ms_to_datetime(fold.test_until_ms),
                     "train_rows": fold.train_rows, "test_rows": fold.test_rows, "purged_rows": fold.purged,
                     "embargoed_rows": fold.embargoed})
    rows.append({"fold": -1, "train_start": close[0], "train_end": close[-1], "train_label_end": close[-1] + horizon,
                 "test_start": None, "test_end": None, "train_rows": dataset.n_rows, "test_rows": 0, "purged_rows": 0,
                 "embargoed_rows": 0})
    frame = pl.DataFrame(rows, schema_overrides={"test_start": pl.Datetime("ms", "UTC"), "test_end": pl.Datetime("ms", "UTC")})
    return frame.with_columns(
        pl.lit(outcome.model_name).alias("model_name"), pl.lit(int(outcome.model_version or 0), pl.UInt32).alias("model_version"),
        pl.lit(outcome.run_id).alias("run_id"), pl.col("fold").cast(pl.Int16), pl.lit(spec.symbols, pl.List(pl.String)).alias("symbols"),
        pl.lit(spec.timeframe.value).alias("timeframe"), pl.lit(spec.target).alias("target"),
        pl.lit(config.scheme.value).alias("scheme"),
        pl.col("train_rows", "test_rows", "purged_rows", "embargoed_rows").cast(pl.UInt32),
        pl.lit(int(config.embargo.total_seconds()), pl.UInt32).alias("embargo_s"),
        pl.lit(int(horizon.total_seconds()), pl.UInt32).alias("horizon_s"), pl.lit(dataset.feature_set).alias("feature_set"),
    )


def metric_rows(outcome: TrainingOutcome, results: dict[str, CVResult], version: int) -> pl.DataFrame:
    rows = []
    for name, result in results.items():
        for scope, fold, values in [("mean", -1, result.mean), ("overall", -1, result.overall),
                                    *[("fold", i, m) for i, m in enumerate(result.per_fold)]]:
            rows += [{"candidate": name, "scope": scope, "fold": fold, "metric": k, "value": _finite(v)} for k, v in values.items()]
    return pl.DataFrame(rows, schema_overrides={"value": pl.Float64}).with_columns(
        pl.lit(outcome.run_id).alias("run_id"), pl.lit(outcome.model_name).alias("model_name"),
        pl.lit(version, pl.UInt32).alias("model_version"), pl.col("fold").cast(pl.Int16),
    ).select("run_id", "model_name", "model_version", "candidate", "scope", "fold", "metric", "value")


def promotion_row(model_name: str, version: int, run_id: str, gate: GateDecision, decision: str | None = None,
                  reason: str | None = None) -> dict[str, Any]:
    return {"model_name": model_name, "model_version": version, "run_id": run_id, "decision": decision or gate.decision,
            "reason": reason or gate.reason, "metric": gate.metric, "challenger_value": _finite(gate.challenger),
            "champion_value": _finite(gate.champion) if gate.champion is not None else None,
            "champion_version": int(gate.champion_version) if gate.champion_version else None, "margin": gate.margin}
