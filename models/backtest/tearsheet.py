"""The tearsheet: one self-contained HTML page a trader reads after a run.

Equity against buy and hold, drawdown, monthly returns heat map, trade PnL distribution,
rolling Sharpe and exposure, under the table of headline numbers. Pure: returns figures and
the HTML text; writing it to a file is the caller's business.
"""

from __future__ import annotations

import html
import math

import numpy as np
import plotly.graph_objects as go
import polars as pl

from models.backtest import metrics as M
from models.backtest.runner import BacktestResult

_MAX_POINTS = 4000
_MONTHS = ["Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec"]


def _thin(frame: pl.DataFrame) -> pl.DataFrame:
    """At most ~4,000 points per line: every k-th bar, and the last one."""
    step = max(1, frame.height // _MAX_POINTS)
    return frame.gather_every(step) if step > 1 else frame


def _layout(fig: go.Figure, title: str, height: int = 320) -> go.Figure:
    fig.update_layout(title=title, height=height, margin=dict(l=50, r=20, t=40, b=30), template="plotly_white",
                      legend=dict(orientation="h", y=1.12))
    return fig


def figures(result: BacktestResult, rolling_days: int = 63) -> dict[str, go.Figure]:
    eq = _thin(result.equity)
    figs: dict[str, go.Figure] = {}
    fig = go.Figure(go.Scatter(x=eq["ts"], y=eq["equity"], name="strategy", line=dict(width=1.5)))
    if "buy_hold" in eq.columns:
        fig.add_trace(go.Scatter(x=eq["ts"], y=eq["buy_hold"], name="buy and hold", line=dict(width=1, dash="dot")))
    figs["equity"] = _layout(fig, "Equity (account currency)")
    figs["drawdown"] = _layout(go.Figure(go.Scatter(x=eq["ts"], y=eq["drawdown"] * 100, fill="tozeroy", name="drawdown",
                                                    line=dict(color="firebrick", width=1))), "Drawdown (%)", 240)
    # monthly returns from month-end equity
    monthly = (result.equity.group_by_dynamic("ts", every="1mo").agg(pl.col("equity").last())
               .with_columns(ret=pl.col("equity") / pl.col("equity").shift(1, fill_value=result.config.initial_equity) - 1))
    years = sorted(set(monthly["ts"].dt.year().to_list()))
    z = np.full((len(years), 12), np.nan)
    for ts, ret in zip(monthly["ts"].to_list(), monthly["ret"].to_list()):
        z[years.index(ts.year), ts.month - 1] = ret * 100
    figs["monthly"] = _layout(go.Figure(go.Heatmap(z=z, x=_MONTHS, y=[str(y) for y in years], colorscale="RdYlGn", zmid=0,
                                                   text=np.where(np.isnan(z), "", np.round(z, 2).astype(str)),
                                                   texttemplate="%{text}", hovertemplate="%{y} %{x}: %{z:.2f}%<extra></extra>")),
                              "Monthly returns (%)", 120 + 40 * len(years))
    closed = result.trades.filter(pl.col("exit_ts").is_not_null())
    figs["trades"] = _layout(go.Figure(go.Histogram(x=closed["pnl"], nbinsx=50, name="trades", marker_color="steelblue")),
                             f"Trade PnL ({closed.height} closed trades)", 260)
    ts = result.equity["ts"].dt.epoch("ms").to_numpy()
    days, day_eq = M.daily_equity(ts, result.equity["equity"].to_numpy())
    daily = M.returns_from_equity(day_eq, result.config.initial_equity)
    window = max(5, min(rolling_days, len(daily) // 3 or 5))
    periods = int(result.metrics.get("periods_per_year", 252))
    if len(daily) > window:
        view = np.lib.stride_tricks.sliding_window_view(daily, window)
        std = view.std(axis=1, ddof=1)
        with np.errstate(divide="ignore", invalid="ignore"):
            rolling = np.where(std > 0, view.mean(axis=1) / std * math.sqrt(periods), np.nan)
        x = (days[window - 1:] * 86_400_000).astype("datetime64[ms]")
    else:
        rolling, x = np.array([]), np.array([], dtype="datetime64[ms]")
    figs["rolling_sharpe"] = _layout(go.Figure(go.Scatter(x=x, y=rolling, name=f"{window}-day Sharpe")),
                                     f"Rolling Sharpe ({window} days, annualised)", 240)
    figs["exposure"] = _layout(go.Figure(go.Scatter(x=eq["ts"], y=eq["exposure"], fill="tozeroy", name="exposure",
                                                    line=dict(width=1))), "Exposure (gross notional / equity)", 220)
    return figs


def _fmt(name: str, value) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if name in {"total_return", "annual_return", "annual_volatility", "max_drawdown", "max_drawdown_daily", "win_rate",
                    "exposure", "costs_pct", "buy_hold_return", "return"}:
            return f"{value:.2%}"
        return f"{value:,.3f}" if abs(value) < 1000 else f"{value:,.0f}"
    return html.escape(str(value))


def _table(frame: pl.DataFrame) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in frame.columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(c, v) if not hasattr(v, 'strftime') else f'{v:%Y-%m-%d %H:%M}'}</td>"
                                    for c, v in zip(frame.columns, row)) + "</tr>" for row in frame.iter_rows())
    return f'<table class="rows"><tr>{head}</tr>{body}</table>'


def tearsheet_html(result: BacktestResult, title: str | None = None, tables: dict[str, pl.DataFrame] | None = None,
                   note: str = "") -> str:
    """The page; ``tables`` are shown under the figures (a model backtest's folds), ``note``
    under the title (what was tested, how)."""
    figs = figures(result)
    title = title or f"{result.strategy}: {', '.join(result.symbols)} {result.timeframe}"
    start, end = result.equity["ts"][0], result.equity["ts"][-1]
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{_fmt(k, v)}</td></tr>" for k, v in result.metrics.items())
    body = []
    for i, fig in enumerate(figs.values()):
        body.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0), config={"displaylogo": False}))
    extra = "".join(f"<h3>{html.escape(name)}</h3>{_table(frame)}" for name, frame in (tables or {}).items())
    note = f"<p>{html.escape(note)}</p>" if note else ""
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:system-ui,sans-serif;margin:24px;color:#222}} table{{border-collapse:collapse;font-size:13px}}
th{{text-align:left;padding:2px 12px 2px 0;font-weight:500;color:#555}} td{{text-align:right;padding:2px 0}}
.grid{{display:grid;grid-template-columns:300px 1fr;gap:24px}} table.rows td,table.rows th{{padding:2px 10px}}</style></head><body>
<h2>{html.escape(title)}</h2><p>{start:%Y-%m-%d %H:%M} .. {end:%Y-%m-%d %H:%M} UTC, {result.equity.height:,} bars,
initial equity {result.config.initial_equity:,.2f} {html.escape(result.config.account_currency)}</p>{note}
<div class="grid"><table>{rows}</table><div>{''.join(body)}</div></div>{extra}</body></html>"""
