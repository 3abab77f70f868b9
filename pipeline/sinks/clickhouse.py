"""ClickHouse: the product's tables (versioned migrations) and the batched, idempotent writer.

Works with ``chdb://`` (embedded, in-process) and ``http(s)://`` servers through the same
clickhouse-connect client API. Redelivered rows do not change query results: every table is
a ReplacingMergeTree keyed so that a redelivered row is the same row, and queries use FINAL.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from operator import itemgetter
from typing import Any
from urllib.parse import urlparse

from pipeline.errors import SinkError
from pipeline.segments.columns import PROFILE_COLUMNS
from pipeline.sinks.cluster import Cluster, bookkeeping_statements, cluster_migrations, delete_target, sql_string

log = logging.getLogger(__name__)

_clients: dict[str, Any] = {}
_clients_lock = threading.Lock()
UNAVAILABLE_SUFFIX = ".unavailable"  # test hook, see ClickHouseWriter._check_available
LOCK_WAIT_S = 30.0  # the writer's chDB child waits this long for a killed worker's child to let go


def connect(dsn: str, *, database: str | None = None, process: bool | None = None, lock_wait_s: float = 0.0) -> Any:
    """A clickhouse-connect client for a chdb:// or http(s):// DSN (chDB clients are shared:
    a data directory can be held by one client per process).

    A chdb:// engine runs in a child process behind a proxy client (pipeline/sinks/chdb_process.py)
    unless ``process`` is false (default: PIPELINE_CLICKHOUSE_PROCESS): the process that calls
    this still holds the data path, through its child, as far as any other process can tell.
    ``lock_wait_s``: how long that child waits for another process to let go of the data path
    (the writer's: a worker restarted right after a SIGKILL, while its old child finishes)."""
    import clickhouse_connect

    try:
        if dsn.startswith("chdb://"):
            with _clients_lock:
                client = _clients.get(dsn)
                if client is None:
                    options: dict[str, Any] = {"dsn": dsn}  # clickhouse_connect.get_client's arguments
                    if process is None:
                        from pipeline.settings import load_settings

                        process = load_settings().clickhouse_process
                    if process:
                        from pipeline.sinks.chdb_process import ChdbProcessClient

                        client = ChdbProcessClient(options, lock_wait_s=lock_wait_s)
                    else:
                        client = clickhouse_connect.get_client(**options)
                    _clients[dsn] = client
                return client
        parsed = urlparse(dsn)
        # interface from the scheme: clickhouse-connect 1.12 ignores it and speaks plain HTTP to an
        # https:// DSN whose port is not 443 or 8443 (the password would cross the network in clear)
        return clickhouse_connect.get_client(
            dsn=dsn, interface=parsed.scheme, database=database or (parsed.path.strip("/") or None), query_limit=0
        )
    except Exception as exc:  # noqa: BLE001 - connection errors of every kind
        safe = dsn.split("@")[-1] if "@" in dsn else dsn
        raise SinkError(f"cannot connect to ClickHouse at {safe}: {exc}") from None


def _profile_columns_ddl() -> str:
    return ",\n    ".join(f"`{name}` {ch_type}" for name, (_, _, ch_type) in PROFILE_COLUMNS.items())


# events: the normalized events as folded, under the key of the profile they were folded into
EVENT_SPEC: list[tuple[str, str]] = [
    ("event_id", "String"), ("source", "LowCardinality(String)"), ("type", "LowCardinality(String)"),
    ("customer_id", "String"), ("occurred_at", "DateTime64(3, 'UTC')"),
    ("anonymous_id", "Nullable(String)"), ("email_hash", "Nullable(String)"), ("loyalty_id", "Nullable(String)"),
    ("session_id", "Nullable(String)"), ("url", "Nullable(String)"), ("product_id", "Nullable(String)"),
    ("category", "Nullable(String)"), ("search_query", "Nullable(String)"), ("price", "Nullable(Float64)"),
    ("store_id", "Nullable(String)"), ("channel", "Nullable(String)"), ("total", "Nullable(Float64)"),
    ("currency", "Nullable(String)"), ("items", "String"), ("traits", "Map(String, String)"),
    ("marketing", "Nullable(Bool)"), ("action", "Nullable(String)"), ("campaign_id", "Nullable(String)"),
    ("ticket_id", "Nullable(String)"), ("topic", "Nullable(String)"), ("sentiment", "Nullable(Float64)"),
    ("survey_id", "Nullable(String)"), ("survey_source", "Nullable(String)"), ("nps", "Nullable(Int64)"),
    ("interests", "Array(String)"), ("motivations", "Array(String)"), ("answers", "Map(String, String)"),
]
EVENTS_TTL_DAYS = 400


def migrations(db: str, *, events_ttl_days: int = EVENTS_TTL_DAYS,
               cluster: Cluster | None = None) -> list[tuple[int, str, list[str]]]:
    """(version, description, statements): applied in order, each once. With a cluster, the same
    versions as their cluster DDL (pipeline/sinks/cluster.py)."""
    event_columns = ",\n    ".join(f"{name} {ch_type}" for name, ch_type in EVENT_SPEC)
    plan = [
        (1, "segment changes, membership, profiles, dead letters", [
            f"""CREATE TABLE IF NOT EXISTS {db}.segment_changes (
    customer_id String,
    segment_id LowCardinality(String),
    change Enum8('entered' = 1, 'exited' = 2),
    changed_at DateTime64(3, 'UTC'),
    profile_version UInt64,
    cause String,
    inserted_at DateTime64(3, 'UTC') DEFAULT now64(3)
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(changed_at)
ORDER BY (segment_id, customer_id, profile_version, change)""",
            f"""CREATE TABLE IF NOT EXISTS {db}.segment_membership (
    segment_id LowCardinality(String),
    customer_id String,
    is_member UInt8,
    since DateTime64(3, 'UTC'),
    profile_version UInt64,
    cause String
) ENGINE = ReplacingMergeTree(profile_version)
ORDER BY (segment_id, customer_id)""",
            f"""CREATE TABLE IF NOT EXISTS {db}.customer_profiles (
    {_profile_columns_ddl()}
) ENGINE = ReplacingMergeTree(version)
ORDER BY customer_id""",
            f"""CREATE TABLE IF NOT EXISTS {db}.dead_letters (
    source_topic LowCardinality(String),
    source_partition Int32,
    source_offset Int64,
    error_class LowCardinality(String),
    error_message String,
    payload String,
    received_at DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree
ORDER BY (source_topic, source_partition, source_offset)""",
        ]),
        (2, "normalized events; segment size history fed by a materialized view", [
            f"""CREATE TABLE IF NOT EXISTS {db}.events (
    {event_columns}
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(occurred_at)
ORDER BY (customer_id, occurred_at, event_id)
TTL toDateTime(occurred_at) + INTERVAL {int(events_ttl_days)} DAY""",
            f"""CREATE TABLE IF NOT EXISTS {db}.segment_size_history (
    segment_id LowCardinality(String),
    hour DateTime('UTC'),
    customer_id String,
    profile_version UInt64,
    delta Int8
) ENGINE = ReplacingMergeTree
PARTITION BY toYYYYMM(hour)
ORDER BY (segment_id, hour, customer_id, profile_version, delta)""",
            f"""CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.segment_size_history_mv TO {db}.segment_size_history AS
SELECT segment_id, toStartOfHour(changed_at) AS hour, customer_id, profile_version,
       toInt8(if(change = 'entered', 1, -1)) AS delta
FROM {db}.segment_changes""",
        ]),
    ]
    return plan if cluster is None else cluster_migrations(plan, db, cluster)


def bookkeeping(database: str, *, cluster: Cluster | None = None) -> list[str]:
    """The database and the table recording applied versions, created before any migration."""
    if cluster is not None:
        return bookkeeping_statements(database, cluster)
    return [f"CREATE DATABASE IF NOT EXISTS {database}",
            f"""CREATE TABLE IF NOT EXISTS {database}.schema_migrations (
    version UInt32, description String, applied_at DateTime64(3, 'UTC')
) ENGINE = ReplacingMergeTree ORDER BY version"""]


def migration_script(database: str, *, events_ttl_days: int = EVENTS_TTL_DAYS, cluster: Cluster | None = None) -> str:
    """Every statement migrate() would run on an empty server, then the rows recording the versions
    (so that the workers' own migrate() finds them applied), as one reviewable script for
    `clickhouse-client --multiquery` (`pipeline clickhouse migrate --print`)."""
    plan = migrations(database, events_ttl_days=events_ttl_days, cluster=cluster)
    target = f"cluster {cluster.name!r}" if cluster is not None else "a single node"
    lines = [
        f"-- The product's ClickHouse tables in database {database}, for {target}.",
        "-- Generated by `pipeline clickhouse migrate --print` from the migrations in pipeline/sinks/clickhouse.py",
        "-- (and pipeline/sinks/cluster.py for a cluster); docs/clickhouse.md explains it. Do not edit: regenerate.",
    ]
    if cluster is not None:
        lines += [
            "-- Needs Keeper (or ZooKeeper) and, on every server, the macros the names below use ({shard}, {replica},",
            "-- and {cluster} if the cluster is named by it). Apply on any one node:",
            "--   clickhouse-client --multiquery < FILE",
            "-- The workers insert through Distributed tables: give their ClickHouse user",
            "-- distributed_foreground_insert = 1 (before 23.x: insert_distributed_sync = 1) in its settings profile,",
            "-- so that an acknowledged insert is on the shards (the workers also set it on their session).",
        ]
    statements = bookkeeping(database, cluster=cluster) + [s for _, _, group in plan for s in group]
    values = ",\n       ".join(f"({version}, {sql_string(description)}, now64(3))" for version, description, _ in plan)
    statements.append(f"INSERT INTO {database}.schema_migrations (version, description, applied_at)\n"
                      f"VALUES {values}")
    return "\n".join(lines) + "\n\n" + "".join(f"{s};\n\n" for s in statements).rstrip("\n") + "\n"


def migrate(client: Any, database: str, *, events_ttl_days: int = EVENTS_TTL_DAYS,
            cluster: Cluster | None = None) -> list[int]:
    """Apply the migrations not applied yet; return the versions applied now (idempotent)."""
    for statement in bookkeeping(database, cluster=cluster):
        client.command(statement)
    done = {row[0] for row in client.query(f"SELECT version FROM {database}.schema_migrations FINAL").result_rows}
    applied = []
    for version, description, statements in migrations(database, events_ttl_days=events_ttl_days, cluster=cluster):
        if version in done:
            continue
        for statement in statements:
            client.command(statement)
        client.insert(f"{database}.schema_migrations", [[version, description, datetime.now(UTC)]],
                      column_names=["version", "description", "applied_at"],
                      column_type_names=["UInt32", "String", "DateTime64(3, 'UTC')"])
        applied.append(version)
    return applied


def _dt(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)
_TICK_TYPES = {int, type(None)}


def _ms(value: Any) -> int | None:
    """Epoch milliseconds for a DateTime64(3) cell (None stays None; a naive datetime is UTC)."""
    if value is None or type(value) is int:
        return value  # type: ignore[no-any-return]
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return (aware - _EPOCH) // _MILLISECOND  # floor, as clickhouse-connect converts a datetime
    return int(value)


def _ms_column(values: Sequence[Any]) -> Sequence[Any]:
    """A DateTime64(3) column as epoch milliseconds. clickhouse-connect writes a column whose first
    value is an int as raw ticks (milliseconds at scale 3), so every value must then be an int or
    None; the sink's values already are (JSON and Avro carry epoch ms), and this pass costs far
    less than building a datetime per cell for clickhouse-connect to take apart again."""
    if set(map(type, values)) <= _TICK_TYPES:  # checked in C, without a Python-level loop
        return values
    return [_ms(v) for v in values]


CHANGE_COLUMNS = ["customer_id", "segment_id", "change", "changed_at", "profile_version", "cause"]
CHANGE_TYPES = ["String", "LowCardinality(String)", "Enum8('entered' = 1, 'exited' = 2)",
                "DateTime64(3, 'UTC')", "UInt64", "String"]
MEMBERSHIP_COLUMNS = ["segment_id", "customer_id", "is_member", "since", "profile_version", "cause"]
MEMBERSHIP_TYPES = ["LowCardinality(String)", "String", "UInt8", "DateTime64(3, 'UTC')", "UInt64", "String"]
DEAD_COLUMNS = ["source_topic", "source_partition", "source_offset", "error_class", "error_message",
                "payload", "received_at"]
DEAD_TYPES = ["LowCardinality(String)", "Int32", "Int64", "LowCardinality(String)", "String", "String",
              "DateTime64(3, 'UTC')"]
PROFILE_COLUMN_NAMES = list(PROFILE_COLUMNS)
TIME_COLUMNS = {"customer_profiles": "updated_at", "segment_changes": "changed_at", "segment_membership": "since",
                "segment_size_history": "hour", "events": "occurred_at"}
PROFILE_TABLES = ("customer_profiles",)
CHANGE_TABLES = ("segment_changes", "segment_membership", "segment_size_history")
EVENT_TABLES = ("events",)
EVENT_COLUMN_NAMES = [name for name, _ in EVENT_SPEC]
EVENT_TYPES = [ch_type for _, ch_type in EVENT_SPEC]
_EVENT_TIME_INDEX = EVENT_COLUMN_NAMES.index("occurred_at")
_change_values = itemgetter("customer_id", "segment_id", "change", "changed_at", "profile_version", "cause")
_dead_values = itemgetter(*DEAD_COLUMNS)


def event_row(event: dict[str, Any], customer_id: str) -> list[Any]:
    """An events row from a normalized event (``Event.to_dict()``), under the profile's key."""
    import json

    row = []
    for name, ch_type in EVENT_SPEC:
        if name == "customer_id":
            value: Any = customer_id
        elif name == "occurred_at":
            value = _ms(event["occurred_at"])
        elif name == "items":
            value = json.dumps(event.get("items", []), separators=(",", ":"))
        elif ch_type.startswith(("Map", "Array")):
            value = event.get(name) or ({} if ch_type.startswith("Map") else [])
        else:
            value = event.get(name)
        row.append(value)
    return row
PROFILE_TYPES = [ch_type for _, _, ch_type in PROFILE_COLUMNS.values()]


PROFILE_TIME_INDEXES = [i for i, (kind, _, _) in enumerate(PROFILE_COLUMNS.values()) if kind.value == "datetime"]
_profile_values = itemgetter(*PROFILE_COLUMN_NAMES)


def profile_row(columns: dict[str, Any]) -> list[Any]:
    """A customer_profiles row from the profile's columns (as sent on profile-updates, or as
    ``profile.columns`` gives them); date-times as epoch milliseconds."""
    row = [columns.get(name) for name in PROFILE_COLUMN_NAMES]
    for i in PROFILE_TIME_INDEXES:
        row[i] = _ms(row[i])
    return row


def profile_columns(profiles: Sequence[dict[str, Any]]) -> list[Sequence[Any]]:
    """customer_profiles columns (column-oriented insert) from the profiles' columns."""
    if not profiles:
        return [[] for _ in PROFILE_COLUMN_NAMES]
    try:
        # one C-level lookup per profile, dict by dict (reading one column across every dict is
        # cache-unfriendly and measured slower); a profile-updates row carries every column
        columns: list[Sequence[Any]] = list(zip(*map(_profile_values, profiles), strict=True))
    except KeyError:  # a row without some nullable columns (an older producer): they are NULL
        columns = list(zip(*([p.get(name) for name in PROFILE_COLUMN_NAMES] for p in profiles), strict=True))
    for i in PROFILE_TIME_INDEXES:
        columns[i] = _ms_column(columns[i])
    return columns


class ClickHouseWriter:
    """Inserts batches into the product's tables. Call from one thread (an executor)."""

    def __init__(self, dsn: str, database: str, *, events_ttl_days: int = EVENTS_TTL_DAYS,
                 cluster: Cluster | None = None) -> None:
        self.dsn = dsn
        self.database = database
        self.events_ttl_days = events_ttl_days
        self.cluster = cluster
        self._client: Any = None

    @property
    def client(self) -> Any:
        if self._client is None:
            self._client = connect(self.dsn, database=self.database, lock_wait_s=LOCK_WAIT_S)
            if self.cluster is not None:
                # a Distributed insert is acknowledged before the shards have the rows unless in the
                # foreground: offsets would be committed for rows still queued on one node
                self._client.set_client_setting("distributed_foreground_insert", "1")
            migrate(self._client, self.database, events_ttl_days=self.events_ttl_days, cluster=self.cluster)
        return self._client

    def _check_available(self) -> None:
        """Fault-injection hook for the tests (docs/reliability.md): with an embedded ``chdb://``
        DSN, while a file named ``<chDB data path>.unavailable`` exists (``DATA_DIR/clickhouse.unavailable``
        by default), every write fails as if ClickHouse were unreachable."""
        if self.dsn.startswith("chdb://"):
            flag = self.dsn[len("chdb://"):] + UNAVAILABLE_SUFFIX
            if os.path.exists(flag):
                raise SinkError(f"ClickHouse unavailable (fault injected while {flag} exists)")

    def reset(self) -> None:
        """Forget the connection after a failure (the next write reconnects)."""
        if not self.dsn.startswith("chdb://"):
            self._client = None

    def delete_customers(self, keys: Sequence[str], *, until_ms: int, tables: Sequence[str]) -> None:
        """Remove customers' rows written up to ``until_ms`` from ``tables`` (customer_profiles
        for an absorbed or erased profile; segment_changes and segment_membership for an erased
        customer, DESIGN §4.1). Lightweight deletes: idempotent under redelivery."""
        if not keys:
            return
        self._check_available()
        client = self.client
        params = {"keys": list(keys), "until": _dt(until_ms)}
        for table in tables:
            column = TIME_COLUMNS[table]
            target = delete_target(self.database, table, self.cluster)  # the local tables, on a cluster
            client.command(f"DELETE FROM {target} WHERE customer_id IN %(keys)s AND {column} <= %(until)s",
                           parameters=params)

    def write(self, *, changes: Sequence[dict[str, Any]] = (), profiles: Sequence[dict[str, Any]] = (),
              dead_letters: Sequence[dict[str, Any]] = (), events: Sequence[list[Any]] = ()) -> None:
        """Insert one batch; raises on failure so the caller can retry the same batch.

        Inserts are column-oriented with explicit column types, date-times as epoch milliseconds:
        the rows are transposed once in C (``zip``) and no datetime is built per cell (both were
        most of the writer's time, benchmarks/README.md). Redelivery stays harmless: the same rows
        land on the same ReplacingMergeTree keys and versions.
        """
        self._check_available()
        client = self.client
        db = self.database
        if events:
            event_columns: list[Sequence[Any]] = list(zip(*events, strict=True))
            event_columns[_EVENT_TIME_INDEX] = _ms_column(event_columns[_EVENT_TIME_INDEX])
            client.insert(f"{db}.events", event_columns, column_names=EVENT_COLUMN_NAMES,
                          column_type_names=EVENT_TYPES, column_oriented=True)
        if profiles:
            client.insert(f"{db}.customer_profiles", profile_columns(profiles), column_names=PROFILE_COLUMN_NAMES,
                          column_type_names=PROFILE_TYPES, column_oriented=True)
        if changes:
            customer_ids, segment_ids, kinds, changed_at, versions, causes = zip(
                *map(_change_values, changes), strict=True)
            at = _ms_column(changed_at)
            client.insert(f"{db}.segment_changes", [customer_ids, segment_ids, kinds, at, versions, causes],
                          column_names=CHANGE_COLUMNS, column_type_names=CHANGE_TYPES, column_oriented=True)
            # the membership row shares five of the change's columns: the same sequences are reused
            is_member = [1 if kind == "entered" else 0 for kind in kinds]
            client.insert(f"{db}.segment_membership", [segment_ids, customer_ids, is_member, at, versions, causes],
                          column_names=MEMBERSHIP_COLUMNS, column_type_names=MEMBERSHIP_TYPES, column_oriented=True)
        if dead_letters:
            dead_columns: list[Sequence[Any]] = list(zip(*map(_dead_values, dead_letters), strict=True))
            dead_columns[-1] = _ms_column(dead_columns[-1])
            client.insert(f"{db}.dead_letters", dead_columns, column_names=DEAD_COLUMNS, column_type_names=DEAD_TYPES,
                          column_oriented=True)
