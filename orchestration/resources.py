"""The resources of the code location, configured from the environment (see README).

Secrets stay ``EnvVar`` references: Dagster resolves them at run time and never shows them.
A vendor is configured when its key (or its switch) is in the environment; the synthetic
market, Dukascopy and file import are always there. A setting that cannot work (a route to
a vendor that does not exist or is not configured, a budget that is not a number) fails
here, when the code location loads, with one line naming the variable.
"""

from __future__ import annotations

import os
from typing import Any

from dagster import EnvVar

from resources.conventions import MarketConventionsResource
from resources.external.calendar import EconomicCalendarResource
from resources.external.fred import FredResource
from resources.external.yahoo import YahooFinanceResource
from resources.market_data import MarketDataResource, SyntheticMarketResource, check_vendor_names
from resources.bus.resource import bus_from_env
from resources.registry.resource import registry_from_env
from resources.training import training_from_env
from resources.vendors.dukascopy import DukascopyResource
from resources.vendors.files import FileImportResource
from resources.vendors.polygon import PolygonResource
from resources.warehouse import warehouse_from_env


class ConfigurationError(ValueError):
    """A setting in the environment that cannot work; its message is one line naming it."""


_ROUTING_SETTINGS = {"primary": "TRADEFORGE_PRIMARY_VENDOR", "backups": "TRADEFORGE_BACKUP_VENDORS", "routes": "TRADEFORGE_ROUTES"}


def _budget(env: dict[str, str], vendor: str) -> dict[str, float]:
    """``retry_budget_s`` from ``<VENDOR>_RETRY_BUDGET_S`` or ``TRADEFORGE_RETRY_BUDGET_S``, where set."""
    for name in (f"{vendor}_RETRY_BUDGET_S", "TRADEFORGE_RETRY_BUDGET_S"):
        if env.get(name):
            try:
                seconds = float(env[name])
            except ValueError:
                raise ConfigurationError(f"{name}: {env[name]!r} is not a number of seconds") from None
            if not seconds > 0:
                raise ConfigurationError(f"{name}: {env[name]!r} must be more than 0 seconds")
            return {"retry_budget_s": seconds}
    return {}


def _urls(env: dict[str, str], **names: str) -> dict[str, str]:
    """Endpoint overrides (a proxy, a mirror, a test stub): field -> value where set."""
    return {field: env[name] for field, name in names.items() if env.get(name)}


def parse_routes(text: str) -> dict[str, list[str]]:
    """``"XAUUSD=polygon,dukascopy;EURUSD=files"`` -> ``{"XAUUSD": ["polygon", "dukascopy"], ...}``."""
    routes = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        symbol, sep, names = part.partition("=")
        if not sep or not names.strip():
            raise ConfigurationError(f"TRADEFORGE_ROUTES: entry {part!r} is not SYMBOL=vendor[,backup...]")
        routes[symbol.strip().upper()] = [n.strip() for n in names.split(",") if n.strip()]
    return routes


def market_data_from_env(env: dict[str, str] | None = None) -> MarketDataResource:
    env = dict(os.environ if env is None else env)
    seed: Any = EnvVar.int("TRADEFORGE_SYNTHETIC_SEED") if env.get("TRADEFORGE_SYNTHETIC_SEED") else 7
    polygon = (
        PolygonResource(api_key=EnvVar("POLYGON_API_KEY"), **_urls(env, base_url="POLYGON_BASE_URL"), **_budget(env, "POLYGON"))
        if env.get("POLYGON_API_KEY") else None
    )
    routing = {
        "primary": env.get("TRADEFORGE_PRIMARY_VENDOR", "").strip() or "synthetic",
        "backups": [n.strip() for n in env.get("TRADEFORGE_BACKUP_VENDORS", "").split(",") if n.strip()],
        "routes": parse_routes(env.get("TRADEFORGE_ROUTES", "")),
    }
    configured = ["synthetic", "dukascopy", "files", *(["polygon"] if polygon else [])]
    problem = check_vendor_names(**routing, configured=configured, settings=_ROUTING_SETTINGS)
    if problem:
        raise ConfigurationError(problem)
    return MarketDataResource(
        synthetic=SyntheticMarketResource(seed=seed),
        polygon=polygon,
        dukascopy=DukascopyResource(**_urls(env, base_url="DUKASCOPY_URL"), **_budget(env, "DUKASCOPY")),
        files=FileImportResource(**_urls(env, directory="TRADEFORGE_IMPORTS")),
        **routing,
    )


def resources_from_env() -> dict[str, Any]:
    """Embedded defaults unless the environment names production services."""
    env = dict(os.environ)
    calendar_dir = os.path.join(env["TRADEFORGE_IMPORTS"], "calendar") if env.get("TRADEFORGE_IMPORTS") else ""
    return {
        "warehouse": warehouse_from_env(),
        "market_data": market_data_from_env(env),
        "conventions": MarketConventionsResource(day_boundary=env.get("TRADEFORGE_DAY_BOUNDARY", "utc")),
        "fred": FredResource(api_key=EnvVar("FRED_API_KEY"), **_urls(env, base_url="FRED_BASE_URL"), **_budget(env, "FRED")),
        "yahoo": YahooFinanceResource(**_urls(env, proxy="YAHOO_PROXY"), **_budget(env, "YAHOO")),
        "calendar": EconomicCalendarResource(
            directory=calendar_dir, **_urls(env, feed_url="CALENDAR_FEED_URL"), **_budget(env, "CALENDAR")
        ),
        # training: MLflow, NATS, model specs
        "registry": registry_from_env(),
        "bus": bus_from_env(),
        "training": training_from_env(),
    }
