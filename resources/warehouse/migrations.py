"""Versioned warehouse schema. Append a migration, never edit an applied one.

Every statement is idempotent (``IF NOT EXISTS``), so a migration interrupted half-way, or
run by two processes at once, is safe to run again; ``schema_migrations`` records what ran.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from clickhouse_connect.driver.client import Client

from models.features.labels import LABEL_SCHEMA
from models.features.registry import FEATURE_NAMES
from resources.warehouse.commits import COMMITS_TABLE, hidden_columns_sql


Step = str | Callable[[Client], None]
# The tables migration 7 gives hidden columns in place (aggregates and ml_features are rebuilt by 8).
_REPLACED_IN_PLACE = ("market_ticks", "market_ticks_quarantine", "vendor_candles", "vendor_candles_quarantine",
                      "external_fred_indicators", "external_commodity_prices", "external_economic_calendar")


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    statements: tuple[Step, ...]  # SQL, or a function for steps that must check the schema first


_QUOTE_COLUMNS = """
    bid Nullable(Float64),
    ask Nullable(Float64),
    bid_size Nullable(Float64),
    ask_size Nullable(Float64),
    price Nullable(Float64),
    size Nullable(Float64),
    source LowCardinality(String)"""

def _ml_features_table() -> str:
    features = ",\n".join(f"                {name} Nullable(Float64)" for name in FEATURE_NAMES)
    labels = ",\n".join(
        f"                {name} Nullable({'Int8' if str(dtype) == 'Int8' else 'Float64'})" for name, dtype in LABEL_SCHEMA.items()
    )
    return f"""
            CREATE TABLE IF NOT EXISTS ml_features (
                symbol LowCardinality(String),
                timeframe LowCardinality(String),
                ts DateTime('UTC') COMMENT 'bar open',
                close_ts DateTime('UTC') COMMENT 'bar close: when the features are known',
                feature_set LowCardinality(String),
                warm UInt8 COMMENT '1 when the full warm-up history preceded the bar',
{features},
{labels},
                computed_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = ReplacingMergeTree(computed_at)
            PARTITION BY toYYYYMM(ts)
            ORDER BY (symbol, timeframe, ts)
            """


MIGRATIONS: tuple[Migration, ...] = (
    Migration(
        1,
        "market_ticks and its quarantine",
        (
            f"""
            CREATE TABLE IF NOT EXISTS market_ticks (
                symbol LowCardinality(String),
                ts DateTime64(3, 'UTC'),
                seq UInt32 COMMENT 'order within the (symbol, day) partition; stable among equal ts',
                {_QUOTE_COLUMNS},
                ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = MergeTree
            PARTITION BY toYYYYMM(ts)
            ORDER BY (symbol, ts, seq)
            """,
            f"""
            CREATE TABLE IF NOT EXISTS market_ticks_quarantine (
                symbol LowCardinality(String),
                day Date COMMENT 'the partition that received the row',
                raw_symbol Nullable(String) COMMENT 'the symbol as the vendor sent it',
                ts Nullable(DateTime64(3, 'UTC')),
                {_QUOTE_COLUMNS},
                reason LowCardinality(String),
                quarantined_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = MergeTree
            PARTITION BY toYYYYMM(day)
            ORDER BY (symbol, day, reason)
            """,
        ),
    ),
    Migration(
        2,
        "aggregates (candles at every timeframe)",
        (
            """
            CREATE TABLE IF NOT EXISTS aggregates (
                symbol LowCardinality(String),
                timeframe LowCardinality(String),
                ts DateTime('UTC') COMMENT 'bar open; the bar covers [ts, next open)',
                open Float64,
                high Float64,
                low Float64,
                close Float64,
                bid_close Nullable(Float64),
                ask_close Nullable(Float64),
                volume Float64,
                tick_count UInt32,
                quote_count UInt32,
                spread_mean Nullable(Float64),
                spread_max Nullable(Float64),
                vwap Float64,
                source LowCardinality(String),
                covered_until DateTime('UTC') COMMENT 'data up to here went into the bar; the latest wins',
                updated_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = ReplacingMergeTree(covered_until)
            PARTITION BY toYYYYMM(ts)
            ORDER BY (symbol, timeframe, ts)
            """,
        ),
    ),
    Migration(3, "ml_features (columns generated from the feature registry)", (_ml_features_table(),)),
    Migration(
        4,
        "vendor_candles (one-minute candles from vendors, for minutes without ticks)",
        (
            """
            CREATE TABLE IF NOT EXISTS vendor_candles (
                symbol LowCardinality(String),
                ts DateTime('UTC') COMMENT 'minute open',
                open Float64,
                high Float64,
                low Float64,
                close Float64,
                volume Float64,
                vwap Float64,
                tick_count UInt32,
                source LowCardinality(String),
                ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = MergeTree
            PARTITION BY toYYYYMM(ts)
            ORDER BY (symbol, ts)
            """,
        ),
    ),
    Migration(
        5,
        "external data, point-in-time: FRED/ALFRED vintages, commodity prices, economic calendar",
        (
            """
            CREATE TABLE IF NOT EXISTS external_fred_indicators (
                series_id LowCardinality(String),
                observation_date Date COMMENT 'the period the value describes',
                value Nullable(Float64),
                realtime_start Date COMMENT 'ALFRED: the day this value became the published one',
                known_at DateTime('UTC') COMMENT 'when a point-in-time join may first use it',
                week Date COMMENT 'the asset partition (publication week) that wrote the row',
                source LowCardinality(String),
                ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = MergeTree
            PARTITION BY toYear(week)
            ORDER BY (series_id, week, observation_date, realtime_start)
            """,
            """
            CREATE TABLE IF NOT EXISTS external_commodity_prices (
                name LowCardinality(String),
                ticker LowCardinality(String),
                date Date COMMENT 'trading day in the exchange time zone',
                open Nullable(Float64),
                high Nullable(Float64),
                low Nullable(Float64),
                close Nullable(Float64),
                volume Nullable(Float64),
                currency LowCardinality(String),
                known_at DateTime('UTC') COMMENT 'when the day was complete: the next midnight at the exchange',
                source LowCardinality(String),
                ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = MergeTree
            PARTITION BY toYear(date)
            ORDER BY (name, date)
            """,
            """
            CREATE TABLE IF NOT EXISTS external_economic_calendar (
                event_id String COMMENT 'hash of currency, title and scheduled time',
                ts DateTime('UTC') COMMENT 'scheduled release time; the actual is known from here',
                currency LowCardinality(String),
                impact LowCardinality(String),
                title String,
                actual Nullable(Float64),
                forecast Nullable(Float64),
                previous Nullable(Float64),
                actual_text Nullable(String),
                forecast_text Nullable(String),
                previous_text Nullable(String),
                known_at DateTime('UTC') COMMENT 'when the event and its forecast were first known',
                source LowCardinality(String),
                ingested_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = MergeTree
            PARTITION BY toYYYYMM(ts)
            ORDER BY (ts, currency, event_id)
            """,
        ),
    ),
    Migration(
        6,
        "vendor_candles_quarantine (impossible vendor candles, kept with their reason)",
        (
            """
            CREATE TABLE IF NOT EXISTS vendor_candles_quarantine (
                symbol LowCardinality(String),
                day Date COMMENT 'the partition that received the row',
                ts Nullable(DateTime64(3, 'UTC')) COMMENT 'as received, sub-minute stamps included',
                open Nullable(Float64),
                high Nullable(Float64),
                low Nullable(Float64),
                close Nullable(Float64),
                volume Nullable(Float64),
                vwap Nullable(Float64),
                tick_count Nullable(UInt32),
                source LowCardinality(String),
                reason LowCardinality(String),
                quarantined_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = MergeTree
            PARTITION BY toYYYYMM(day)
            ORDER BY (symbol, day, reason)
            """,
        ),
    ),
    Migration(
        7,
        "atomic partitions: partition_commits, _scope/_batch on the replaced tables; vendor ids, bar timeframes",
        (
            f"""
            CREATE TABLE IF NOT EXISTS {COMMITS_TABLE} (
                table_name LowCardinality(String),
                scope String COMMENT 'the partition, e.g. EURUSD|2024-03-06',
                batch UInt64 COMMENT 'the write whose rows are visible for this scope',
                committed_at DateTime64(6, 'UTC') DEFAULT now64(6)
            ) ENGINE = ReplacingMergeTree(batch)
            ORDER BY (table_name, scope)
            """,
            "ALTER TABLE market_ticks ADD COLUMN IF NOT EXISTS vendor_seq Nullable(Int64) "
            "COMMENT 'the vendor''s own id or sequence number of the row' AFTER size",
            "ALTER TABLE market_ticks_quarantine ADD COLUMN IF NOT EXISTS vendor_seq Nullable(Int64) AFTER size",
            "ALTER TABLE vendor_candles ADD COLUMN IF NOT EXISTS timeframe LowCardinality(String) DEFAULT 'M1' "
            "COMMENT 'the bar interval the vendor served' AFTER symbol",
            "ALTER TABLE vendor_candles_quarantine ADD COLUMN IF NOT EXISTS timeframe LowCardinality(String) DEFAULT 'M1' AFTER symbol",
            *(f"ALTER TABLE {table} {', '.join(hidden_columns_sql(table))}" for table in _REPLACED_IN_PLACE),
            # what is stored already stays visible: batch 0 of every scope it fills
            *(f"INSERT INTO {COMMITS_TABLE} (table_name, scope, batch) SELECT '{table}', _scope, 0 FROM {table} GROUP BY _scope"
              for table in _REPLACED_IN_PLACE),
        ),
    ),
    Migration(
        8,
        "aggregates and ml_features as plain MergeTree with _scope/_batch (versions are resolved by commits, "
        "not by background merges); ml_features keyed by feature_set too",
        (
            lambda client: _rebuild(client, "aggregates", "ORDER BY (symbol, timeframe, ts)"),
            lambda client: _rebuild(client, "ml_features", "ORDER BY (symbol, timeframe, feature_set, ts)"),
        ),
    ),
    # -- training (issue 10): migrations 10 and 11 ------------------------------------------
    Migration(
        10,
        "model_predictions (out-of-sample only) and model_folds",
        (
            """
            CREATE TABLE IF NOT EXISTS model_predictions (
                model_name LowCardinality(String) COMMENT 'registered model: target.timeframe.universe',
                model_version UInt32 COMMENT 'MLflow model version',
                run_id String COMMENT 'MLflow run',
                symbol LowCardinality(String),
                timeframe LowCardinality(String),
                ts DateTime('UTC') COMMENT 'bar open',
                close_ts DateTime('UTC') COMMENT 'bar close: when the prediction could be made',
                fold UInt16 COMMENT 'walk-forward fold whose test rows hold the bar',
                target LowCardinality(String),
                label Float64 COMMENT 'the realized target (a return, or -1/0/+1)',
                prediction Float64 COMMENT 'classes: -1/+1 (binary: up or not), -1/0/+1 (barrier); returns: the forecast',
                prob_up Nullable(Float64) COMMENT 'classifiers: P(target > 0)',
                prob_down Nullable(Float64) COMMENT 'binary: P(not up); barrier: P(lower barrier first)',
                prob_flat Nullable(Float64) COMMENT 'barrier: P(neither barrier)',
                feature_set LowCardinality(String),
                written_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = MergeTree
            PARTITION BY toYYYYMM(ts)
            ORDER BY (model_name, model_version, symbol, timeframe, ts)
            """,
            """
            CREATE TABLE IF NOT EXISTS model_folds (
                model_name LowCardinality(String),
                model_version UInt32,
                run_id String,
                fold Int16 COMMENT '0.. walk-forward folds; -1 the registered model, fitted on every row',
                symbols Array(String),
                timeframe LowCardinality(String),
                target LowCardinality(String),
                scheme LowCardinality(String),
                train_start DateTime('UTC') COMMENT 'bar open of the first training row',
                train_end DateTime('UTC') COMMENT 'bar open of the last training row',
                train_label_end DateTime('UTC') COMMENT 'when the last training label was known: its close + horizon',
                test_start Nullable(DateTime('UTC')) COMMENT 'the fold boundary: bars closing from here are tested',
                test_end Nullable(DateTime('UTC')) COMMENT 'the next boundary (exclusive)',
                train_rows UInt32,
                test_rows UInt32,
                purged_rows UInt32 COMMENT 'rows whose label window reached the test fold',
                embargoed_rows UInt32,
                embargo_s UInt32,
                horizon_s UInt32,
                feature_set LowCardinality(String),
                written_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = MergeTree
            ORDER BY (model_name, model_version, fold)
            """,
            # a training's rows are replaced all or nothing (resources/warehouse/commits.py)
            *(f"ALTER TABLE {table} {', '.join(hidden_columns_sql(table))}" for table in ('model_predictions', 'model_folds')),
        ),
    ),
    Migration(
        11,
        "training_runs, training_metrics, model_promotions",
        (
            """
            CREATE TABLE IF NOT EXISTS training_runs (
                run_id String COMMENT 'MLflow run',
                spec LowCardinality(String),
                model_name LowCardinality(String),
                model_version Nullable(UInt32),
                family LowCardinality(String),
                target LowCardinality(String),
                timeframe LowCardinality(String),
                symbols Array(String),
                feature_set LowCardinality(String),
                fingerprint String,
                rows UInt32,
                features UInt16,
                data_start Nullable(DateTime('UTC')),
                data_end Nullable(DateTime('UTC')),
                folds UInt16,
                params String COMMENT 'JSON: the parameters the model was fitted with',
                search_trials UInt32,
                metric LowCardinality(String) COMMENT 'the deciding metric (search objective, gate)',
                value Nullable(Float64) COMMENT 'mean out-of-fold value of the metric',
                baseline_value Nullable(Float64) COMMENT 'LightGBM with defaults, same folds',
                beats_baselines UInt8,
                gate_decision LowCardinality(String),
                status LowCardinality(String) COMMENT 'completed | failed',
                error String,
                seed Int64,
                code_version String,
                dagster_run_id String,
                started_at DateTime64(3, 'UTC'),
                finished_at DateTime64(3, 'UTC'),
                seconds Float64,
                learner_seconds Float64
            ) ENGINE = MergeTree
            ORDER BY (spec, started_at, run_id)
            """,
            """
            CREATE TABLE IF NOT EXISTS training_metrics (
                run_id String,
                model_name LowCardinality(String),
                model_version Nullable(UInt32),
                candidate LowCardinality(String) COMMENT 'model | majority | previous_direction | lightgbm_default | champion',
                scope LowCardinality(String) COMMENT 'fold | mean (over folds) | overall (all out-of-sample rows)',
                fold Int16 COMMENT '-1 unless scope = fold',
                metric LowCardinality(String),
                value Nullable(Float64),
                written_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = MergeTree
            ORDER BY (run_id, candidate, scope, fold, metric)
            """,
            """
            CREATE TABLE IF NOT EXISTS model_promotions (
                model_name LowCardinality(String),
                model_version UInt32,
                run_id String,
                decision LowCardinality(String) COMMENT 'approved | refused (the gate) | promoted (alias moved)',
                reason String,
                metric LowCardinality(String),
                challenger_value Nullable(Float64),
                champion_value Nullable(Float64),
                champion_version Nullable(UInt32) COMMENT 'the champion it was compared with or replaced',
                margin Float64,
                decided_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = MergeTree
            ORDER BY (model_name, decided_at, model_version)
            """,
            # a training's rows are replaced all or nothing (resources/warehouse/commits.py)
            *(f"ALTER TABLE {table} {', '.join(hidden_columns_sql(table))}" for table in ('training_runs', 'training_metrics')),
        ),
    ),
    Migration(
        12,
        "backtests: runs with their headline numbers, trades, equity per bar",
        (
            """
            CREATE TABLE IF NOT EXISTS backtest_runs (
                run_id String COMMENT 'deterministic: the same spec and data window give the same id',
                name LowCardinality(String) COMMENT 'the strategy spec (or strategy) it ran',
                strategy LowCardinality(String),
                params String COMMENT 'JSON',
                symbols Array(String),
                timeframe LowCardinality(String),
                start DateTime('UTC'),
                end DateTime('UTC'),
                bars UInt64,
                config String COMMENT 'JSON: risk and fill settings, initial equity, account currency',
                initial_equity Float64,
                final_equity Float64,
                total_return Float64,
                annual_return Float64,
                sharpe Float64,
                sortino Float64,
                calmar Float64,
                max_drawdown Float64,
                win_rate Float64,
                profit_factor Float64,
                trades UInt32,
                exposure Float64,
                costs Float64 COMMENT 'commission, spread and slippage, account currency',
                buy_hold_return Nullable(Float64),
                metrics String COMMENT 'JSON: every metric',
                tearsheet String COMMENT 'path of the HTML tearsheet',
                source LowCardinality(String) COMMENT 'dagster or cli',
                created_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = MergeTree
            ORDER BY run_id
            """,
            """
            CREATE TABLE IF NOT EXISTS backtest_trades (
                run_id String,
                trade_id UInt32,
                symbol LowCardinality(String),
                side Int8,
                qty Float64 COMMENT 'units',
                entry_ts DateTime64(3, 'UTC'),
                entry_price Float64,
                exit_ts Nullable(DateTime64(3, 'UTC')) COMMENT 'null: still open at the end',
                exit_price Nullable(Float64),
                pnl Float64 COMMENT 'net of commissions, account currency',
                gross_pnl Float64,
                commission Float64,
                return_pct Float64,
                r_multiple Nullable(Float64),
                exit_reason LowCardinality(String)
            ) ENGINE = MergeTree
            ORDER BY (run_id, trade_id)
            """,
            """
            CREATE TABLE IF NOT EXISTS backtest_equity (
                run_id String,
                ts DateTime64(3, 'UTC') COMMENT 'bar open; equity marked at its close',
                equity Float64,
                drawdown Float64,
                exposure Float64 COMMENT 'gross notional / equity',
                margin Float64 COMMENT 'margin the positions held, account currency',
                buy_hold Nullable(Float64)
            ) ENGINE = MergeTree
            ORDER BY (run_id, ts)
            """,
            # a run replaces its rows in the three tables at once (see resources/warehouse/commits.py)
            *(f"ALTER TABLE {table} {', '.join(hidden_columns_sql(table))}"
              for table in ("backtest_runs", "backtest_trades", "backtest_equity")),
        ),
    ),
    Migration(
        13,
        "backtest_runs: the registered model version a model backtest judged, and its MLflow run",
        (
            "ALTER TABLE backtest_runs "
            "ADD COLUMN IF NOT EXISTS model_name LowCardinality(String) DEFAULT '' COMMENT 'registered model (model backtests)', "
            "ADD COLUMN IF NOT EXISTS model_version Nullable(UInt32) COMMENT 'its version', "
            "ADD COLUMN IF NOT EXISTS mlflow_run_id String DEFAULT '' COMMENT 'the MLflow run holding the tearsheet'",
        ),
    ),
    # -- the live runner's ledger: 14-15 ---------------------------------------------------------
    # Drained from JetStream by the data-bridge sensor (sensors/ledger.py), at least once: each
    # row's key comes from its message's deterministic id, so a redelivered message replaces its
    # row (ReplacingMergeTree, read with FINAL). Partitions are functions of the key, so the two
    # copies of a row always meet.
    Migration(
        14,
        "the live ledger: trading_signals, orders, executions, positions, portfolio_value, risk_events",
        (
            """
            CREATE TABLE IF NOT EXISTS trading_signals (
                runner LowCardinality(String),
                symbol LowCardinality(String),
                timeframe LowCardinality(String),
                ts DateTime64(3, 'UTC') COMMENT 'bar open',
                close_ts DateTime64(3, 'UTC') COMMENT 'bar close: when the decision was made',
                model_name LowCardinality(String),
                model_version String COMMENT 'the registered version that made the decision',
                feature_set LowCardinality(String),
                model_column LowCardinality(String) COMMENT 'what the model predicts (prob_up, ...)',
                value Nullable(Float64) COMMENT 'the model output; null while the features warm up',
                side Nullable(Int8) COMMENT '+1 long, -1 short, 0 flat; null: no signal',
                confidence Nullable(Float64),
                prob Nullable(Float64),
                status LowCardinality(String) COMMENT 'signal, warming_up, stale',
                reason String,
                received_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = ReplacingMergeTree(received_at)
            PARTITION BY toYYYYMM(ts)
            ORDER BY (runner, symbol, timeframe, ts)
            """,
            """
            CREATE TABLE IF NOT EXISTS orders (
                runner LowCardinality(String),
                client_id String,
                seq UInt16 COMMENT 'the transition''s place in the order''s history',
                event LowCardinality(String) COMMENT 'what happened: submit, accept, fill, cancel, ...',
                status LowCardinality(String) COMMENT 'the state it led to',
                symbol LowCardinality(String),
                side Int8,
                type LowCardinality(String),
                qty Float64 COMMENT 'units',
                intent LowCardinality(String) COMMENT 'entry, exit, stop_loss, take_profit, flatten, ...',
                bar_ts DateTime64(3, 'UTC') COMMENT 'open of the bar whose close made the decision',
                price Nullable(Float64) COMMENT 'limit or stop level',
                stop_loss Nullable(Float64),
                take_profit Nullable(Float64),
                filled_qty Float64,
                avg_fill_price Float64,
                parent_id Nullable(String),
                reason String,
                model_version String,
                ts DateTime64(3, 'UTC') COMMENT 'the bar being processed when it moved',
                received_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = ReplacingMergeTree(received_at)
            PARTITION BY toYYYYMM(bar_ts)
            ORDER BY (runner, client_id, seq)
            """,
            """
            CREATE TABLE IF NOT EXISTS executions (
                runner LowCardinality(String),
                fill_id String,
                client_id String,
                symbol LowCardinality(String),
                side Int8,
                qty Float64 COMMENT 'units',
                price Float64 COMMENT 'quote currency',
                commission Float64 COMMENT 'account currency',
                ts DateTime64(3, 'UTC'),
                conv Nullable(Float64) COMMENT 'quote -> account rate applied; null where the broker did not know it',
                mid Nullable(Float64) COMMENT 'mid price at the fill: spread and slippage apart; null where unknown',
                reason LowCardinality(String) COMMENT 'market, stop, limit, gap',
                received_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = ReplacingMergeTree(received_at)
            PARTITION BY toYYYYMM(ts)
            ORDER BY (runner, fill_id)
            """,
            """
            CREATE TABLE IF NOT EXISTS positions (
                runner LowCardinality(String),
                bar_seq UInt64 COMMENT 'the runner''s bar count: one account state per bar',
                ts DateTime64(3, 'UTC') COMMENT 'open of that bar',
                symbol LowCardinality(String),
                units Float64 COMMENT 'signed; a symbol without a row at a bar is flat',
                avg_price Float64,
                mark Nullable(Float64) COMMENT 'the last close the runner saw',
                received_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = ReplacingMergeTree(received_at)
            PARTITION BY toYYYYMM(ts)
            ORDER BY (runner, bar_seq, symbol)
            """,
            """
            CREATE TABLE IF NOT EXISTS portfolio_value (
                runner LowCardinality(String),
                bar_seq UInt64,
                ts DateTime64(3, 'UTC') COMMENT 'open of the bar just processed',
                symbol LowCardinality(String) COMMENT 'the symbol of that bar',
                equity Float64 COMMENT 'account currency, positions marked at their last close',
                balance Float64 COMMENT 'cash: realised P&L net of costs',
                margin Nullable(Float64) COMMENT 'margin the positions hold (null from runners that do not say)',
                exposure Nullable(Float64) COMMENT 'gross notional, account currency',
                open_positions UInt16,
                peak Float64,
                drawdown Float64 COMMENT 'from the peak, a fraction',
                kill LowCardinality(String) COMMENT 'the kill switch: off, halt, reduce_only',
                kill_reason String,
                model_version String,
                received_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = ReplacingMergeTree(received_at)
            PARTITION BY toYYYYMM(ts)
            ORDER BY (runner, bar_seq)
            """,
            """
            CREATE TABLE IF NOT EXISTS risk_events (
                runner LowCardinality(String),
                event_id String,
                ts DateTime64(3, 'UTC'),
                symbol LowCardinality(String),
                kind LowCardinality(String) COMMENT 'entry, exit, order, kill_switch, broker, bad_bar, reconcile, model_swap, ...',
                approved Bool,
                reason String,
                client_id String,
                qty Float64,
                source LowCardinality(String) COMMENT 'engine (the risk model) or runner (its own alerts)',
                model_version String,
                details String COMMENT 'JSON: any other fields of the message',
                received_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = ReplacingMergeTree(received_at)
            ORDER BY (runner, event_id)
            """,
        ),
    ),
    # -- broker data (MetaTrader 5): 16-17 ------------------------------------------------------
    # Streams sampled from the broker and drained idempotently: a row redelivered (the bus, a
    # rerun) replaces itself by its key, so these are ReplacingMergeTree read with FINAL, not
    # partition-replaced tables.
    Migration(
        16,
        "broker data: account snapshots, quotes (kept 24 hours), the account's deals",
        (
            """
            CREATE TABLE IF NOT EXISTS broker_account (
                login UInt64,
                server LowCardinality(String),
                ts DateTime64(3, 'UTC') COMMENT 'when the snapshot was taken',
                currency LowCardinality(String),
                balance Float64,
                equity Float64,
                margin Float64,
                margin_free Float64,
                margin_level Nullable(Float64) COMMENT 'equity / margin in percent; null while no margin is used',
                profit Float64 COMMENT 'floating profit of the open positions',
                leverage UInt32,
                received_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = ReplacingMergeTree(received_at)
            PARTITION BY toYYYYMM(ts)
            ORDER BY (login, ts)
            """,
            """
            CREATE TABLE IF NOT EXISTS broker_quotes (
                server LowCardinality(String),
                symbol LowCardinality(String),
                ts DateTime64(3, 'UTC') COMMENT 'the tick time, converted from the server clock',
                bid Float64,
                ask Float64,
                received_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = ReplacingMergeTree(received_at)
            PARTITION BY toDate(ts)
            ORDER BY (server, symbol, ts)
            TTL toDateTime(received_at) + INTERVAL 24 HOUR
            """,
            """
            CREATE TABLE IF NOT EXISTS broker_trades (
                login UInt64,
                server LowCardinality(String),
                deal UInt64 COMMENT 'the deal ticket',
                order_ticket UInt64,
                position_id UInt64,
                ts DateTime64(3, 'UTC'),
                symbol LowCardinality(String),
                side Int8 COMMENT '+1 buy, -1 sell',
                entry LowCardinality(String) COMMENT 'in, out, inout (a reversal), out_by',
                volume Float64 COMMENT 'lots',
                units Float64 COMMENT 'volume x contract size',
                price Float64,
                commission Float64,
                swap Float64,
                fee Float64,
                profit Float64 COMMENT 'account currency, on closing deals',
                magic UInt64,
                reason LowCardinality(String) COMMENT 'client, mobile, web, expert, sl, tp, so, ...',
                comment String,
                client_id Nullable(String) COMMENT 'our client order id when the deal is ours',
                received_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = ReplacingMergeTree(received_at)
            PARTITION BY toYYYYMM(ts)
            ORDER BY (login, deal)
            """,
        ),
    ),
    Migration(
        17,
        "broker_quotes_m1: the broker's quotes per minute, kept after the raw quotes expire",
        (
            """
            CREATE TABLE IF NOT EXISTS broker_quotes_m1 (
                server LowCardinality(String),
                symbol LowCardinality(String),
                ts DateTime('UTC') COMMENT 'minute open',
                bid_close Float64 COMMENT 'the last quote of the minute',
                ask_close Float64,
                mid_close Float64,
                spread_mean Float64 COMMENT 'mean ask - bid over the quotes of the minute',
                spread_max Float64,
                quotes UInt32 COMMENT 'quotes aggregated: the most complete version of a minute wins',
                computed_at DateTime64(3, 'UTC') DEFAULT now64(3)
            ) ENGINE = ReplacingMergeTree(quotes)
            PARTITION BY toYYYYMM(ts)
            ORDER BY (server, symbol, ts)
            """,
        ),
    ),
)


def _columns(client: Client, table: str) -> list[str]:
    return [row[0] for row in client.query(
        "SELECT name FROM system.columns WHERE database = currentDatabase() AND table = {t:String} ORDER BY position",
        parameters={"t": table},
    ).result_rows]


def _rebuild(client: Client, table: str, order_by: str) -> None:
    """Copy ``table`` into a plain MergeTree with the hidden columns and swap the two.

    Safe to run again after an interruption at any point: a table that already has
    ``_batch`` is done (a left-over copy is dropped); otherwise the copy starts over. The
    copy takes the current version of each row (FINAL) as batch 0, committed."""
    scratch = f"{table}__rebuild"
    columns = _columns(client, table)
    if "_batch" in columns:
        client.command(f"DROP TABLE IF EXISTS {scratch}")
        return
    client.command(f"DROP TABLE IF EXISTS {scratch}")
    client.command(f"CREATE TABLE {scratch} AS {table} ENGINE = MergeTree PARTITION BY toYYYYMM(ts) {order_by}")
    client.command(f"ALTER TABLE {scratch} {', '.join(hidden_columns_sql(table))}")
    names = ", ".join(columns)
    client.command(f"INSERT INTO {scratch} ({names}) SELECT {names} FROM {table} FINAL")
    client.command(f"INSERT INTO {COMMITS_TABLE} (table_name, scope, batch) SELECT '{table}', _scope, 0 FROM {scratch} GROUP BY _scope")
    client.command(f"EXCHANGE TABLES {table} AND {scratch}")
    client.command(f"DROP TABLE {scratch}")


def sync_feature_columns(client: Client) -> None:
    """Add a column for every registered feature the table lacks: the registry grows without
    a hand-written migration, and old rows read null for new features."""
    clauses = ", ".join(f"ADD COLUMN IF NOT EXISTS {name} Nullable(Float64)" for name in FEATURE_NAMES)
    client.command(f"ALTER TABLE ml_features {clauses}")


def apply_migrations(client: Client, database: str) -> list[int]:
    """Create ``database`` if needed and apply pending migrations in order."""
    client.command(f"CREATE DATABASE IF NOT EXISTS `{database}`")
    client.database = database
    client.command(
        """
        CREATE TABLE IF NOT EXISTS schema_migrations (
            version UInt32,
            name String,
            applied_at DateTime64(3, 'UTC') DEFAULT now64(3)
        ) ENGINE = ReplacingMergeTree ORDER BY version
        """
    )
    done = {row[0] for row in client.query("SELECT version FROM schema_migrations").result_rows}
    applied = []
    for migration in MIGRATIONS:
        if migration.version in done:
            continue
        for statement in migration.statements:
            if callable(statement):
                statement(client)
            else:
                client.command(statement)
        client.insert("schema_migrations", [[migration.version, migration.name]], column_names=["version", "name"])
        applied.append(migration.version)
    sync_feature_columns(client)
    return applied


def applied_versions(client: Client) -> list[int]:
    return sorted({row[0] for row in client.query("SELECT version FROM schema_migrations FINAL").result_rows})
