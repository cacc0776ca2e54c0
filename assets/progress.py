"""Progress of long runs: a line per chunk in the run's log (the Dagster UI), and on the
``tradeforge.progress`` logger, which the command line prints."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from datetime import date

from dagster import AssetExecutionContext

log = logging.getLogger("tradeforge.progress")


class Progress:
    def __init__(self, context: AssetExecutionContext, asset: str, total: int) -> None:
        self.context, self.asset, self.total, self.done = context, asset, total, 0
        self.started = time.perf_counter()

    def advance(self, symbol: str, days: Sequence[date], what: str) -> None:
        self.done += len(days)
        span = f"{days[0]}" if len(days) == 1 else f"{days[0]}..{days[-1]}"
        elapsed = time.perf_counter() - self.started
        line = f"{self.asset} {symbol} {span}: {what} [{self.done}/{self.total} days, {elapsed:.1f}s]"
        self.context.log.info(line)
        log.info(line)

    def describe(self) -> str:
        return f"{self.asset}: {self.done} day(s) in {time.perf_counter() - self.started:.1f}s"
