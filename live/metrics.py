"""The runner's Prometheus metrics (prometheus-client), on a registry of its own.

``tradeforge_live_bars_total{symbol}``, ``tradeforge_live_bars_rejected_total{reason}``,
``tradeforge_live_stage_seconds{stage}`` (bus: published -> received; features; inference;
risk: the engine's own step; broker: time in the broker port; publish: the ledger to
JetStream; persist: the KV save; bar: received -> order accepted), ``tradeforge_live_orders_total{status}``
(order transitions), ``tradeforge_live_fills_total``, ``tradeforge_live_equity``,
``tradeforge_live_position_units{symbol}``, ``tradeforge_live_kill_switch`` (0 off, 1 reduce
only, 2 halt), ``tradeforge_live_last_bar_timestamp_seconds{symbol}``, ``tradeforge_live_model_version``.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

STAGES = ("bus", "features", "inference", "risk", "broker", "publish", "persist", "bar")
_BUCKETS = (0.0001, 0.00025, 0.0005, 0.00075, 0.001, 0.0015, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.025, 0.05, 0.1, 0.25,
            0.5, 1.0, 2.5)
KILL_LEVEL = {"off": 0, "reduce_only": 1, "halt": 2}


class RunnerMetrics:
    def __init__(self, runner: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"runner": runner}
        r = self.registry
        self.bars = Counter("tradeforge_live_bars", "bars processed", ["symbol"], registry=r)
        self.rejected = Counter("tradeforge_live_bars_rejected", "bar messages refused, by reason", ["reason"], registry=r)
        self.stage = Histogram("tradeforge_live_stage_seconds", "time per bar in each stage", ["stage"], registry=r,
                               buckets=_BUCKETS)
        self.orders = Counter("tradeforge_live_orders", "order transitions, by the status reached", ["status"], registry=r)
        self.fills = Counter("tradeforge_live_fills", "executions", registry=r)
        self.equity = Gauge("tradeforge_live_equity", "account equity at the last bar's close", registry=r)
        self.units = Gauge("tradeforge_live_position_units", "net position in units", ["symbol"], registry=r)
        self.kill = Gauge("tradeforge_live_kill_switch", "0 off, 1 reduce only, 2 halt", registry=r)
        self.last_bar = Gauge("tradeforge_live_last_bar_timestamp_seconds", "open of the last bar processed",
                              ["symbol"], registry=r)
        self.model_version = Gauge("tradeforge_live_model_version", "the model version serving", registry=r)
        self.info = labels
        self._stage = {s: self.stage.labels(s) for s in STAGES}

    def observe(self, stage: str, seconds: float) -> None:
        self._stage[stage].observe(seconds)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Start the HTTP endpoint (a daemon thread); returns the port (0 picks a free one)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server.server_port
