"""Routing and vendor settings are checked when the configuration loads: a vendor that does
not exist, or is not configured, is one line naming the setting, the name and the vendors
there are, from ``MarketDataResource`` itself, from ``resources_from_env`` and from Dagster
loading the code location; never a failure in the middle of a run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from orchestration.resources import ConfigurationError, market_data_from_env, resources_from_env
from resources.market_data import MarketDataResource, SyntheticMarketResource
from resources.vendors.dukascopy import DukascopyResource
from resources.vendors.polygon import PolygonResource

ROOT = Path(__file__).resolve().parents[1]
KNOWN = "known vendors: synthetic, polygon, dukascopy, files"


def test_market_data_resource_refuses_unknown_and_unconfigured_vendors():
    with pytest.raises(ValidationError, match=f"routes: there is no vendor 'polgon' \\(route of XAUUSD\\); {KNOWN}"):
        MarketDataResource(polygon=PolygonResource(api_key="k"), routes={"XAUUSD": ["polgon", "dukascopy"]})
    with pytest.raises(ValidationError, match="primary: vendor 'polygon' is not configured: set POLYGON_API_KEY; configured: synthetic"):
        MarketDataResource(primary="polygon")
    with pytest.raises(ValidationError, match="backups: vendor 'files' is not configured; configured: dukascopy, synthetic"):
        MarketDataResource(dukascopy=DukascopyResource(), backups=["files"])
    # the synthetic market needs no configuration: the default primary always routes
    market = MarketDataResource(dukascopy=DukascopyResource(), routes={"EURUSD": ["dukascopy", "synthetic"]})
    assert [v.source for v in market.route("EURUSD")] == ["dukascopy", "synthetic"]
    assert [v.source for v in market.route("XAUUSD")] == ["synthetic"]
    assert MarketDataResource(synthetic=SyntheticMarketResource(seed=3)).route("BTCUSD")[0].seed == 3


@pytest.mark.parametrize(("env", "line"), [
    ({"POLYGON_API_KEY": "k", "TRADEFORGE_ROUTES": "XAUUSD=polygon,dukascopy;EURUSD=dukascopi"},
     f"TRADEFORGE_ROUTES: there is no vendor 'dukascopi' (route of EURUSD); {KNOWN}"),
    ({"TRADEFORGE_ROUTES": "XAUUSD=polygon"},
     "TRADEFORGE_ROUTES: vendor 'polygon' (route of XAUUSD) is not configured: set POLYGON_API_KEY; configured: dukascopy, files, synthetic"),
    ({"TRADEFORGE_PRIMARY_VENDOR": "yahoo"}, f"TRADEFORGE_PRIMARY_VENDOR: there is no vendor 'yahoo'; {KNOWN}"),
    ({"TRADEFORGE_BACKUP_VENDORS": "dukascopy, poligon"}, f"TRADEFORGE_BACKUP_VENDORS: there is no vendor 'poligon'; {KNOWN}"),
    ({"TRADEFORGE_ROUTES": "XAUUSD"}, "TRADEFORGE_ROUTES: entry 'XAUUSD' is not SYMBOL=vendor[,backup...]"),
    ({"POLYGON_API_KEY": "k", "POLYGON_RETRY_BUDGET_S": "fast"}, "POLYGON_RETRY_BUDGET_S: 'fast' is not a number of seconds"),
    ({"TRADEFORGE_RETRY_BUDGET_S": "0"}, "TRADEFORGE_RETRY_BUDGET_S: '0' must be more than 0 seconds"),
])
def test_settings_that_cannot_work_fail_when_the_environment_is_read(env: dict[str, str], line: str):
    with pytest.raises(ConfigurationError) as failure:
        market_data_from_env(env)
    assert str(failure.value) == line


def test_budgets_and_routes_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    for name in ("TRADEFORGE_ROUTES", "TRADEFORGE_PRIMARY_VENDOR", "TRADEFORGE_BACKUP_VENDORS", "FRED_RETRY_BUDGET_S"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("POLYGON_API_KEY", "k")
    monkeypatch.setenv("TRADEFORGE_ROUTES", "XAUUSD=polygon,dukascopy")
    monkeypatch.setenv("TRADEFORGE_RETRY_BUDGET_S", "20")
    monkeypatch.setenv("YAHOO_RETRY_BUDGET_S", "12.5")
    monkeypatch.setenv("YAHOO_PROXY", "http://proxy.example:3128")
    resources = resources_from_env()
    market = resources["market_data"]
    assert market.routes == {"XAUUSD": ["polygon", "dukascopy"]} and market.polygon.retry_budget_s == 20.0
    assert market.dukascopy.retry_budget_s == 20.0 and resources["fred"].retry_budget_s == 20.0
    assert resources["yahoo"].retry_budget_s == 12.5 and resources["yahoo"].proxy == "http://proxy.example:3128"
    assert resources["yahoo"].session().proxies == {"http": "http://proxy.example:3128", "https": "http://proxy.example:3128"}
    assert resources["calendar"].retry_budget_s == 20.0
    monkeypatch.delenv("TRADEFORGE_RETRY_BUDGET_S")
    assert resources_from_env()["fred"].retry_budget_s == 30.0  # the default: well under a minute


def test_dagster_loading_the_code_location_names_the_bad_route(subprocess_env: dict[str, str], tmp_path: Path):
    """What `dagster definitions validate` (and the UI, and every run) meets: the line, not a
    failure in the middle of a run. The same command passes once the route is right."""
    command = [str(Path(sys.executable).with_name("dagster")), "definitions", "validate", "-w", "workspace.yaml"]
    env = {**subprocess_env, "TRADEFORGE_HOME": str(tmp_path / "home")}
    for name in ("bad", "good"):  # an instance each: two processes creating one SQLite instance at once race
        (tmp_path / name).mkdir()
    bad = subprocess.Popen(command, cwd=ROOT, env={**env, "DAGSTER_HOME": str(tmp_path / "bad"),
                                                   "TRADEFORGE_ROUTES": "XAUUSD=dukascopy;EURUSD=polgon"},
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    good = subprocess.Popen(command, cwd=ROOT, env={**env, "DAGSTER_HOME": str(tmp_path / "good"),
                                                    "TRADEFORGE_ROUTES": "XAUUSD=dukascopy;EURUSD=files,synthetic"},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    bad_out, good_out = bad.communicate(timeout=120)[0], good.communicate(timeout=120)[0]
    assert bad.returncode != 0
    assert f"ConfigurationError: TRADEFORGE_ROUTES: there is no vendor 'polgon' (route of EURUSD); {KNOWN}" in bad_out
    assert good.returncode == 0, good_out
