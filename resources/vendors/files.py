"""File import: ticks or one-minute bars a user already has, as CSV or Parquet.

Files live under ``directory/<SYMBOL>/`` (any names, any number). Each file's layout is
recognised from its first line (MT5 history export, HistData ASCII, Dukascopy/JForex CSV,
tradeforge's own columns) or given by a column mapping. The file vendor then serves them
through the same interface as a network vendor, so imported days flow through validation,
quarantine, candles and features like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import polars as pl
from pydantic import Field

from models.market.ticks import TS
from resources.vendors.base import VENDOR_M1_SCHEMA, MarketDataVendor, VendorPayloadError, VendorRequestError, empty_m1


@dataclass(frozen=True, slots=True)
class FileLayout:
    """How to read one kind of file. ``columns`` maps tradeforge's names to the file's;
    the timestamp is ``ts`` or ``date`` + ``time`` joined by a space, parsed by ``ts_format``
    (``epoch_ms`` for milliseconds since 1970) in ``timezone``."""

    kind: str  # "ticks" | "bars"
    columns: dict[str, str]
    ts_format: str
    separator: str = ","
    has_header: bool = True
    timezone: str = "UTC"


LAYOUTS: dict[str, FileLayout] = {
    # MetaTrader 5 "Export ticks/bars" (tab-separated); times are the broker's server time.
    "mt5_ticks": FileLayout("ticks", {"date": "<DATE>", "time": "<TIME>", "bid": "<BID>", "ask": "<ASK>",
                                       "price": "<LAST>", "size": "<VOLUME>"}, "%Y.%m.%d %H:%M:%S%.3f", "\t"),
    "mt5_bars": FileLayout("bars", {"date": "<DATE>", "time": "<TIME>", "open": "<OPEN>", "high": "<HIGH>",
                                     "low": "<LOW>", "close": "<CLOSE>", "tick_count": "<TICKVOL>"}, "%Y.%m.%d %H:%M:%S", "\t"),
    # HistData.com ASCII: no header, Eastern Standard Time all year (UTC-5, no DST).
    "histdata_ticks": FileLayout("ticks", {"ts": "column_0", "bid": "column_1", "ask": "column_2"},
                                 "%Y%m%d %H%M%S%3f", ",", has_header=False, timezone="Etc/GMT+5"),
    "histdata_m1": FileLayout("bars", {"ts": "column_0", "open": "column_1", "high": "column_2", "low": "column_3",
                                        "close": "column_4", "volume": "column_5"}, "%Y%m%d %H%M%S", ";",
                              has_header=False, timezone="Etc/GMT+5"),
    # Dukascopy / JForex historical data export.
    "dukascopy_ticks": FileLayout("ticks", {"ts": "Gmt time", "ask": "Ask", "bid": "Bid", "ask_size": "AskVolume",
                                            "bid_size": "BidVolume"}, "%d.%m.%Y %H:%M:%S%.3f"),
    "dukascopy_bars": FileLayout("bars", {"ts": "Gmt time", "open": "Open", "high": "High", "low": "Low",
                                          "close": "Close", "volume": "Volume"}, "%d.%m.%Y %H:%M:%S%.3f"),
    # tradeforge's own column names, timestamps as ISO text or epoch milliseconds.
    "tradeforge_ticks": FileLayout("ticks", {c: c for c in ("ts", "bid", "ask", "bid_size", "ask_size", "price", "size")},
                                   "%Y-%m-%dT%H:%M:%S%.f%#z"),
    "tradeforge_bars": FileLayout("bars", {c: c for c in ("ts", "open", "high", "low", "close", "volume")},
                                  "%Y-%m-%dT%H:%M:%S%.f%#z"),
}


_REQUIRED = {"ticks": {"ts", "date", "time"}, "bars": {"ts", "date", "time", "open", "high", "low", "close"}}
_PRICES = {"ticks": {"bid", "ask", "price"}, "bars": {"close"}}  # at least one of these


def detect_layout(path: Path) -> str:
    """The :data:`LAYOUTS` name that fits a file's first line; a clear error if none does."""
    if path.suffix.lower() == ".parquet":
        names = set(pl.read_parquet_schema(path))
        return "tradeforge_bars" if {"open", "close"} <= names else "tradeforge_ticks"
    with path.open("r", encoding="utf-8-sig", errors="replace") as handle:
        first = handle.readline().strip()
    if first.startswith("<DATE>"):
        return "mt5_ticks" if "<BID>" in first else "mt5_bars"
    if first.startswith(("Gmt time", "Local time")):
        return "dukascopy_ticks" if "Ask" in first.split(",")[1:3] else "dukascopy_bars"
    if first[:8].isdigit() and first[8:9] == " ":
        return "histdata_m1" if ";" in first else "histdata_ticks"
    header = set(first.split(","))
    if {"ts", "open", "close"} <= header:
        return "tradeforge_bars"
    if {"ts", "bid", "ask"} <= header or {"ts", "price"} <= header:
        return "tradeforge_ticks"
    raise VendorPayloadError(f"{path}: unknown file layout (first line {first[:80]!r}); give a column mapping")


def read_file(path: Path, layout: FileLayout, start: datetime, end: datetime) -> pl.DataFrame:
    """Rows of one file with ``start <= ts < end``, in tradeforge's names, ts in UTC."""
    if path.suffix.lower() == ".parquet":
        frame = pl.scan_parquet(path)
    else:
        frame = pl.scan_csv(path, separator=layout.separator, has_header=layout.has_header,
                            infer_schema=False, truncate_ragged_lines=True)
    names = frame.collect_schema().names()
    required = _REQUIRED[layout.kind] & set(layout.columns)
    missing = sorted(layout.columns[c] for c in required if layout.columns[c] not in names)
    if missing or not (_PRICES[layout.kind] & {c for c, theirs in layout.columns.items() if theirs in names}):
        raise VendorPayloadError(f"{path}: lacks column(s) {missing or sorted(_PRICES[layout.kind])}; has {names}")
    wanted = {ours: theirs for ours, theirs in layout.columns.items() if ours not in ("date", "time", "ts") and theirs in names}
    try:
        rows = frame.select(_timestamp(layout, frame.collect_schema()), *(
            pl.col(theirs).cast(pl.Float64, strict=False).alias(ours) for ours, theirs in wanted.items()
        )).filter((pl.col("ts") >= start) & (pl.col("ts") < end)).collect()
    except pl.exceptions.PolarsError as exc:
        raise VendorPayloadError(f"{path}: timestamps do not parse as {layout.ts_format!r} in {layout.timezone}: {exc}") from None
    return rows


def _timestamp(layout: FileLayout, schema: pl.Schema) -> pl.Expr:
    """The file's time as a UTC datetime; unparseable text is an error, not a silent null."""
    cols = layout.columns
    if "date" in cols:
        text = pl.concat_str(pl.col(cols["date"]), pl.lit(" "), pl.col(cols["time"]))
    elif isinstance(schema[cols["ts"]], pl.Datetime):
        return pl.col(cols["ts"]).dt.convert_time_zone("UTC").cast(TS).alias("ts")
    else:
        text = pl.col(cols["ts"])
    if layout.ts_format == "epoch_ms":
        return pl.from_epoch(text.cast(pl.Int64), time_unit="ms").dt.replace_time_zone("UTC").cast(TS).alias("ts")
    parsed = text.str.strip_chars().str.to_datetime(layout.ts_format, strict=True, time_unit="ms")
    if "%z" not in layout.ts_format and "%#z" not in layout.ts_format:
        parsed = parsed.dt.replace_time_zone(layout.timezone)
    return parsed.dt.convert_time_zone("UTC").cast(TS).alias("ts")


class FileImportResource(MarketDataVendor):
    """Serves files under ``directory/<SYMBOL>/``: ``*.csv``, ``*.txt``, ``*.parquet``."""

    directory: str = Field(default="", description="root of the imports; empty: $TRADEFORGE_HOME/imports")
    layout: str = Field(default="auto", description=f"'auto' (recognise each file), 'custom', or one of {sorted(LAYOUTS)}")
    columns: dict[str, str] = Field(default={}, description="custom layout: tradeforge name -> file column (ts or date+time, bid, ask, open, ...)")
    kind: str = Field(default="ticks", description="custom layout: 'ticks' or 'bars'")
    ts_format: str = Field(default="%Y-%m-%d %H:%M:%S%.f", description="custom layout: strftime pattern or 'epoch_ms'")
    separator: str = Field(default=",", description="custom layout: field separator")
    timezone: str = Field(default="", description="time zone of the files' times; empty: the layout's own (UTC, EST for HistData)")
    source_name: str = Field(default="file", description="stored in the rows' source column")

    @property
    def source(self) -> str:
        return self.source_name

    def root(self) -> Path:
        from resources.warehouse.client import default_home

        return Path(self.directory) if self.directory else default_home() / "imports"

    def fetch_ticks(self, symbol: str, start: datetime, end: datetime) -> pl.DataFrame:
        frames = [read_file(path, layout, start, end) for path, layout in self._files(symbol, "ticks")]
        if not frames:
            return pl.DataFrame(schema={"ts": TS, "symbol": pl.String(), "source": pl.String()})
        rows = pl.concat(frames, how="diagonal_relaxed").sort("ts", maintain_order=True)
        return rows.with_columns(pl.lit(symbol).alias("symbol"), pl.lit(self.source).alias("source"))

    def fetch_m1_bars(self, symbol: str, start: datetime, end: datetime) -> pl.DataFrame | None:
        files = self._files(symbol, "bars")
        if not files:
            return None
        rows = pl.concat([read_file(path, layout, start, end) for path, layout in files], how="diagonal_relaxed")
        if rows.is_empty():
            return empty_m1()
        misaligned = rows.filter(pl.col("ts").dt.truncate("1m") != pl.col("ts")).height
        if misaligned:
            raise VendorPayloadError(f"{symbol}: {misaligned} imported bars do not open on a minute: only M1 bars import")
        filled = rows.with_columns(
            *(pl.lit(None, pl.Float64).alias(c) for c in ("volume", "tick_count") if c not in rows.columns)
        ).with_columns(
            pl.col("volume").fill_null(0.0), pl.col("close").alias("vwap"),
            pl.col("tick_count").fill_null(1).clip(lower_bound=1),
        )
        return filled.select(list(VENDOR_M1_SCHEMA)).cast(VENDOR_M1_SCHEMA).unique("ts", keep="first").sort("ts")  # type: ignore[arg-type]

    def _files(self, symbol: str, kind: str) -> list[tuple[Path, FileLayout]]:
        folder = self.root() / symbol
        if not folder.is_dir():
            return []
        found = []
        for path in sorted(p for p in folder.iterdir() if p.suffix.lower() in (".csv", ".txt", ".parquet")):
            layout = self.layout_of(path)
            if layout.kind == kind:
                found.append((path, layout))
        return found

    def layout_of(self, path: Path) -> FileLayout:
        """The layout this resource reads ``path`` with."""
        if self.layout == "custom":
            if not self.columns:
                raise VendorRequestError("layout 'custom' needs a column mapping (columns: {ts: ..., bid: ..., ...})")
            return FileLayout(self.kind, dict(self.columns), self.ts_format, self.separator, True, self.timezone or "UTC")
        name = detect_layout(path) if self.layout == "auto" else self.layout
        if name not in LAYOUTS:
            raise VendorRequestError(f"unknown file layout {name!r}; known: {sorted(LAYOUTS)}")
        base = LAYOUTS[name]
        if self.timezone:
            return FileLayout(base.kind, base.columns, base.ts_format, base.separator, base.has_header, self.timezone)
        return base

