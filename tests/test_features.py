"""Features and labels: registry, batch/live parity, no look-ahead, point-in-time joins."""

from __future__ import annotations

import random
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from models.market.candles import aggregate_ticks
from models.features.compute import compute_features
from models.features.external import ExternalData, event_features, symbol_events
from models.features.labels import LABEL_NAMES, compute_labels
from models.features.lookahead import lookahead_violations
from models.features.online import RollingFeatures
from models.features.registry import FAMILIES, FEATURE_NAMES, FEATURES, WARMUP_BARS, catalog_markdown, feature_set_version
from models.market.synthetic import generate_ticks
from models.market.timeframes import DayBoundary, Timeframe

EXTERNAL = {s.name for s in FEATURES if s.family == "external"}


def history(symbol: str, first: date, days: int, tf: Timeframe = Timeframe.M5) -> pl.DataFrame:
    ticks = pl.concat([generate_ticks(symbol, first + timedelta(days=i)) for i in range(days)])
    return aggregate_ticks(ticks, [tf])


@pytest.fixture(scope="module")
def btc_m5() -> pl.DataFrame:
    return history("BTCUSD", date(2024, 2, 26), 7)


def test_registry_declares_every_computed_feature_once():
    assert len(FEATURES) >= 110
    assert len(set(FEATURE_NAMES)) == len(FEATURE_NAMES)
    assert {s.family for s in FEATURES} == set(FAMILIES)
    computed = compute_features(history("EURUSD", date(2024, 3, 4), 1), Timeframe.M5)
    assert computed.columns == ["symbol", "timeframe", "ts", "close_ts", *FEATURE_NAMES]


def test_feature_set_version_follows_the_definitions():
    version = feature_set_version()
    assert version == feature_set_version()
    changed = (replace(FEATURES[0], lookback=FEATURES[0].lookback + 1), *FEATURES[1:])
    assert feature_set_version(changed) != version
    assert feature_set_version(FEATURES[:-1]) != version


def test_catalog_is_generated_from_the_registry():
    catalog = Path(__file__).resolve().parents[1] / "models" / "features" / "CATALOG.md"
    assert catalog.read_text().strip() == catalog_markdown().strip(), (
        "models/features/CATALOG.md is stale: run `tradeforge features catalog > models/features/CATALOG.md`"
    )


def _live_against_batch(
    bars: pl.DataFrame, tf: Timeframe, boundary: DayBoundary, external: ExternalData | None = None
) -> tuple[int, dict[str, float]]:
    batch = compute_features(bars, tf, boundary, external).select(FEATURE_NAMES).to_numpy().astype(np.float64)
    live = RollingFeatures(tf, boundary)
    live.seed(bars.head(WARMUP_BARS - 1))  # the runner starts from the warehouse's newest bars
    worst = np.zeros(len(FEATURE_NAMES))
    compared = 0
    for i in range(WARMUP_BARS - 1, bars.height):
        row = live.update(bars.slice(i, 1), external)
        assert live.warm and row["ts"] == bars["ts"][i]
        vector = np.array([row[name] for name in FEATURE_NAMES], dtype=np.float64)
        assert np.array_equal(np.isnan(vector), np.isnan(batch[i])), (i, [n for n, a, b in zip(FEATURE_NAMES, np.isnan(vector), np.isnan(batch[i]), strict=True) if a != b])
        worst = np.fmax(worst, np.abs(np.nan_to_num(vector - batch[i])))
        compared += 1
    return compared, {FEATURE_NAMES[k]: worst[k] for k in np.flatnonzero(worst > 1e-9)}


def test_live_vector_equals_the_batch_row_for_every_bar(btc_m5):
    """The live path (state advanced bar by bar, finite windows through the batch code) and
    the batch asset give the same features: the referee of the incremental engine."""
    compared, offenders = _live_against_batch(btc_m5, Timeframe.M5, DayBoundary.UTC)
    assert compared == btc_m5.height - WARMUP_BARS + 1 and compared > 500
    assert not offenders


def test_live_vector_equals_the_batch_row_on_m1_bars_with_daily_breaks():
    """A longer run on M1 (M15 and H1 context) through the metal's daily maintenance breaks."""
    bars = history("XAUUSD", date(2024, 3, 5), 3, Timeframe.M1)
    compared, offenders = _live_against_batch(bars, Timeframe.M1, DayBoundary.UTC)
    assert compared > 2_000 and not offenders


def test_live_vector_equals_the_batch_row_across_a_weekend_under_the_new_york_boundary():
    bars = history("EURUSD", date(2024, 2, 27), 9)  # a closed weekend inside; H4 context on the 17:00 day
    compared, offenders = _live_against_batch(bars, Timeframe.M5, DayBoundary.NEW_YORK_17)
    assert compared > 500 and not offenders


@pytest.fixture(scope="module")
def btc_external(btc_m5) -> ExternalData:
    """Values revised while the bars run (two known exactly at a bar's close), events
    announced early or late, some without a surprise."""
    rng = np.random.default_rng(3)
    closes = btc_m5["ts"].dt.offset_by("5m")
    first, last = closes[WARMUP_BARS - 1], closes[-1]
    span = (last - first).total_seconds()
    moments = [first + timedelta(seconds=float(x)) for x in rng.uniform(-86_400, span, 40)] + list(closes.gather([1600, 1700]))
    names = ["fred_fedfunds", "fred_dgs10_change", "commodity_gold_ret_1d"]
    values = pl.DataFrame({"known_at": moments, "name": [names[i % 3] for i in range(len(moments))],
                           "value": rng.normal(size=len(moments))}).with_columns(pl.col("known_at").dt.cast_time_unit("ms"))
    releases = [first + timedelta(hours=float(h)) for h in np.sort(rng.uniform(-24, span / 3600, 30))]
    events = pl.DataFrame({
        "ts": releases,
        "known_at": [t - timedelta(hours=float(h)) for t, h in zip(releases, rng.choice([-1.0, 2.0, 48.0], 30), strict=True)],
        "surprise": [None if i % 4 == 0 else float(x) for i, x in enumerate(rng.normal(size=30))],
    }).with_columns(pl.col("ts", "known_at").dt.cast_time_unit("ms"))
    return ExternalData(values=values, events=events)


def test_live_vector_equals_the_batch_row_with_external_data(btc_m5, btc_external):
    compared, offenders = _live_against_batch(btc_m5, Timeframe.M5, DayBoundary.UTC, btc_external)
    assert compared > 500 and not offenders
    batch = compute_features(btc_m5, Timeframe.M5, external=btc_external).slice(WARMUP_BARS - 1)
    assert batch["fred_fedfunds"].n_unique() > 3 and batch["event_hours_to_next"].null_count() < batch.height
    assert batch["event_last_surprise"].n_unique() > 3


def test_events_released_together_are_one_release_whatever_their_order():
    """Rows at one release time have no order (in the calendar, in a read of it): the features
    must not depend on which comes last. They count as one release: the mean surprise, known
    when the first of them was announced."""
    at = datetime(2024, 3, 8, 13, 30, tzinfo=UTC)
    calendar = pl.DataFrame({
        "ts": [at, at, at, at + timedelta(hours=2), at],
        "known_at": [at - timedelta(days=3), at - timedelta(days=1), at - timedelta(days=2), at - timedelta(days=3), at],
        "currency": ["USD", "USD", "USD", "USD", "JPY"],  # the JPY one is not EURUSD's
        "impact": ["high", "high", "high", "high", "high"],
        "actual": [275.0, 3.9, None, 1.0, 9.0],
        "forecast": [200.0, 3.7, 0.3, 2.0, 1.0],  # surprises 0.375, 0.0540..., none, -0.5
    }).with_columns(pl.col("ts", "known_at").dt.cast_time_unit("ms"))
    closes = np.array([int((at + timedelta(minutes=m)).timestamp() * 1000) for m in (-3600, -5, 0, 5, 150)], dtype=np.int64)
    results = []
    for order in ([0, 1, 2, 3, 4], [2, 1, 0, 4, 3], [1, 0, 3, 2, 4]):
        events = symbol_events(calendar[order], ("EUR", "USD"))
        results.append(event_features(closes, ExternalData(events=events).event_arrays))
    for other in results[1:]:
        for name, values in results[0].items():
            np.testing.assert_array_equal(values, other[name], err_msg=name)
    first = results[0]
    assert first["event_hours_to_next"][0] == pytest.approx(60.0)  # announced 3 days ahead by the first of them
    assert np.isnan(first["event_last_surprise"][1]) and first["event_hours_to_next"][1] == pytest.approx(5 / 60)
    assert first["event_last_surprise"][2] == pytest.approx((75 / 200 + 0.2 / 3.7) / 2)  # the mean of the two with one
    assert first["event_hours_since_last"][3] == pytest.approx(5 / 60) and first["event_hours_to_next"][3] == pytest.approx(115 / 60)
    assert first["event_last_surprise"][4] == pytest.approx(-0.5)


def test_live_refuses_bars_out_of_order(btc_m5):
    live = RollingFeatures(Timeframe.M5)
    live.update(btc_m5.slice(10, 1))
    with pytest.raises(ValueError, match="is not after the newest bar"):
        live.update(btc_m5.slice(5, 1))


@pytest.mark.parametrize("fault", [{"close": float("nan")}, {"low": 0.0}, {"high": None}, {"high": 1.0}])
def test_live_refuses_an_impossible_bar_and_its_state_stays_clean(btc_m5, fault):
    live = RollingFeatures(Timeframe.M5)
    live.seed(btc_m5.head(WARMUP_BARS - 1))
    bad = btc_m5.slice(WARMUP_BARS - 1, 1).with_columns(pl.lit(v, dtype=pl.Float64).alias(k) for k, v in fault.items())
    with pytest.raises(ValueError, match="refused, the window is unchanged"):
        live.update(bad)
    batch = compute_features(btc_m5.head(WARMUP_BARS), Timeframe.M5).row(-1, named=True)
    row = live.update(btc_m5.slice(WARMUP_BARS - 1, 1))  # the real bar, at the same time, is taken
    live_vector, batch_vector = (np.array([r[n] for n in FEATURE_NAMES], dtype=np.float64) for r in (row, batch))  # None: NaN
    assert np.allclose(live_vector, batch_vector, rtol=0, atol=1e-9, equal_nan=True)


def test_no_feature_looks_ahead_with_external_data_cut_to_what_was_known(btc_m5, btc_external):
    """The check cuts the external data too (values known by the cut's close, events announced
    or past): the as-of joins give the same values, so nothing is flagged."""
    cuts = sorted(random.Random(11).sample(range(WARMUP_BARS, btc_m5.height - 1), 12))
    full = compute_features(btc_m5, Timeframe.M5, external=btc_external)
    assert full["fred_fedfunds"].gather(cuts).null_count() < len(cuts)  # the cuts do see external values
    assert lookahead_violations(btc_m5, Timeframe.M5, cuts, full=full, external=btc_external) == {}


def test_no_feature_looks_ahead(btc_m5):
    cuts = sorted(random.Random(7).sample(range(300, btc_m5.height - 1), 25))
    assert lookahead_violations(btc_m5, Timeframe.M5, cuts) == {}
    h1 = history("EURUSD", date(2024, 3, 4), 8, Timeframe.H1)
    assert lookahead_violations(h1, Timeframe.H1, [60, 90, h1.height - 2], DayBoundary.NEW_YORK_17) == {}


def test_editing_the_future_changes_no_past_value(btc_m5):
    """The same property from the other side: rewrite every bar after ``cut`` and the
    features at ``cut`` stay exactly as they were."""
    cut = 1000
    honest = compute_features(btc_m5, Timeframe.M5).row(cut, named=True)
    doctored = btc_m5.with_columns(
        pl.when(pl.int_range(pl.len()) > cut).then(pl.col("close") * 1.5).otherwise(pl.col("close")).alias("close")
    )
    assert compute_features(doctored, Timeframe.M5).row(cut, named=True) == honest


@pytest.mark.parametrize("symbol", ["EURUSD", "XAUUSD"])
def test_warm_rows_have_every_feature(symbol):
    features = compute_features(history(symbol, date(2024, 3, 4), 10), Timeframe.M5)
    warm = features.slice(WARMUP_BARS)
    nulls = {n: c for n, c in warm.select(pl.col(FEATURE_NAMES).null_count()).row(0, named=True).items() if c}
    assert set(nulls) == EXTERNAL  # external data is null until it exists, never invented
    assert all(c == warm.height for c in nulls.values())
    values = warm.select(pl.col(FEATURE_NAMES).exclude(*EXTERNAL)).to_numpy()
    assert np.isfinite(values).all()


def test_external_values_join_as_of_when_they_became_known():
    bars = history("EURUSD", date(2024, 3, 6), 1)
    known = [datetime(2024, 3, 6, 10, tzinfo=UTC), datetime(2024, 3, 6, 14, 30, tzinfo=UTC)]
    external = pl.DataFrame({"known_at": known, "name": ["fred_fedfunds"] * 2, "value": [5.33, 5.08]})
    features = compute_features(bars, Timeframe.M5, external=ExternalData(values=external)).select("close_ts", "fred_fedfunds")
    before = features.filter(pl.col("close_ts") < known[0])
    between = features.filter((pl.col("close_ts") >= known[0]) & (pl.col("close_ts") < known[1]))
    after = features.filter(pl.col("close_ts") >= known[1])
    assert before["fred_fedfunds"].null_count() == before.height > 0
    assert set(between["fred_fedfunds"]) == {5.33}
    assert set(after["fred_fedfunds"]) == {5.08}  # the revision reaches no bar that closed before it
    with pytest.raises(ValueError, match="unregistered features"):
        compute_features(bars, Timeframe.M5, external=ExternalData(values=external.with_columns(name=pl.lit("fred_typo"))))


def test_multi_timeframe_context_uses_only_closed_higher_bars(btc_m5):
    features = compute_features(btc_m5, Timeframe.M5)
    # The H1 context changes only at bars closing on the hour, when an H1 bar has closed.
    per_hour = features.with_columns(pl.col("close_ts").dt.truncate("1h").alias("hour"))
    changes = per_hour.group_by("hour").agg(pl.col("htf1_trend").n_unique().alias("values"))
    assert changes["values"].max() == 1


def test_labels_are_exact_and_null_beyond_the_data():
    opens = [datetime(2024, 3, 6, h, tzinfo=UTC) for h in range(10)]
    closes = [100.0, 101.0, 102.0, 99.0, 98.0, 104.0, 104.0, 103.0, 105.0, 106.0]
    bars = pl.DataFrame({"ts": opens, "open": closes, "high": [c + 0.5 for c in closes],
                         "low": [c - 0.5 for c in closes], "close": closes})
    close_ts = pl.Series([t + timedelta(hours=1) for t in opens]).dt.cast_time_unit("us")
    labels = compute_labels(bars, close_ts, known_until=datetime(2024, 3, 6, 10, tzinfo=UTC))
    assert labels.columns == list(LABEL_NAMES)
    assert labels["fwd_ret_1h"][0] == pytest.approx(np.log(101 / 100))
    assert labels["fwd_ret_4h"][1] == pytest.approx(np.log(104 / 101))
    assert labels["direction_4h"][2] == 1 and labels["direction_1h"][2] == -1
    # The last bar closes at 10:00, the end of the data: no 1h label for it yet.
    assert labels["fwd_ret_1h"][9] is None and labels["fwd_ret_1h"][8] is not None
    assert labels["fwd_ret_1d"].null_count() == 10
    # With the data extended, the same bar gets its label.
    later = compute_labels(bars, close_ts, known_until=datetime(2024, 3, 7, 12, tzinfo=UTC))
    assert later["fwd_ret_1h"][9] == pytest.approx(0.0)  # nothing traded after the last bar


def test_barrier_label_on_a_known_path():
    n = 200
    rng = np.random.default_rng(3)
    closes = 100 * np.exp(np.cumsum(rng.normal(0, 0.001, n)))
    closes[150:] = closes[149] * 1.05  # a jump far beyond 1.5 sigma: the upper barrier
    opens = [datetime(2024, 3, 6, tzinfo=UTC) + timedelta(minutes=5 * i) for i in range(n)]
    bars = pl.DataFrame({"ts": opens, "open": closes, "high": closes, "low": closes, "close": closes})
    close_ts = pl.Series([t + timedelta(minutes=5) for t in opens])
    labels = compute_labels(bars, close_ts, known_until=opens[-1] + timedelta(days=1))
    assert labels["barrier_4h"][149] == 1 and labels["barrier_4h"][145] == 1
    assert labels["barrier_4h"][99] is None  # no volatility estimate yet
    assert set(labels["barrier_4h"].drop_nulls().unique()) <= {-1, 0, 1}


def test_each_recursion_reproduces_ta_lib_once_its_start_is_forgotten():
    """The live engine's scalar recursions against TA-Lib on the same random walk."""
    import math

    import talib

    from models.features.recursive import DirectionalMovement, Ema, GainLoss, ParabolicSar, StochRsi, Wilder, true_range

    rng = np.random.default_rng(3)
    n = 3000
    c = np.cumsum(rng.normal(0, 1, n)) + 1000
    h, l = c + rng.random(n) * 2, c - rng.random(n) * 2
    ema, rsi, atr, dm, sar, stoch = Ema(50), GainLoss(28), Wilder(14), DirectionalMovement(14), ParabolicSar(), StochRsi()
    rsi14 = GainLoss(14)
    mine: dict[str, list[float]] = {k: [] for k in ("ema", "rsi", "cmo", "atr", "adx", "plus_di", "minus_di", "sar", "stoch_k", "stoch_d")}
    previous = math.nan
    for hi, lo, cl in zip(h, l, c, strict=True):
        mine["ema"].append(ema.update(cl))
        rsi.update(cl)
        rsi14.update(cl)
        mine["rsi"].append(rsi.rsi)
        mine["cmo"].append(rsi14.cmo)
        mine["atr"].append(atr.update(true_range(hi, lo, previous)))
        dm.update(hi, lo, cl)
        mine["adx"].append(dm.adx)
        mine["plus_di"].append(dm.plus_di)
        mine["minus_di"].append(dm.minus_di)
        mine["sar"].append(sar.update(hi, lo))
        k, d = stoch.update(rsi14.rsi)
        mine["stoch_k"].append(k)
        mine["stoch_d"].append(d)
        previous = cl
    stoch_k, stoch_d = talib.STOCHRSI(c, 14, 14, 3, 0)
    reference = {
        "ema": talib.EMA(c, 50), "rsi": talib.RSI(c, 28), "cmo": talib.CMO(c, 14), "atr": talib.ATR(h, l, c, 14),
        "adx": talib.ADX(h, l, c, 14), "plus_di": talib.PLUS_DI(h, l, c, 14), "minus_di": talib.MINUS_DI(h, l, c, 14),
        "sar": talib.SAR(h, l, 0.02, 0.2), "stoch_k": stoch_k, "stoch_d": stoch_d,
    }
    worst = {name: float(np.max(np.abs(np.array(mine[name])[WARMUP_BARS:] - reference[name][WARMUP_BARS:]))) for name in reference}
    assert all(diff < 1e-9 for diff in worst.values()), worst


def test_rolling_shape_from_polars_and_from_windows_equals_a_direct_computation():
    """The batch path (polars' rolling moments) and the live path (central moments of the few
    newest windows) against scipy's population skewness and excess kurtosis, window by window,
    NaNs included."""
    import numpy as np
    from scipy.stats import kurtosis, skew

    from models.features.compute import _FEW_ROWS, _rolling_shape

    rng = np.random.default_rng(4)
    x = rng.standard_t(4, 900) * 1e-4
    x[[0, 300]] = np.nan
    n = 60
    expected_skew = np.full(len(x), np.nan)
    expected_kurt = np.full(len(x), np.nan)
    for t in range(n - 1, len(x)):
        window = x[t - n + 1: t + 1]
        if not np.isnan(window).any():
            expected_skew[t], expected_kurt[t] = skew(window), kurtosis(window)
    batch = _rolling_shape(x, n)  # polars: many rows
    live = _rolling_shape(x, n, first=len(x) - _FEW_ROWS)  # windows: the newest rows only
    for got, want in ((batch[0], expected_skew), (batch[1], expected_kurt)):
        assert np.array_equal(np.isnan(got), np.isnan(want))
        assert np.nanmax(np.abs(got - want)) < 1e-9
    tail = slice(len(x) - _FEW_ROWS, None)
    for got, want in ((live[0], expected_skew), (live[1], expected_kurt)):
        assert np.allclose(got[tail], want[tail], atol=1e-9, equal_nan=True)
        assert np.isnan(got[: len(x) - _FEW_ROWS]).all()
