"""File import: ticks or bars a user already has, as CSV or Parquet.

Files live under ``directory/<SYMBOL>/`` (any names, any number). Each file's layout is
recognised from its first line (MT5 history export, HistData ASCII, Dukascopy/JForex CSV,
tradeforge's own columns) or given by a column mapping. ``tradeforge import`` validates a
file completely before it joins the folder and stores it there as a normalised Parquet file
(UTC times, tradeforge's column names, the bars' timeframe), so a rejected file never reaches
the folder and a range run reads each file fast; files dropped into the folder by hand are
read as they are.

The vendor then serves them through the same interface as a network vendor, so imported
days flow through validation, quarantine, candles and features like any other. Bars keep
their own timeframe (an H1 export makes H1 and longer bars, never M1 ones). A row is a
duplicate only when another file holds the same row as often: ``vendor_seq`` is the row's
content and its occurrence within its file, so identical prints in one file stay separate
fills while two overlapping exports of the same history do not count twice.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import polars as pl
from pydantic import Field

from models.market.ticks import TS
from models.market.timeframes import ALL_TIMEFRAMES, Timeframe
from resources.vendors.base import VENDOR_M1_SCHEMA, MarketDataVendor, VendorPayloadError, VendorRequestError

SUFFIXES = (".csv", ".txt", ".parquet")
ISO = "iso"
"""``ts_format`` of ISO 8601 text with or without an offset (naive text is read in the layout's zone)."""


@dataclass(frozen=True, slots=True)
class FileLayout:
    """How to read one kind of file. ``columns`` maps tradeforge's names to the file's;
    the timestamp is ``ts`` or ``date`` + ``time`` joined by a space, parsed by ``ts_format``
    (``epoch_ms`` for milliseconds since 1970, ``iso`` for ISO 8601) in ``timezone``."""

    kind: str  # "ticks" | "bars"
    columns: dict[str, str]
    ts_format: str
    separator: str = ","
    has_header: bool = True
    timezone: str = "UTC"
    timeframe: str | None = None  # bars: the interval when the format fixes it (HistData M1), else detected


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
                              has_header=False, timezone="Etc/GMT+5", timeframe="M1"),
    # Dukascopy / JForex historical data export.
    "dukascopy_ticks": FileLayout("ticks", {"ts": "Gmt time", "ask": "Ask", "bid": "Bid", "ask_size": "AskVolume",
                                            "bid_size": "BidVolume"}, "%d.%m.%Y %H:%M:%S%.3f"),
    "dukascopy_bars": FileLayout("bars", {"ts": "Gmt time", "open": "Open", "high": "High", "low": "Low",
                                          "close": "Close", "volume": "Volume"}, "%d.%m.%Y %H:%M:%S%.3f"),
    # tradeforge's own column names, timestamps as ISO text (an offset, or the --timezone) or datetimes.
    "tradeforge_ticks": FileLayout("ticks", {c: c for c in ("ts", "bid", "ask", "bid_size", "ask_size", "price", "size")}, ISO),
    "tradeforge_bars": FileLayout("bars", {c: c for c in ("ts", "timeframe", "open", "high", "low", "close", "volume",
                                                          "tick_count")}, ISO),
}

_REQUIRED = {"ticks": {"ts", "date", "time"}, "bars": {"ts", "date", "time", "open", "high", "low", "close"}}
_PRICES = {"ticks": {"bid", "ask", "price"}, "bars": {"close"}}  # at least one of these
_TEXT_COLUMNS = {"timeframe"}
KNOWN_NAMES = ("ts", "date", "time", "bid", "ask", "bid_size", "ask_size", "price", "size",
               "open", "high", "low", "close", "volume", "tick_count")


def detect_layout(path: Path) -> str:
    """The :data:`LAYOUTS` name that fits a file's first line; a clear error if none does."""
    if path.suffix.lower() == ".parquet":
        names = set(_parquet_schema(path))
        return "tradeforge_bars" if {"open", "close"} <= names else "tradeforge_ticks"
    with path.open("rb") as handle:
        head = handle.read(4096)
    if b"\x00" in head or head.startswith(b"PAR1"):
        raise VendorPayloadError(f"{path}: binary content, not a CSV text file (CSV, TXT or Parquet import)")
    first = head.decode("utf-8-sig", errors="replace").splitlines()[0].strip() if head.strip() else ""
    if not first:
        raise VendorPayloadError(f"{path}: empty file")
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
    raise VendorPayloadError(
        f"{path}: unknown file layout (first line {first[:80]!r}); give a column mapping, "
        f"e.g. --columns ts=Time,bid=Bid,ask=Ask (names: {', '.join(KNOWN_NAMES)})"
    )


def _parquet_schema(path: Path) -> pl.Schema:
    try:
        return pl.read_parquet_schema(path)
    except Exception as exc:  # polars raises several kinds for a damaged file
        raise VendorPayloadError(f"{path}: not a readable Parquet file ({type(exc).__name__}: {exc})") from None


def read_file(path: Path, layout: FileLayout, start: datetime | None = None, end: datetime | None = None) -> pl.DataFrame:
    """Rows of one file with ``start <= ts < end`` (all rows when unbounded), in
    tradeforge's names, ts in UTC. A file that cannot be read as ``layout`` is a
    :class:`VendorPayloadError` naming it."""
    try:
        if path.suffix.lower() == ".parquet":
            _parquet_schema(path)
            frame = pl.scan_parquet(path)
        else:
            frame = pl.scan_csv(path, separator=layout.separator, has_header=layout.has_header,
                                infer_schema=False, truncate_ragged_lines=True)
        names = frame.collect_schema().names()
    except VendorPayloadError:
        raise
    except Exception as exc:
        raise VendorPayloadError(f"{path}: cannot be read as {layout.kind} ({type(exc).__name__}: {exc})") from None
    required = _REQUIRED[layout.kind] & set(layout.columns)
    missing = sorted(layout.columns[c] for c in required if layout.columns[c] not in names)
    if missing or not (_PRICES[layout.kind] & {c for c, theirs in layout.columns.items() if theirs in names}):
        raise VendorPayloadError(f"{path}: lacks column(s) {missing or sorted(_PRICES[layout.kind])}; has {names}")
    wanted = {ours: theirs for ours, theirs in layout.columns.items() if ours not in ("date", "time", "ts") and theirs in names}
    window = pl.lit(True)
    if start is not None:
        window = window & (pl.col("ts") >= start)
    if end is not None:
        window = window & (pl.col("ts") < end)
    try:
        rows = frame.select(_timestamp(layout, frame.collect_schema()), *(
            pl.col(theirs).cast(pl.String if ours in _TEXT_COLUMNS else pl.Float64, strict=False).alias(ours)
            for ours, theirs in wanted.items()
        )).filter(window).collect()
    except pl.exceptions.PolarsError as exc:
        raise VendorPayloadError(f"{path}: timestamps do not parse as {layout.ts_format!r} in {layout.timezone}: {exc}") from None
    except Exception as exc:
        raise VendorPayloadError(f"{path}: cannot be read ({type(exc).__name__}: {exc})") from None
    return rows


def _timestamp(layout: FileLayout, schema: pl.Schema) -> pl.Expr:
    """The file's time as a UTC datetime; unparseable text is an error, not a silent null."""
    cols = layout.columns
    if "date" in cols:
        text = pl.concat_str(pl.col(cols["date"]), pl.lit(" "), pl.col(cols["time"]))
    elif isinstance(schema[cols["ts"]], pl.Datetime):
        column = pl.col(cols["ts"])
        zoned = column.dt.replace_time_zone(layout.timezone) if schema[cols["ts"]].time_zone is None else column
        return zoned.dt.convert_time_zone("UTC").cast(TS).alias("ts")
    else:
        text = pl.col(cols["ts"])
    if layout.ts_format == "epoch_ms":
        return pl.from_epoch(text.cast(pl.Int64), time_unit="ms").dt.replace_time_zone("UTC").cast(TS).alias("ts")
    if layout.ts_format == ISO:
        text = text.str.strip_chars().str.replace("T", " ", literal=True)
        zoned = text.str.to_datetime("%Y-%m-%d %H:%M:%S%.f%#z", strict=False, time_unit="ms")
        naive = text.str.to_datetime("%Y-%m-%d %H:%M:%S%.f", strict=False, time_unit="ms")
        parsed = pl.coalesce(zoned, naive.dt.replace_time_zone(layout.timezone).dt.convert_time_zone("UTC"))
        # text that parses neither way fails the strict parse below, naming the value
        parsed = pl.when(text.is_null() | parsed.is_not_null()).then(parsed).otherwise(
            text.str.to_datetime("%Y-%m-%d %H:%M:%S%.f%#z", strict=True, time_unit="ms"))
        return parsed.dt.convert_time_zone("UTC").cast(TS).alias("ts")
    parsed = text.str.strip_chars().str.to_datetime(layout.ts_format, strict=True, time_unit="ms")
    if "%z" not in layout.ts_format and "%#z" not in layout.ts_format:
        parsed = parsed.dt.replace_time_zone(layout.timezone)
    return parsed.dt.convert_time_zone("UTC").cast(TS).alias("ts")


def bar_timeframe(ts: pl.Series, what: str) -> Timeframe:
    """The timeframe of a file's bars: the most common spacing of consecutive bars (weekends
    and holidays make longer gaps, never shorter ones). A spacing that is no timeframe, or a
    single bar, is an error naming the file."""
    spacing = ts.unique().sort().diff().drop_nulls()
    if spacing.is_empty():
        raise VendorPayloadError(f"{what}: one bar only; the bar interval cannot be told (import at least two bars)")
    minutes = spacing.dt.total_seconds().mode().min() / 60
    for tf in ALL_TIMEFRAMES:
        if tf.minutes == minutes:
            return tf
    raise VendorPayloadError(
        f"{what}: bars are {minutes:g} minutes apart, which is no timeframe tradeforge knows "
        f"({', '.join(f'{tf.value}={tf.minutes}' for tf in ALL_TIMEFRAMES)} minutes)"
    )


@lru_cache(maxsize=64)
def _file_timeframe(path: str, mtime_ns: int, size: int, layout: FileLayout) -> Timeframe:
    """A hand-dropped bar file's timeframe, from all its bars (cached per file version)."""
    return bar_timeframe(read_file(Path(path), layout)["ts"], path)


def with_vendor_seq(rows: pl.DataFrame) -> pl.DataFrame:
    """``vendor_seq`` = the row's content and its occurrence among identical rows of its
    file: identical prints in one file differ; the same row in two files does not."""
    content = pl.struct(sorted(c for c in rows.columns if c not in ("symbol", "source"))).hash(seed=7)
    occurrence = pl.int_range(pl.len()).over(content).cast(pl.UInt64)
    return rows.with_columns((content ^ (occurrence * 0x9E3779B97F4A7C15)).reinterpret(signed=True).alias("vendor_seq"))


class FileImportResource(MarketDataVendor):
    """Serves files under ``directory/<SYMBOL>/``: ``*.csv``, ``*.txt``, ``*.parquet``."""

    directory: str = Field(default="", description="root of the imports; empty: $TRADEFORGE_HOME/imports")
    layout: str = Field(default="auto", description=f"'auto' (recognise each file), 'custom', or one of {sorted(LAYOUTS)}")
    columns: dict[str, str] = Field(default={}, description="custom layout: tradeforge name -> file column (ts or date+time, bid, ask, open, ...)")
    kind: str = Field(default="ticks", description="custom layout: 'ticks' or 'bars'")
    ts_format: str = Field(default=ISO, description="custom layout: strftime pattern, 'iso' or 'epoch_ms'")
    separator: str = Field(default=",", description="custom layout: field separator")
    timezone: str = Field(default="", description="time zone of the files' times; empty: the layout's own (UTC, EST for HistData)")
    source_name: str = Field(default="file", description="stored in the rows' source column")

    @property
    def source(self) -> str:
        return self.source_name

    def fetch_days(self, symbol: str) -> int:
        # files are local: a month of ticks fits in memory, a year of bars easily
        return 31 if self.serves_ticks(symbol) else 366

    def root(self) -> Path:
        from resources.warehouse.client import default_home

        return Path(self.directory) if self.directory else default_home() / "imports"

    def serves_ticks(self, symbol: str) -> bool:
        return bool(self._files(symbol, "ticks"))

    def has_files(self, symbol: str) -> bool:
        folder = self.root() / symbol
        return folder.is_dir() and any(p.is_file() and p.suffix.lower() in SUFFIXES for p in folder.iterdir())

    def fetch_ticks(self, symbol: str, start: datetime, end: datetime) -> pl.DataFrame:
        frames = [with_vendor_seq(read_file(path, layout, start, end)) for path, layout in self._files(symbol, "ticks")]
        if not frames:
            return pl.DataFrame(schema={"ts": TS, "symbol": pl.String(), "source": pl.String()})
        rows = pl.concat(frames, how="diagonal_relaxed").sort("ts", maintain_order=True)
        return rows.with_columns(pl.lit(symbol).alias("symbol"), pl.lit(self.source).alias("source"))

    def fetch_bars(self, symbol: str, start: datetime, end: datetime) -> pl.DataFrame | None:
        files = self._files(symbol, "bars")
        if not files:
            return None
        frames = []
        for path, layout in files:
            rows = read_file(path, layout, start, end)
            if "timeframe" not in rows.columns:
                stat = path.stat()
                tf = layout.timeframe or _file_timeframe(str(path), stat.st_mtime_ns, stat.st_size, layout).value
                rows = rows.with_columns(pl.lit(tf).alias("timeframe"))
            frames.append(rows)
        rows = pl.concat(frames, how="diagonal_relaxed")
        filled = rows.with_columns(
            *(pl.lit(None, pl.Float64).alias(c) for c in ("volume", "tick_count") if c not in rows.columns)
        ).with_columns(
            pl.col("volume").fill_null(0.0), pl.col("close").alias("vwap"),
            pl.col("tick_count").fill_null(1).clip(lower_bound=1),
        )
        return filled.select("timeframe", *VENDOR_M1_SCHEMA).cast({"timeframe": pl.String(), **VENDOR_M1_SCHEMA}).sort("ts")  # type: ignore[arg-type]

    def _files(self, symbol: str, kind: str) -> list[tuple[Path, FileLayout]]:
        folder = self.root() / symbol
        if not folder.is_dir():
            return []
        found = []
        for path in sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SUFFIXES):
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
        return replace(base, timezone=self.timezone) if self.timezone else base
