"""Strategy specs: a backtest described as data (a YAML entry), validated into objects.

```yaml
sma_eurusd:
  strategy: sma_cross          # a registered strategy
  params: {fast: 10, slow: 30}
  symbols: [EURUSD]
  timeframe: M5
  start: 2024-03-04
  end: 2024-03-14              # exclusive
  initial_equity: 100000
  account_currency: USD
  risk: {sizing: fixed_fraction, risk_fraction: 0.01, stop_atr: 2.0, target_atr: 3.0}
  fill: {commission_per_lot: 3.5, slippage: 0.00001}
```
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, fields
from datetime import UTC, date, datetime
from typing import Any

from models.backtest.runner import BacktestConfig
from models.market.instruments import instrument
from models.market.timeframes import Timeframe
from models.trading.fills import FillConfig
from models.trading.risk import RiskConfig
from models.trading.strategy import Strategy, make_strategy

_KEYS = {"strategy", "params", "symbols", "timeframe", "start", "end", "initial_equity", "account_currency", "risk", "fill"}


def _day(value: Any, what: str) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=UTC)
    if isinstance(value, date):
        return datetime(value.year, value.month, value.day, tzinfo=UTC)
    try:
        return _day(date.fromisoformat(str(value)), what)
    except ValueError:
        raise ValueError(f"{what} {value!r} is not a date (YYYY-MM-DD)") from None


@dataclass(frozen=True)
class BacktestSpec:
    name: str
    strategy: str
    symbols: tuple[str, ...]
    timeframe: Timeframe
    start: datetime
    end: datetime
    params: dict[str, Any] = field(default_factory=dict)
    initial_equity: float = 100_000.0
    account_currency: str = "USD"
    risk: dict[str, Any] = field(default_factory=dict)
    fill: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, name: str, data: dict[str, Any]) -> BacktestSpec:
        unknown = set(data) - _KEYS
        if unknown:
            raise ValueError(f"spec {name!r}: unknown keys {sorted(unknown)}; known: {sorted(_KEYS)}")
        for key in ("strategy", "symbols", "start", "end"):
            if key not in data:
                raise ValueError(f"spec {name!r}: {key} is required")
        symbols = data["symbols"] if isinstance(data["symbols"], list) else [data["symbols"]]
        spec = cls(
            name=name, strategy=str(data["strategy"]), symbols=tuple(instrument(str(s)).symbol for s in symbols),
            timeframe=Timeframe(str(data.get("timeframe", "M5"))), start=_day(data["start"], "start"),
            end=_day(data["end"], "end"), params=dict(data.get("params") or {}),
            initial_equity=float(data.get("initial_equity", 100_000.0)),
            account_currency=str(data.get("account_currency", "USD")),
            risk=dict(data.get("risk") or {}), fill=dict(data.get("fill") or {}),
        )
        spec.build()  # fail now, with the reason, rather than in the middle of a run
        if spec.end <= spec.start:
            raise ValueError(f"spec {name!r}: end {spec.end:%Y-%m-%d} is not after start {spec.start:%Y-%m-%d}")
        return spec

    def build(self) -> tuple[Strategy, BacktestConfig]:
        strategy = make_strategy(self.strategy, self.params)
        return strategy, build_config(self.initial_equity, self.account_currency, self.risk, self.fill)

    def as_dict(self) -> dict[str, Any]:
        return {"strategy": self.strategy, "params": self.params, "symbols": list(self.symbols), "timeframe": self.timeframe.value,
                "start": self.start.date().isoformat(), "end": self.end.date().isoformat(),
                "initial_equity": self.initial_equity, "account_currency": self.account_currency,
                "risk": self.risk, "fill": self.fill}

    @property
    def run_id(self) -> str:
        """The same spec over the same window is the same run (a rerun replaces it)."""
        text = json.dumps({"name": self.name, **self.as_dict()}, sort_keys=True, default=str)
        return f"{self.name}-{hashlib.blake2b(text.encode(), digest_size=6).hexdigest()}"


def fill_config(fill: dict[str, Any]) -> FillConfig:
    """Fill settings from data, every key and value checked (one clear error)."""
    known = {f.name for f in fields(FillConfig)}
    if set(fill) - known:
        raise ValueError(f"unknown fill settings {sorted(set(fill) - known)}; known: {sorted(known)}")
    values = {}
    for key, value in fill.items():
        try:
            values[key] = value if key == "use_bar_quotes" or value is None else float(value)
        except (TypeError, ValueError):
            raise ValueError(f"fill setting {key}={value!r} is not a number") from None
    return FillConfig(**values)


def build_config(initial_equity: float, account_currency: str, risk: dict[str, Any], fill: dict[str, Any]) -> BacktestConfig:
    """A backtest's settings from data (a strategy spec, a model spec's ``backtest`` section)."""
    if not initial_equity > 0:
        raise ValueError(f"initial_equity must be positive, got {initial_equity}")
    return BacktestConfig(initial_equity=float(initial_equity), account_currency=account_currency,
                          risk=RiskConfig.from_dict(risk), fill=fill_config(fill))
