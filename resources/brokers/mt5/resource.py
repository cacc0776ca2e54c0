"""Dagster's handle on the MetaTrader 5 terminal (for jobs that sample the broker on the
Windows machine). Thin: it builds the plain classes from ``EnvVar``s; the live runner uses
:class:`~resources.brokers.mt5.broker.MT5Broker` directly and never imports this module."""

from __future__ import annotations

from dagster import ConfigurableResource
from pydantic import Field

from resources.brokers.mt5.broker import MT5Broker, MT5Config, load_mt5_module, magic_number
from resources.brokers.mt5.sampler import BrokerDataSampler


class MT5Resource(ConfigurableResource):
    """``login``/``password``/``server`` from ``MT5_LOGIN``, ``MT5_PASSWORD``, ``MT5_SERVER``
    (secrets: pass ``EnvVar``s); ``path`` of ``terminal64.exe`` when more than one is installed."""

    login: int | None = Field(default=None, description="trade account number (MT5_LOGIN)")
    password: str | None = Field(default=None, description="account password (MT5_PASSWORD)")
    server: str | None = Field(default=None, description="trade server name, e.g. Broker-Demo (MT5_SERVER)")
    path: str | None = Field(default=None, description="terminal64.exe to start (MT5_TERMINAL_PATH)")
    strategy: str = Field(default="default", description="the strategy whose magic number marks our orders")
    symbols: list[str] = Field(default_factory=list)
    server_utc_offset_s: int | None = Field(default=None, description="the trade server's time zone; measured when unset")

    def get_broker(self) -> MT5Broker:
        broker = MT5Broker(load_mt5_module(), MT5Config(magic=magic_number(self.strategy), symbols=tuple(self.symbols),
                                                        server_utc_offset_s=self.server_utc_offset_s))
        broker.connect(login=self.login, password=self.password, server=self.server, path=self.path)
        return broker

    def get_sampler(self) -> BrokerDataSampler:
        broker = self.get_broker()
        return BrokerDataSampler(broker.mt5, self.symbols, server_utc_offset_s=broker.offset_s,
                                 magics=[broker.config.magic])
