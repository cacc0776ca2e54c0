"""A fork server for the live runner's crash tests: imports the runner and its engines once, then
forks a child per command, so a test can kill -9 runners a dozen times for the price of a fork.

Commands on stdin, one JSON object per line:
  {"run": {...runner settings...}, "nats": URL, "mlflow": URI, "warehouse": [PATH, DATABASE], "log": PATH}
      a child runs the runner until it stops or is killed; prints "child PID" at once
  {"quit": true}
Nothing is connected before a fork (chDB, MLflow and NATS are opened by each child).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from datetime import datetime

# Imported once here, not in every child: what starting a runner imports (MLflow's SQL store and
# its model loading pull in SQLAlchemy, alembic, skops and much of scikit-learn: seconds).
import alembic.runtime.migration  # noqa: F401
import lightgbm  # noqa: F401
import mlflow.artifacts  # noqa: F401
import mlflow.lightgbm  # noqa: F401
import mlflow.store.model_registry.sqlalchemy_store  # noqa: F401
import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
import nats  # noqa: F401
import skops.io  # noqa: F401
import sklearn.ensemble  # noqa: F401
import sklearn.linear_model  # noqa: F401

from live.config import RunnerConfig
from live.runner import run_runner
from models.market.timeframes import Timeframe
from models.trading.fills import FillConfig
from models.trading.risk import RiskConfig
from resources.brokers.mt5 import remote  # noqa: F401
from resources.bus import NatsBus
from resources.registry import ModelRegistry
from resources.warehouse import WarehouseClient


def config_from(settings: dict) -> RunnerConfig:
    settings = dict(settings)
    settings["symbols"] = tuple(settings["symbols"])
    settings["timeframe"] = Timeframe(settings.get("timeframe", "M5"))
    settings["risk"] = RiskConfig.from_dict(settings.get("risk", {}))
    settings["fill"] = FillConfig(**settings.get("fill", {}))
    if settings.get("history_end"):
        settings["history_end"] = datetime.fromisoformat(settings["history_end"])
    return RunnerConfig(**settings)


def child(command: dict) -> int:
    logging.basicConfig(filename=command["log"], level=logging.INFO, format=f"%(asctime)s {os.getpid()} %(name)s %(message)s")
    logging.getLogger("tradeforge.live").info("forked")
    config = config_from(command["run"])
    path, database = command["warehouse"]
    bus = NatsBus(command["nats"], max_reconnect_attempts=-1)
    return asyncio.run(run_runner(config, bus=bus, registry=ModelRegistry(command["mlflow"]),
                                  warehouse=WarehouseClient(embedded_path=path, database=database, lock_timeout_s=60)))


def main() -> int:
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # children are reaped by the kernel
    print("ready", flush=True)
    for line in sys.stdin:
        command = json.loads(line)
        if command.get("quit"):
            return 0
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                code = child(command)
            except BaseException:  # noqa: BLE001
                logging.getLogger("tradeforge.live").exception("runner failed")
            finally:
                logging.shutdown()
                os._exit(code)
        print(f"child {pid}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
