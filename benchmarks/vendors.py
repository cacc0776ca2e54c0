"""Client-side cost of a vendor day: how many quotes per second the Polygon path turns into
a tick frame, served by a local stub in Polygon's wire format (no network in the figure).

tradeforge drives the official client (``massive``: urllib3, JSON, one model object per
row, then polars). The baseline is the leanest reader of the same pages: ``requests`` +
``json`` + ``polars.from_dicts`` of the raw rows. The ratio is what the official client's
object model costs; the absolute rate bounds a backfill once the network is fast.
"""

from __future__ import annotations

from datetime import timedelta

import polars as pl
import requests

from benchmarks.common import best_of, synthetic_ticks
from resources.vendors.dukascopy import DukascopyResource
from resources.vendors.polygon import PolygonResource, _ns
from tests.stubs import DukascopyStub, PolygonStub, StubServer


def bench_vendors(quick: bool = False) -> dict[str, float]:
    rows = 50_000 if quick else 300_000  # a busy EURUSD day on Polygon is a few hundred thousand quotes
    ticks = synthetic_ticks("EURUSD", rows).unique(["ts", "bid", "ask"], keep="first", maintain_order=True)
    start, end = ticks["ts"].min(), ticks["ts"].max() + timedelta(milliseconds=1)
    polygon, dukascopy = PolygonStub(), DukascopyStub()
    polygon.quotes["C:EURUSD"] = ticks
    dukascopy.ticks["EUR/USD"] = ticks
    with StubServer(polygon) as p, StubServer(dukascopy) as d:
        vendor = PolygonResource(api_key="test-key", base_url=p.url)
        assert vendor.fetch_ticks("EURUSD", start, end).height == ticks.height
        client_s = best_of(lambda: vendor.fetch_ticks("EURUSD", start, end), repeat=2)

        def lean() -> pl.DataFrame:
            url, params, frames = f"{p.url}/v3/quotes/C:EURUSD", {
                "timestamp.gte": _ns(start), "timestamp.lt": _ns(end), "limit": 50_000,
            }, []
            while url:
                body = requests.get(url, params=params, headers={"Authorization": "Bearer test-key"}, timeout=60).json()
                frames.append(pl.from_dicts(body.get("results", [])))
                url, params = body.get("next_url"), None
            return pl.concat(frames)

        assert lean().height == ticks.height
        lean_s = best_of(lean, repeat=2)
        duka = DukascopyResource(base_url=d.url + "/2.0/index.php")
        assert duka.fetch_ticks("EURUSD", start, end).height == ticks.height
        duka_s = best_of(lambda: duka.fetch_ticks("EURUSD", start, end), repeat=2)
    result = {
        "quotes": ticks.height,
        "polygon_client_rows_per_s": ticks.height / client_s,
        "lean_reader_rows_per_s": ticks.height / lean_s,
        "client_overhead_x": client_s / lean_s,
        "dukascopy_rows_per_s": ticks.height / duka_s,
    }
    print(
        f"vendors: {ticks.height:,} quotes, Polygon via massive {result['polygon_client_rows_per_s'] / 1e3:,.0f}k rows/s, "
        f"lean reader {result['lean_reader_rows_per_s'] / 1e3:,.0f}k rows/s ({result['client_overhead_x']:.2f}x the time); "
        f"Dukascopy {result['dukascopy_rows_per_s'] / 1e3:,.0f}k rows/s"
    )
    return result
