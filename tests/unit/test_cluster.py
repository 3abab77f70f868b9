"""The cluster DDL generator (pipeline/sinks/cluster.py) and its settings.

What is verified here: the generated statements parse with sqlglot's ClickHouse dialect, each single-node
table has its Replicated local table and a Distributed table over it with the same columns and keys, every
statement runs ON CLUSTER, the single-node text is kept except for the cluster edits, the single-node path
is untouched. tests/unit/test_cluster_chdb.py runs the same DDL, minus ON CLUSTER and replication, in chDB.
No ClickHouse server or Keeper runs on this machine: ON CLUSTER and the Replicated engines themselves are
not executed anywhere here (docs/clickhouse.md).
"""

from __future__ import annotations

import os
import socket
import threading
from unittest import mock

import pytest
import sqlglot
from sqlglot import exp

from pipeline.errors import SinkError
from pipeline.settings import ENV_PREFIX, Settings
from pipeline.sinks.clickhouse import bookkeeping, connect, migrate, migration_script, migrations
from pipeline.sinks.cluster import (
    Cluster,
    ClusterDDLError,
    cluster_from_settings,
    cluster_migrations,
    delete_target,
    local_name,
    strip_cluster,
)

DB = "segments"
CLUSTER = Cluster("prod", replica_path="/ch/{shard}/{database}/{table}", replica_name="{replica}",
                  sharding_key="xxHash64(customer_id)")


def parse(sql: str) -> exp.Expression:
    return sqlglot.parse_one(sql, read="clickhouse", error_level=sqlglot.ErrorLevel.RAISE)


def creates(statements: list[str]) -> dict[str, exp.Create]:
    out = {}
    for sql in statements:
        parsed = parse(sql)
        if isinstance(parsed, exp.Create) and parsed.args.get("kind") == "TABLE":
            table = parsed.find(exp.Table)
            assert table is not None and table.name not in out
            out[table.name] = parsed
    return out


def flat(plan: list[tuple[int, str, list[str]]]) -> list[str]:
    return [s for _, _, group in plan for s in group]


def engine(create: exp.Create) -> tuple[str, list[str]]:
    prop = create.find(exp.EngineProperty)
    assert prop is not None
    call = prop.this
    if isinstance(call, exp.Anonymous):
        return call.name, [a.sql("clickhouse") for a in call.expressions]
    return call.name, []


def columns(create: exp.Create) -> list[str]:
    assert isinstance(create.this, exp.Schema)
    return [c.sql("clickhouse", identify=True) for c in create.this.expressions]


def clause(create: exp.Create, kind: type[exp.Expression]) -> str | None:
    properties = create.args.get("properties")
    found = [p.sql("clickhouse") for p in properties.expressions if isinstance(p, kind)] if properties else []
    return found[0] if found else None


SINGLE = creates(flat(migrations(DB)))
PLAN = cluster_migrations(migrations(DB), DB, CLUSTER)
TABLES = creates(flat(PLAN))


def test_the_plan_keeps_the_versions_and_descriptions():
    assert [(v, d) for v, d, _ in PLAN] == [(v, d) for v, d, _ in migrations(DB)]
    assert migrations(DB, cluster=CLUSTER) == PLAN


def test_every_statement_parses_and_runs_on_the_cluster():
    for sql in bookkeeping(DB, cluster=CLUSTER) + flat(PLAN):
        on_cluster = parse(sql).find(exp.OnCluster)
        assert on_cluster is not None, sql[:80]
        assert on_cluster.this.name == "prod"


@pytest.mark.parametrize("name", sorted(SINGLE))
def test_every_table_has_its_replicated_local_table_and_a_distributed_table(name):
    original, local, distributed = SINGLE[name], TABLES[local_name(name)], TABLES[name]
    assert columns(local) == columns(original)
    base, base_args = engine(original)
    replicated, args = engine(local)
    assert replicated == f"Replicated{base}"
    assert args[:2] == ["'/ch/{shard}/{database}/{table}'", "'{replica}'"]
    assert args[2:] == base_args, "the version column must stay"
    for kind in (exp.Order, exp.PartitionedByProperty, exp.MergeTreeTTL):
        assert clause(local, kind) == clause(original, kind)

    source = distributed.args.get("expression")
    assert isinstance(source, exp.Table) and (source.db, source.name) == (DB, local_name(name))
    dist, dist_args = engine(distributed)
    assert dist == "Distributed"
    assert dist_args[:3] == ["'prod'", f"'{DB}'", f"'{local_name(name)}'"]
    key = parse(dist_args[3])
    used = {c.name for c in key.find_all(exp.Column)}
    order = {c.name for c in original.find(exp.Order).find_all(exp.Column)}  # type: ignore[union-attr]
    assert used and used <= order, "a row's replacements must land on its shard: shard by the sorting key"
    if "customer_id" in {c.name for c in original.find_all(exp.ColumnDef)}:
        assert dist_args[3] == "xxHash64(customer_id)", "the sharding key setting"


def test_nothing_else_is_created():
    assert set(TABLES) == set(SINGLE) | {local_name(n) for n in SINGLE}


def test_the_single_node_text_is_kept_except_for_the_cluster_edits():
    """An operator reviews the migrations they know: undoing the edits gives back the exact text."""
    local_statements = [s for s in flat(PLAN) if "ENGINE = Distributed" not in s]
    for original, generated in zip(flat(migrations(DB)), local_statements, strict=True):
        undone = (generated.replace(" ON CLUSTER 'prod'", "").replace("_local", "")
                  .replace("Replicated", "").replace("'/ch/{shard}/{database}/{table}', '{replica}', ", "")
                  .replace("('/ch/{shard}/{database}/{table}', '{replica}')", ""))
        assert undone == original


def test_the_materialized_view_feeds_each_shard_from_its_own_changes():
    views = [parse(s) for s in flat(PLAN) if "MATERIALIZED VIEW" in s]
    assert views
    for view in views:
        target = view.find(exp.ToTableProperty)
        assert target is not None and target.this.name.endswith("_local")
        sources = [t.name for t in view.expression.find_all(exp.Table)]
        assert sources and all(s.endswith("_local") for s in sources)


def test_the_bookkeeping_table_is_one_replica_set_over_the_whole_cluster():
    database, table = (parse(s) for s in bookkeeping(DB, cluster=CLUSTER))
    assert database.args.get("kind") in ("DATABASE", "SCHEMA")
    assert isinstance(table, exp.Create)
    name, args = engine(table)
    assert name == "ReplicatedReplacingMergeTree"
    assert args == ["'/ch/all/{database}/{table}'", "'{shard}-{replica}'"]
    single = creates(bookkeeping(DB))
    assert columns(creates([s for s in bookkeeping(DB, cluster=CLUSTER)])["schema_migrations"]) == \
        columns(single["schema_migrations"])


def test_the_single_node_path_is_unchanged():
    for sql in bookkeeping(DB) + flat(migrations(DB)):
        assert "ON CLUSTER" not in sql and "Replicated" not in sql and "Distributed" not in sql
    assert set(SINGLE) == {"segment_changes", "segment_membership", "customer_profiles", "dead_letters", "events",
                           "segment_size_history"}
    assert delete_target(DB, "customer_profiles", None) == f"{DB}.customer_profiles"


class Recorder:
    """A stand-in for the client that records what migrate() sends (no server to send it to)."""

    def __init__(self) -> None:
        self.commands: list[str] = []
        self.inserts: list[str] = []

    def command(self, sql: str) -> None:
        self.commands.append(sql)

    def query(self, sql: str) -> object:
        return type("Result", (), {"result_rows": []})()

    def insert(self, table: str, *args: object, **kwargs: object) -> None:
        self.inserts.append(table)


@pytest.mark.parametrize("cluster", [None, CLUSTER], ids=["single", "cluster"])
def test_migrate_sends_the_statements_of_the_printed_script(cluster):
    recorder = Recorder()
    assert migrate(recorder, DB, cluster=cluster) == [1, 2]
    assert recorder.commands == bookkeeping(DB, cluster=cluster) + flat(migrations(DB, cluster=cluster))
    assert recorder.inserts == [f"{DB}.schema_migrations"] * 2
    script = migration_script(DB, cluster=cluster)
    for sql in recorder.commands:
        assert sql + ";\n" in script
    statements = [s for s in sqlglot.parse(script, read="clickhouse", error_level=sqlglot.ErrorLevel.RAISE) if s]
    inserts = [s for s in statements if isinstance(s, exp.Insert)]
    assert len(statements) == len(recorder.commands) + 1 and len(inserts) == 1


def test_erasure_deletes_from_the_local_tables_on_the_cluster():
    target = delete_target(DB, "segment_membership", CLUSTER)
    parsed = parse(f"DELETE FROM {target} WHERE customer_id IN ('c1') AND since <= 1")
    assert isinstance(parsed, exp.Delete)
    assert parsed.this.name == "segment_membership_local"
    assert parsed.find(exp.OnCluster).this.name == "prod"  # type: ignore[union-attr]


def test_strip_cluster_leaves_what_one_process_without_keeper_runs():
    local = next(s for s in flat(PLAN) if "segment_membership_local" in s and "Replicated" in s)
    stripped = parse(strip_cluster(local))
    assert stripped.find(exp.OnCluster) is None
    assert engine(stripped) == ("ReplacingMergeTree", ["profile_version"])  # type: ignore[arg-type]


@pytest.mark.parametrize("kwargs, message", [
    ({"name": " "}, "empty"),
    ({"replica_path": "/clickhouse/tables/{database}/{table}"}, "{shard}"),
    ({"replica_path": "/clickhouse/tables/{shard}"}, "{table} or {uuid}"),
    ({"sharding_key": "rand()"}, "customer_id alone"),
    ({"sharding_key": "cityHash64(customer_id, segment_id)"}, "customer_id alone"),
    ({"sharding_key": "cityHash64(customer_id"}, "does not parse"),
])
def test_bad_cluster_settings_are_refused(kwargs, message):
    with pytest.raises(ClusterDDLError, match=message.replace("{", r"\{").replace("(", r"\(")):
        Cluster(**{"name": "prod", **kwargs})


def test_a_migration_without_a_cluster_form_is_refused():
    with pytest.raises(ClusterDDLError, match="no cluster form"):
        cluster_migrations([(3, "x", [f"ALTER TABLE {DB}.events ADD COLUMN x UInt8"])], DB, CLUSTER)


def settings(**env: str) -> Settings:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    with mock.patch.dict(os.environ, {**clean, **env}, clear=True):
        return Settings()


def test_settings_default_to_one_node_and_build_the_cluster():
    assert cluster_from_settings(settings()) is None
    built = cluster_from_settings(settings(PIPELINE_CLICKHOUSE_URL="https://u:p@ch:8443/segments",
                                           PIPELINE_CLICKHOUSE_CLUSTER="prod",
                                           PIPELINE_CLICKHOUSE_SHARDING_KEY="xxHash64(customer_id)"))
    assert built == Cluster("prod", sharding_key="xxHash64(customer_id)")


@pytest.mark.parametrize("env, message", [
    ({"PIPELINE_CLICKHOUSE_CLUSTER": "prod"}, "embedded chDB has no cluster"),
    ({"PIPELINE_CLICKHOUSE_URL": "http://ch:8123", "PIPELINE_CLICKHOUSE_CLUSTER": "prod",
      "PIPELINE_CLICKHOUSE_SHARDING_KEY": "rand()"}, "customer_id alone"),
    ({"PIPELINE_CLICKHOUSE_URL": "tcp://ch:9000"}, "expected http"),
])
def test_bad_clickhouse_settings_are_refused(env, message):
    from pipeline.errors import ConfigError

    with pytest.raises((ValueError, ConfigError), match=message):
        settings(**env)


# http(s): no ClickHouse server runs here, so what is checked is what goes on the wire ---------------

def first_bytes(scheme: str) -> bytes:
    """What connect() sends first to a loopback listener that answers nothing and hangs up."""
    listener = socket.create_server(("127.0.0.1", 0))
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    received: list[bytes] = []
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():  # every connection the client retries with is read and hung up on
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(5)
                received.append(conn.recv(16))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        with pytest.raises(SinkError) as error:
            connect(f"{scheme}://user:secret@127.0.0.1:{port}/segments")
        assert "secret" not in str(error.value)
    finally:
        stop.set()
        thread.join(10)
        listener.close()
    assert received, "connect() never reached the listener"
    return received[0]


def test_an_https_url_speaks_tls_on_any_port():
    # clickhouse-connect alone would speak plain HTTP here (port neither 443 nor 8443)
    assert first_bytes("https")[:1] == b"\x16", "expected a TLS handshake record"


def test_an_http_url_speaks_plain_http():
    assert first_bytes("http").split(b" ")[0] in (b"GET", b"POST")
