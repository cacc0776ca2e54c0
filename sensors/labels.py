"""Labels follow the candles: a day's last labels look into the next day, so when the next
day's candles land after the day's features were computed, the day is computed again.

`ml_features` depends on the same day of `aggregates` only (a declared look-ahead made every
backfill expand into the day before its range), so this sensor carries the look-ahead: for
each new `aggregates` materialization of day D it requests `ml_features` of D-1, when D-1 has
features older than D's candles. Days that never had features are left alone (their candles
may not exist). Contiguous days of a symbol go out as one range run.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import date, timedelta

from dagster import (
    AssetKey,
    AssetRecordsFilter,
    AssetSelection,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SkipReason,
    sensor,
)
from dagster._core.storage.tags import ASSET_PARTITION_RANGE_END_TAG, ASSET_PARTITION_RANGE_START_TAG

from assets.partitions import chunks, day_symbol_key, parse_key

_CANDLES, _FEATURES = AssetKey("aggregates"), AssetKey("ml_features")
_PAGE = 1000


def _latest_storage_ids(instance, asset_key: AssetKey, partitions: list[str]) -> dict[str, int]:
    """Partition -> storage id of its latest materialization, for the partitions that have one."""
    latest: dict[str, int] = {}
    for start in range(0, len(partitions), _PAGE):
        keys = partitions[start:start + _PAGE]
        cursor = None
        while True:
            page = instance.fetch_materializations(
                AssetRecordsFilter(asset_key=asset_key, asset_partitions=keys), limit=_PAGE, cursor=cursor)
            for record in page.records:
                key = record.partition_key
                latest[key] = max(latest.get(key, 0), record.storage_id)
            if not page.has_more:
                break
            cursor = page.cursor
    return latest


def stale_feature_days(instance, after_storage_id: int) -> tuple[dict[str, list[date]], int]:
    """Per symbol, the days whose features predate the next day's candles materialized after
    ``after_storage_id``; and the newest storage id seen (the next cursor)."""
    newest, candles = after_storage_id, {}
    cursor = None
    while True:
        page = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=_CANDLES, after_storage_id=after_storage_id), limit=_PAGE, cursor=cursor, ascending=True)
        for record in page.records:
            newest = max(newest, record.storage_id)
            if record.partition_key:
                candles[record.partition_key] = max(candles.get(record.partition_key, 0), record.storage_id)
        if not page.has_more:
            break
        cursor = page.cursor
    day_before = {}
    for key, storage_id in candles.items():
        partition = parse_key(key)
        day_before[str(day_symbol_key(partition.day - timedelta(days=1), partition.symbol))] = storage_id
    features = _latest_storage_ids(instance, _FEATURES, list(day_before))
    stale: dict[str, list[date]] = defaultdict(list)
    for key, candles_id in day_before.items():
        if key in features and features[key] < candles_id:
            partition = parse_key(key)
            stale[partition.symbol].append(partition.day)
    return {symbol: sorted(days) for symbol, days in stale.items()}, newest


@sensor(
    name="labels_follow_candles",
    target=AssetSelection.assets(_FEATURES),
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.RUNNING,
    description="Reruns ml_features of the day before new candles, so that day's look-ahead labels fill in.",
)
def labels_follow_candles(context: SensorEvaluationContext):
    stale, newest = stale_feature_days(context.instance, int(context.cursor or 0))
    requests = [
        RunRequest(
            run_key=f"labels|{symbol}|{days[0]}|{days[-1]}|{newest}",
            asset_selection=[_FEATURES],
            tags={ASSET_PARTITION_RANGE_START_TAG: str(day_symbol_key(days[0], symbol)),
                  ASSET_PARTITION_RANGE_END_TAG: str(day_symbol_key(days[-1], symbol))},
        )
        for symbol, symbol_days in stale.items()
        for days in chunks(symbol_days, 366)
    ]
    context.update_cursor(str(newest))
    return requests or SkipReason("no day's features older than the next day's candles")
