"""What a runner trades and how: symbols, timeframe, model, broker, risk, thresholds, names.

A runner has a ``name`` (its saved state, its bar consumer and its ``portfolio.{name}``
subject) and a ``strategy`` (what client order ids and the MT5 magic number are derived from;
the name by default). Two runners with one strategy make the same client ids: that is how a
reference run and a crash-tested run of the same decisions are compared.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from datetime import datetime

from models.market.instruments import instrument
from models.market.timeframes import DayBoundary, Timeframe
from models.trading.currency import ConvMode, conversion_mode
from models.trading.fills import FillConfig
from models.trading.risk import RiskConfig

#: Risk limits a live account gets unless the user says otherwise: they trip the kill switch.
LIVE_RISK_DEFAULTS = {"max_daily_loss": 0.03, "max_drawdown": 0.10}
#: The model strategy's thresholds (see models/trading/strategy.py ModelStrategy).
THRESHOLD_DEFAULTS = {"long_above": 0.55, "short_below": 0.45, "exit_between": True}
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class ConfigError(ValueError):
    """A runner setting that cannot work; the message is one line."""


def default_name(model: str) -> str:
    """A runner name from a model reference: ``direction_1h.M5.demo@champion`` -> ``direction_1h-M5-demo``."""
    base = re.split(r"[@/]", model, maxsplit=1)[0]
    return re.sub(r"[^A-Za-z0-9_-]", "-", base)[:64] or "live"


@dataclass(frozen=True)
class RunnerConfig:
    symbols: tuple[str, ...]
    timeframe: Timeframe
    model: str  # NAME@alias (hot-swapped when the alias moves) or NAME/VERSION (pinned)
    broker: str = "paper"  # paper | mt5
    name: str = ""
    strategy: str = ""
    initial_equity: float = 100_000.0
    account_currency: str = "USD"
    risk: RiskConfig = field(default_factory=lambda: RiskConfig(**LIVE_RISK_DEFAULTS))
    fill: FillConfig = field(default_factory=FillConfig)
    thresholds: dict = field(default_factory=lambda: dict(THRESHOLD_DEFAULTS))
    day_boundary: DayBoundary = DayBoundary.UTC
    #: A bar whose close is older than this when it arrives makes no decision (its state still
    #: advances). None: two bars' time; 0: never stale (replays of history).
    max_bar_age_s: float | None = None
    #: Warm-up history ends before this (replaying past days); None: whatever the warehouse has.
    history_end: datetime | None = None
    model_poll_s: float = 30.0  # how often the registry is asked whether the alias moved
    heartbeat_s: float = 5.0
    metrics_port: int | None = None  # Prometheus endpoint; None: none
    metrics_host: str = "127.0.0.1"  # the interface it listens on (0.0.0.0: every one, for a Prometheus elsewhere)
    ack_wait_s: float = 30.0  # an unacknowledged bar is redelivered after this (the runner died mid-bar)
    mt5_fake: str | None = None  # HOST:PORT/NAME of a fake terminal server (resources/brokers/mt5/remote.py)
    stop_when_idle_s: float | None = None  # replays: stop once no bar came for this long
    #: A bar closing later than now + this on the runner's clock is refused ("future"): it would
    #: make every real bar after it look out of order.
    max_clock_skew_s: float = 30.0

    def __post_init__(self) -> None:
        if not self.symbols:
            raise ConfigError("name at least one symbol (--symbols EURUSD XAUUSD)")
        symbols = tuple(instrument(s).symbol for s in self.symbols)
        if len(set(symbols)) != len(symbols):
            raise ConfigError(f"a symbol is named twice: {' '.join(self.symbols)}")
        object.__setattr__(self, "symbols", symbols)
        object.__setattr__(self, "timeframe", Timeframe(self.timeframe))
        if self.broker not in ("paper", "mt5"):
            raise ConfigError(f"--broker is paper or mt5, got {self.broker!r}")
        name = self.name or default_name(self.model)
        strategy = self.strategy or name
        for what, value in (("runner name", name), ("strategy", strategy)):
            if not _NAME.match(value):
                raise ConfigError(f"{what} {value!r} may hold letters, digits, '_' and '-' only (64 at most)")
        object.__setattr__(self, "name", name)
        object.__setattr__(self, "strategy", strategy)
        for symbol in symbols:
            if conversion_mode(instrument(symbol), self.account_currency) is ConvMode.CROSS:
                raise ConfigError(f"{symbol} in a {self.account_currency} account needs a third pair's bars to convert its "
                                  f"PnL: the live runner trades symbols quoted in {self.account_currency} or against it only")
        unknown = set(self.thresholds) - set(THRESHOLD_DEFAULTS) - {"column"}
        if unknown:
            raise ConfigError(f"unknown strategy parameters {sorted(unknown)}; known: {sorted(THRESHOLD_DEFAULTS)}")

    @property
    def bar_ms(self) -> int:
        return self.timeframe.minutes * 60_000

    @property
    def stale_after_s(self) -> float:
        """Seconds after its close a bar is too old to act on (0: never)."""
        if self.max_bar_age_s is None:
            return 2 * self.timeframe.minutes * 60.0
        return float(self.max_bar_age_s)


def day_boundary_from_env() -> DayBoundary:
    """``TRADEFORGE_DAY_BOUNDARY`` (utc or new_york_17; utc when unset), or one line naming it."""
    value = os.environ.get("TRADEFORGE_DAY_BOUNDARY", "utc")
    try:
        return DayBoundary(value)
    except ValueError:
        raise ConfigError(f"TRADEFORGE_DAY_BOUNDARY={value!r}: use utc or new_york_17") from None
