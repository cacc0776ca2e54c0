"""Model specs: which models exist is data (orchestration/model_specs.yaml), not code.

A spec names a family, a target, a timeframe, a universe of symbols, a date range, fold
settings and either fixed parameters or a search budget. Specs that share (target,
timeframe, universe) compete for one registered model, whatever their family.

```yaml
universes:
  demo: [EURUSD, XAUUSD, BTCUSD]
defaults:                 # merged under every spec
  folds: {n_folds: 5, embargo: 1h}
specs:
  - name: demo_lightgbm
    family: lightgbm      # lightgbm | xgboost | catboost
    target: direction_1h  # direction_* | fwd_ret_* | barrier_4h
    timeframe: M5
    universe: demo        # or symbols: [...]
    params: {n_estimators: 200, learning_rate: 0.05}
    search: {n_trials: 50, timeout: 30m}   # optional: Optuna instead of fixed params
```
"""

from __future__ import annotations

import re
from datetime import date, timedelta
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.backtest.spec import build_config
from models.learning.datasets import TARGETS, Task
from models.learning.estimators import FAMILIES
from models.learning.folds import FoldConfig, Scheme
from models.learning.metrics import HIGHER_IS_BETTER, PRIMARY, metric_names
from models.market.timeframes import Timeframe
from models.trading.strategy import ModelStrategy

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


def parse_duration(text: str | int | float) -> timedelta:
    """``"90d"``, ``"4h"``, ``"30m"``, ``"45s"``, ``"2w"``; a bare number is seconds."""
    if isinstance(text, (int, float)):
        return timedelta(seconds=float(text))
    if text.strip() == "0":
        return timedelta(0)
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration like 90d, 4h, 30m, 45s or 2w")
    return timedelta(**{_UNITS[match.group(2)]: float(match.group(1))})


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class FoldSettings(_Strict):
    n_folds: int = Field(default=5, ge=1)
    scheme: Scheme = Scheme.EXPANDING
    train_window: str | None = None
    test_window: str | None = None
    embargo: str = "0"
    min_train_rows: int = Field(default=50, ge=1)

    @field_validator("train_window", "test_window", "embargo")
    @classmethod
    def _durations(cls, value: str | None) -> str | None:
        if value is not None:
            parse_duration(value)
        return value

    def config(self) -> FoldConfig:
        return FoldConfig(
            n_folds=self.n_folds, scheme=self.scheme,
            train_window=parse_duration(self.train_window) if self.train_window else None,
            test_window=parse_duration(self.test_window) if self.test_window else None,
            embargo=parse_duration(self.embargo), min_train_rows=self.min_train_rows,
        )


class SearchSettings(_Strict):
    n_trials: int = Field(default=50, ge=1)
    timeout: str | None = None  # a duration; the search stops there and resumes next time
    space: dict[str, list[float]] = Field(default_factory=dict, description="bounds overrides: param -> [low, high]")

    @property
    def timeout_seconds(self) -> float | None:
        return parse_duration(self.timeout).total_seconds() if self.timeout else None


class BacktestGate(_Strict):
    """What the out-of-sample backtest (after costs) must show for the challenger to pass."""

    min_sharpe: float | None = None  # annualised Sharpe of daily returns
    min_return: float | None = None  # total return over the tested bars, a fraction (0.0: not a loss)
    min_trades: int = Field(default=1, ge=0, description="fewer closed trades than this: the numbers mean nothing")

    @model_validator(mode="after")
    def _something(self) -> BacktestGate:
        if self.min_sharpe is None and self.min_return is None:
            raise ValueError("gate.backtest needs min_sharpe or min_return")
        return self


class GateSettings(_Strict):
    metric: str | None = None  # default: log loss for classifiers, IC for returns
    margin: float = Field(default=0.001, ge=0, description="how much better than the champion, in metric units")
    baselines: list[Literal["majority", "previous_direction"]] = Field(default_factory=lambda: ["majority", "previous_direction"])
    backtest: BacktestGate | None = None  # set: the out-of-sample backtest after costs is part of the gate


class BacktestSettings(_Strict):
    """How the model's out-of-sample predictions are traded in its backtests (and the gate's):
    the model strategy's thresholds, the risk model, costs. See models/backtest/spec.py."""

    params: dict[str, Any] = Field(default_factory=dict, description="long_above, short_below, exit_between, column")
    risk: dict[str, Any] = Field(default_factory=dict)
    fill: dict[str, Any] = Field(default_factory=dict)
    initial_equity: float = Field(default=100_000.0, gt=0)
    account_currency: str = "USD"

    @model_validator(mode="after")
    def _valid(self) -> BacktestSettings:
        ModelStrategy(**self.params)
        build_config(self.initial_equity, self.account_currency, self.risk, self.fill)
        return self


class ModelSpec(_Strict):
    name: str
    family: str
    target: str
    timeframe: Timeframe = Timeframe.M5
    symbols: list[str]
    universe: str
    feature_set: str = "current"  # "current": the feature set the code computes today
    start: date | None = None
    end: date | None = None       # exclusive
    features: list[str] | None = None
    exclude_features: list[str] = Field(default_factory=list)
    folds: FoldSettings = FoldSettings()
    params: dict[str, Any] = Field(default_factory=dict)
    search: SearchSettings | None = None
    seed: int = 7
    threads: int | None = Field(default=None, ge=1)  # None: TRADEFORGE_TRAIN_THREADS or the cores
    device: Literal["cpu", "gpu"] = "cpu"
    gate: GateSettings = GateSettings()
    backtest: BacktestSettings = BacktestSettings()
    description: str = ""

    @field_validator("name", "universe")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        if not _NAME.match(value):
            raise ValueError(f"{value!r}: use letters, digits, '_', '-' and '.' only")
        return value

    @field_validator("family")
    @classmethod
    def _family(cls, value: str) -> str:
        if value not in FAMILIES:
            raise ValueError(f"unknown family {value!r}; choose one of {', '.join(FAMILIES)}")
        return value

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        if value not in TARGETS:
            raise ValueError(f"unknown target {value!r}; choose one of {', '.join(TARGETS)}")
        return value

    @field_validator("symbols")
    @classmethod
    def _symbols(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("a spec needs at least one symbol")
        return sorted({s.upper() for s in value})

    @model_validator(mode="after")
    def _consistent(self) -> ModelSpec:
        if self.start and self.end and self.start >= self.end:
            raise ValueError(f"start {self.start} is not before end {self.end}")
        metric = self.gate.metric
        if metric is not None and metric not in metric_names(self.task):
            raise ValueError(f"gate metric {metric!r} does not apply to {self.target}; choose one of {', '.join(metric_names(self.task))}")
        return self

    @property
    def task(self) -> Task:
        return TARGETS[self.target].task

    @property
    def metric(self) -> str:
        """The metric that decides: the search objective and the gate."""
        return self.gate.metric or PRIMARY[self.task]

    @property
    def higher_is_better(self) -> bool:
        return HIGHER_IS_BETTER[self.metric]

    @property
    def registered_model_name(self) -> str:
        """One registered model per (target, timeframe, universe): families compete in it."""
        return f"{self.target}.{self.timeframe.value}.{self.universe}"


def parse_specs(document: dict[str, Any] | None) -> dict[str, ModelSpec]:
    """Specs by name from the parsed YAML document (``universes``, ``defaults``, ``specs``).

    Raises ``ValueError`` naming the spec and the field at fault.
    """
    document = document or {}
    unknown = set(document) - {"universes", "defaults", "specs"}
    if unknown:
        raise ValueError(f"model specs: unknown section(s) {sorted(unknown)}; expected universes, defaults, specs")
    universes = {name: [s.upper() for s in symbols] for name, symbols in (document.get("universes") or {}).items()}
    defaults = document.get("defaults") or {}
    specs: dict[str, ModelSpec] = {}
    for position, entry in enumerate(document.get("specs") or [], start=1):
        if not isinstance(entry, dict):
            raise ValueError(f"model spec #{position} is not a mapping")
        raw = _merge(defaults, entry)
        name = raw.get("name", f"#{position}")
        universe = raw.get("universe")
        if "symbols" not in raw:
            if universe not in universes:
                raise ValueError(f"model spec {name}: universe {universe!r} is not among universes {sorted(universes)} and no symbols are given")
            raw["symbols"] = universes[universe]
        elif universe is None:
            raw["universe"] = "-".join(sorted(s.upper() for s in raw["symbols"]))
        try:
            spec = ModelSpec(**raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "spec"
            message = str(first["msg"]).removeprefix("Value error, ")
            raise ValueError(f"model spec {name}: {where}: {message}") from None
        if spec.name in specs:
            raise ValueError(f"model spec {spec.name} is defined twice")
        specs[spec.name] = spec
    return specs


def _merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict) and key not in ("params",):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged
