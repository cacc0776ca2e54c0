"""MetaTrader 5 behind the broker port: :class:`MT5Broker` over the ``MetaTrader5`` package
(Windows, next to the terminal) or :class:`~resources.brokers.mt5.fake.FakeTerminal` (tests,
dry runs). No Dagster here: the live runner imports this package."""
