-- The product's tables on a ClickHouse cluster (DESIGN §4.4), for the workers' PIPELINE_CLICKHOUSE_URL.
--
-- The same tables as the migrations in pipeline/sinks/clickhouse.py, each as
--   <table>_local : ReplicatedReplacingMergeTree ON CLUSTER '{cluster}' (same columns, keys, version)
--   <table>       : Distributed over <table>_local, sharded by customer (so a customer's rows and
--                   their replacements stay on one shard and FINAL deduplicates them)
-- The workers write to and query the Distributed tables by the migrations' names; their own migration
-- then finds every table present (CREATE TABLE IF NOT EXISTS) and the version below already recorded.
--
-- Needs the macros {cluster}, {shard} and {replica} on every server, and Keeper/ZooKeeper.
-- Apply once, on any one node, before starting the workers:
--   clickhouse-client --multiquery < deploy/clickhouse/cluster.sql
-- Writes through a Distributed table are asynchronous by default; for the workers' retry-until-
-- acknowledged semantics give their user `distributed_foreground_insert = 1` (before 23.x:
-- `insert_distributed_sync = 1`) in its settings profile.
-- Keep in step with migrations(): tests/deploy/test_deploy_files.py compares the two.

CREATE DATABASE IF NOT EXISTS segments ON CLUSTER '{cluster}';

-- Migration bookkeeping, one replica set over every node of the cluster (not sharded).
CREATE TABLE IF NOT EXISTS segments.schema_migrations ON CLUSTER '{cluster}' (
    version UInt32,
    description String,
    applied_at DateTime64(3, 'UTC')
) ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/all/{database}/{table}', '{shard}-{replica}')
ORDER BY version;

CREATE TABLE IF NOT EXISTS segments.segment_changes_local ON CLUSTER '{cluster}' (
    customer_id String,
    segment_id LowCardinality(String),
    change Enum8('entered' = 1, 'exited' = 2),
    changed_at DateTime64(3, 'UTC'),
    profile_version UInt64,
    cause String,
    inserted_at DateTime64(3, 'UTC') DEFAULT now64(3)
) ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')
PARTITION BY toYYYYMM(changed_at)
ORDER BY (segment_id, customer_id, profile_version, change);

CREATE TABLE IF NOT EXISTS segments.segment_changes ON CLUSTER '{cluster}'
AS segments.segment_changes_local
ENGINE = Distributed('{cluster}', 'segments', 'segment_changes_local', cityHash64(customer_id));

CREATE TABLE IF NOT EXISTS segments.segment_membership_local ON CLUSTER '{cluster}' (
    segment_id LowCardinality(String),
    customer_id String,
    is_member UInt8,
    since DateTime64(3, 'UTC'),
    profile_version UInt64,
    cause String
) ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}', profile_version)
ORDER BY (segment_id, customer_id);

CREATE TABLE IF NOT EXISTS segments.segment_membership ON CLUSTER '{cluster}'
AS segments.segment_membership_local
ENGINE = Distributed('{cluster}', 'segments', 'segment_membership_local', cityHash64(customer_id));

CREATE TABLE IF NOT EXISTS segments.customer_profiles_local ON CLUSTER '{cluster}' (
    `customer_id` String,
    `anonymous_ids` Array(String),
    `first_seen_at` Nullable(DateTime64(3, 'UTC')),
    `last_seen_at` Nullable(DateTime64(3, 'UTC')),
    `events_count` UInt64,
    `sessions_count` UInt64,
    `page_views_count` UInt64,
    `product_views_count` UInt64,
    `cart_adds_count` UInt64,
    `orders_count` UInt64,
    `lifetime_value` Float64,
    `avg_order_value` Float64,
    `first_purchase_at` Nullable(DateTime64(3, 'UTC')),
    `last_purchase_at` Nullable(DateTime64(3, 'UTC')),
    `orders_30d` Int64,
    `orders_90d` Int64,
    `orders_365d` Int64,
    `spend_30d` Float64,
    `spend_90d` Float64,
    `spend_365d` Float64,
    `category_affinity` Map(String, Float64),
    `top_category` Nullable(String),
    `preferred_channel` Nullable(String),
    `email_opens_count` UInt64,
    `email_clicks_count` UInt64,
    `unsubscribed` Bool,
    `open_tickets_count` UInt64,
    `support_sentiment` Nullable(Float64),
    `nps` Nullable(Int64),
    `nps_at` Nullable(DateTime64(3, 'UTC')),
    `survey_interests` Array(String),
    `survey_motivations` Array(String),
    `surveys_count` UInt64,
    `loyalty_tier` Nullable(String),
    `consent_marketing` Nullable(Bool),
    `segments` Array(String),
    `version` UInt64,
    `updated_at` DateTime64(3, 'UTC')
) ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}', version)
ORDER BY customer_id;

CREATE TABLE IF NOT EXISTS segments.customer_profiles ON CLUSTER '{cluster}'
AS segments.customer_profiles_local
ENGINE = Distributed('{cluster}', 'segments', 'customer_profiles_local', cityHash64(customer_id));

CREATE TABLE IF NOT EXISTS segments.dead_letters_local ON CLUSTER '{cluster}' (
    source_topic LowCardinality(String),
    source_partition Int32,
    source_offset Int64,
    error_class LowCardinality(String),
    error_message String,
    payload String,
    received_at DateTime64(3, 'UTC')
) ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')
ORDER BY (source_topic, source_partition, source_offset);

CREATE TABLE IF NOT EXISTS segments.dead_letters ON CLUSTER '{cluster}'
AS segments.dead_letters_local
ENGINE = Distributed('{cluster}', 'segments', 'dead_letters_local', cityHash64(source_topic, source_partition, source_offset));

CREATE TABLE IF NOT EXISTS segments.events_local ON CLUSTER '{cluster}' (
    event_id String,
    source LowCardinality(String),
    type LowCardinality(String),
    customer_id String,
    occurred_at DateTime64(3, 'UTC'),
    anonymous_id Nullable(String),
    email_hash Nullable(String),
    loyalty_id Nullable(String),
    session_id Nullable(String),
    url Nullable(String),
    product_id Nullable(String),
    category Nullable(String),
    search_query Nullable(String),
    price Nullable(Float64),
    store_id Nullable(String),
    channel Nullable(String),
    total Nullable(Float64),
    currency Nullable(String),
    items String,
    traits Map(String, String),
    marketing Nullable(Bool),
    action Nullable(String),
    campaign_id Nullable(String),
    ticket_id Nullable(String),
    topic Nullable(String),
    sentiment Nullable(Float64),
    survey_id Nullable(String),
    survey_source Nullable(String),
    nps Nullable(Int64),
    interests Array(String),
    motivations Array(String),
    answers Map(String, String)
) ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (customer_id, occurred_at, event_id)
TTL toDateTime(occurred_at) + INTERVAL 400 DAY;

CREATE TABLE IF NOT EXISTS segments.events ON CLUSTER '{cluster}'
AS segments.events_local
ENGINE = Distributed('{cluster}', 'segments', 'events_local', cityHash64(customer_id));

CREATE TABLE IF NOT EXISTS segments.segment_size_history_local ON CLUSTER '{cluster}' (
    segment_id LowCardinality(String),
    hour DateTime('UTC'),
    customer_id String,
    profile_version UInt64,
    delta Int8
) ENGINE = ReplicatedReplacingMergeTree('/clickhouse/tables/{shard}/{database}/{table}', '{replica}')
PARTITION BY toYYYYMM(hour)
ORDER BY (segment_id, hour, customer_id, profile_version, delta);

CREATE TABLE IF NOT EXISTS segments.segment_size_history ON CLUSTER '{cluster}'
AS segments.segment_size_history_local
ENGINE = Distributed('{cluster}', 'segments', 'segment_size_history_local', cityHash64(customer_id));

-- On every node: each shard's changes feed that shard's history (same sharding key).
CREATE MATERIALIZED VIEW IF NOT EXISTS segments.segment_size_history_mv ON CLUSTER '{cluster}'
TO segments.segment_size_history_local AS
SELECT segment_id, toStartOfHour(changed_at) AS hour, customer_id, profile_version,
       toInt8(if(change = 'entered', 1, -1)) AS delta
FROM segments.segment_changes_local;

-- Record the migrations above as applied (a ReplacingMergeTree: re-running this file is harmless).
INSERT INTO segments.schema_migrations (version, description, applied_at)
VALUES (1, 'segment changes, membership, profiles, dead letters', now64(3)),
       (2, 'normalized events; segment size history fed by a materialized view', now64(3));
