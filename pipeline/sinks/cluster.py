"""The product's ClickHouse DDL for a cluster, derived from the single-node migrations.

With ``PIPELINE_CLICKHOUSE_CLUSTER`` set, every table ``T`` of the migrations becomes

- ``T_local``: the same columns, keys and version, as ``Replicated<Engine>`` (one replica set per
  shard, coordinated through Keeper), created ``ON CLUSTER`` on every node;
- ``T``: a ``Distributed`` table over ``T_local``, sharded by customer, so that the writer's inserts
  and every query (``FINAL`` included) keep using the names of the single-node schema.

A customer's rows, and every later replacement of them, land on one shard (the sharding key is a
function of ``customer_id``, which is in every customer table's sorting key), so ``FINAL``
deduplicates them on that shard and the materialized view turns a shard's ``segment_changes_local``
into that same shard's ``segment_size_history_local``. Lightweight deletes (erasure) go ``ON CLUSTER``
to the ``_local`` tables: a ``Distributed`` table cannot be deleted from.

Statements are rewritten on sqlglot's tokens (string literals and comments are never touched) and
the single-node text is otherwise kept as it is, so an operator reviewing the cluster DDL reads the
migrations they already know; every result is parsed again with sqlglot's ClickHouse dialect and
checked. Pure functions: nothing here talks to ClickHouse.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import sqlglot
from sqlglot import exp
from sqlglot.dialects.dialect import Dialect
from sqlglot.tokens import Token, TokenType

if TYPE_CHECKING:
    from pipeline.settings import Settings

LOCAL_SUFFIX = "_local"
DEFAULT_REPLICA_PATH = "/clickhouse/tables/{shard}/{database}/{table}"
DEFAULT_REPLICA_NAME = "{replica}"
DEFAULT_SHARDING_KEY = "cityHash64(customer_id)"
# The one column a sharding key may use: it is the whole sorting key of customer_profiles, so a key of
# anything else could send two versions of one profile to two shards, where FINAL cannot merge them.
SHARDING_COLUMN = "customer_id"
BOOKKEEPING_TABLE = "schema_migrations"
_DIALECT = Dialect.get_or_raise("clickhouse")


class ClusterDDLError(ValueError):
    """A setting or a migration statement the cluster DDL cannot be generated from."""


def sql_string(value: str) -> str:
    """A ClickHouse string literal."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


@dataclass(frozen=True)
class Cluster:
    """Where and how the tables are replicated and sharded (see docs/clickhouse.md)."""

    name: str
    replica_path: str = DEFAULT_REPLICA_PATH
    replica_name: str = DEFAULT_REPLICA_NAME
    sharding_key: str = DEFAULT_SHARDING_KEY

    def __post_init__(self) -> None:
        if not self.name.strip():
            raise ClusterDDLError("the cluster name is empty")
        if "{shard}" not in self.replica_path:
            # without it every shard would be a replica of the same table: one shard's data everywhere
            raise ClusterDDLError(f"replica path {self.replica_path!r} must contain {{shard}}")
        if "{table}" not in self.replica_path and "{uuid}" not in self.replica_path:
            raise ClusterDDLError(f"replica path {self.replica_path!r} must contain {{table}} or {{uuid}} "
                                  "(one Keeper path per table)")
        if not self.replica_name.strip():
            raise ClusterDDLError("the replica name is empty")
        try:
            key = sqlglot.parse_one(self.sharding_key, read="clickhouse")
        except sqlglot.errors.ParseError as exc:
            raise ClusterDDLError(f"sharding key {self.sharding_key!r} does not parse: {exc}") from None
        used = {column.name for column in key.find_all(exp.Column)}
        if used != {SHARDING_COLUMN}:
            raise ClusterDDLError(f"sharding key {self.sharding_key!r} must be an expression of {SHARDING_COLUMN} "
                                  f"alone (it uses {sorted(used) or 'no column'}): a customer's rows must stay "
                                  "on one shard for FINAL to deduplicate them")

    @property
    def on_cluster(self) -> str:
        return f"ON CLUSTER {sql_string(self.name)}"


def cluster_from_settings(settings: Settings) -> Cluster | None:
    """The cluster of these settings, or None for a single node (PIPELINE_CLICKHOUSE_CLUSTER empty)."""
    if not settings.clickhouse_cluster:
        return None
    return Cluster(settings.clickhouse_cluster, settings.clickhouse_replica_path,
                   settings.clickhouse_replica_name, settings.clickhouse_sharding_key)


def local_name(table: str) -> str:
    return table + LOCAL_SUFFIX


# Token-level rewriting ------------------------------------------------------------------------------------

class _Edits:
    """Text edits at token positions, applied right to left so earlier positions stay valid."""

    def __init__(self, sql: str) -> None:
        self.sql = sql
        self.edits: list[tuple[int, int, str]] = []  # (start, end exclusive, replacement)

    def replace(self, token: Token, text: str) -> None:
        self.edits.append((token.start, token.end + 1, text))

    def insert_after(self, token: Token, text: str) -> None:
        self.edits.append((token.end + 1, token.end + 1, text))

    def apply(self) -> str:
        out = self.sql
        for start, end, text in sorted(self.edits, key=lambda e: (e[0], e[1]), reverse=True):
            out = out[:start] + text + out[end:]
        return out


def _tokens(sql: str) -> list[Token]:
    return [t for t in _DIALECT.tokenize(sql) if t.token_type != TokenType.SEMICOLON]


def _qualified_names(tokens: Sequence[Token], database: str) -> list[tuple[int, str]]:
    """(index of the name token, name) of every ``database.name`` in the statement."""
    found = []
    for i in range(len(tokens) - 2):
        if (tokens[i].text == database and tokens[i + 1].token_type == TokenType.DOT
                and tokens[i + 2].token_type in (TokenType.VAR, TokenType.IDENTIFIER)):
            found.append((i + 2, tokens[i + 2].text))
    return found


def _parse(sql: str) -> exp.Expr:
    try:
        return sqlglot.parse_one(sql, read="clickhouse")
    except sqlglot.errors.ParseError as exc:
        raise ClusterDDLError(f"cannot parse {sql[:80]!r}: {exc}") from None


def _engine(create: exp.Create) -> tuple[str, list[exp.Expression]] | None:
    prop = create.find(exp.EngineProperty)
    if prop is None:
        return None
    call = prop.this
    if isinstance(call, exp.Anonymous):
        return call.name, list(call.expressions)
    return call.name, []


def _create_table(sql: str, create: exp.Create, database: str, cluster: Cluster) -> tuple[str, list[str]]:
    """A single-node CREATE TABLE as (table, [its replicated local table, the Distributed table over it])."""
    table = create.this.this if isinstance(create.this, exp.Schema) else create.this
    assert isinstance(table, exp.Table)
    name = table.name
    engine = _engine(create)
    if engine is None or not engine[0].endswith("MergeTree") or engine[0].startswith("Replicated"):
        raise ClusterDDLError(f"{database}.{name}: expected a *MergeTree engine, got {engine and engine[0]}")
    tokens = _tokens(sql)
    edits = _Edits(sql)
    index, _ = _qualified_names(tokens, database)[0]
    edits.replace(tokens[index], local_name(name))
    edits.insert_after(tokens[index], f" {cluster.on_cluster}")
    at = next(i for i, t in enumerate(tokens) if t.text.upper() == "ENGINE")
    while tokens[at].text != engine[0]:
        at += 1
    replication = f"{sql_string(cluster.replica_path)}, {sql_string(cluster.replica_name)}"
    edits.replace(tokens[at], f"Replicated{engine[0]}")
    if at + 1 < len(tokens) and tokens[at + 1].token_type == TokenType.L_PAREN:
        has_args = tokens[at + 2].token_type != TokenType.R_PAREN
        edits.insert_after(tokens[at + 1], replication + (", " if has_args else ""))
    else:
        edits.insert_after(tokens[at], f"({replication})")
    local = edits.apply()

    columns = {c.name for c in create.find_all(exp.ColumnDef)}
    if SHARDING_COLUMN in columns:
        key = cluster.sharding_key
    else:
        # not a customer table (dead_letters): shard by its whole sorting key, still one shard per row key
        order = create.find(exp.Order)
        assert order is not None, f"{name}: no ORDER BY"
        ordered = order.expressions[0].this
        parts = ordered.expressions if isinstance(ordered, exp.Tuple) else [ordered]
        key = f"cityHash64({', '.join(p.sql('clickhouse') for p in parts)})"
    distributed = (f"CREATE TABLE IF NOT EXISTS {database}.{name} {cluster.on_cluster}\n"
                   f"AS {database}.{local_name(name)}\n"
                   f"ENGINE = Distributed({sql_string(cluster.name)}, {sql_string(database)}, "
                   f"{sql_string(local_name(name))}, {key})")
    return name, [local, distributed]


def _create_view(sql: str, create: exp.Create, database: str, cluster: Cluster, local_tables: set[str]) -> str:
    """A materialized view reads from and writes to the local tables: each node feeds its own shard."""
    tokens = _tokens(sql)
    edits = _Edits(sql)
    names = _qualified_names(tokens, database)
    view_index, _ = names[0]
    edits.insert_after(tokens[view_index], f" {cluster.on_cluster}")
    for index, name in names[1:]:
        if name not in local_tables:
            raise ClusterDDLError(f"{create.this.name}: {database}.{name} is not a table of the migrations")
        edits.replace(tokens[index], local_name(name))
    return edits.apply()


def _create_database(sql: str, database: str, cluster: Cluster) -> str:
    tokens = _tokens(sql)
    edits = _Edits(sql)
    index = next(i for i, t in enumerate(tokens) if t.text == database)
    edits.insert_after(tokens[index], f" {cluster.on_cluster}")
    return edits.apply()


def cluster_migrations(migrations: Iterable[tuple[int, str, list[str]]], database: str,
                       cluster: Cluster) -> list[tuple[int, str, list[str]]]:
    """The single-node migrations (``clickhouse.migrations()``) as their cluster DDL, version for version."""
    out = []
    local_tables: set[str] = set()
    for version, description, statements in migrations:
        converted: list[str] = []
        for sql in statements:
            parsed = _parse(sql)
            kind = parsed.args.get("kind") if isinstance(parsed, exp.Create) else None
            if kind == "TABLE":
                assert isinstance(parsed, exp.Create)
                name, pair = _create_table(sql, parsed, database, cluster)
                local_tables.add(name)
                converted += pair
            elif kind == "VIEW" and parsed.find(exp.MaterializedProperty) is not None:
                assert isinstance(parsed, exp.Create)
                converted.append(_create_view(sql, parsed, database, cluster, local_tables))
            else:
                # a new kind of migration (ALTER, a plain view, ...) must be thought through for a cluster
                raise ClusterDDLError(f"migration {version}: no cluster form for {sql[:60]!r}")
        out.append((version, description, converted))
    return out


def bookkeeping_statements(database: str, cluster: Cluster) -> list[str]:
    """The database and the migration bookkeeping table on every node. schema_migrations is one replica
    set over the whole cluster (every node sees every applied version), not sharded: its Keeper path
    has 'all' for the shard, and its replica names carry the shard to stay unique."""
    path = cluster.replica_path.replace("{shard}", "all")
    replica = "{shard}-" + cluster.replica_name
    return [
        f"CREATE DATABASE IF NOT EXISTS {database} {cluster.on_cluster}",
        f"""CREATE TABLE IF NOT EXISTS {database}.{BOOKKEEPING_TABLE} {cluster.on_cluster} (
    version UInt32, description String, applied_at DateTime64(3, 'UTC')
) ENGINE = ReplicatedReplacingMergeTree({sql_string(path)}, {sql_string(replica)}) ORDER BY version""",
    ]


def delete_target(database: str, table: str, cluster: Cluster | None) -> str:
    """What a lightweight DELETE names: the table on one node; on a cluster the local tables of every
    node (ClickHouse cannot delete through a Distributed table)."""
    if cluster is None:
        return f"{database}.{table}"
    return f"{database}.{local_name(table)} {cluster.on_cluster}"


def strip_cluster(sql: str) -> str:
    """The statement without its cluster-only parts (ON CLUSTER; Replicated engines become their plain
    MergeTree, without the Keeper path and replica name): what a single ClickHouse process without Keeper
    can run. The rest of the text is kept as generated. For tests that run the generated DDL in chDB; the
    Distributed tables are kept."""
    tokens = _tokens(sql)
    edits = _Edits(sql)
    for i, token in enumerate(tokens):
        if token.token_type == TokenType.ON and i + 2 < len(tokens) and tokens[i + 1].text.upper() == "CLUSTER":
            edits.edits.append((token.start - 1, tokens[i + 2].end + 1, ""))  # with the space before ON
        elif token.text.startswith("Replicated") and token.text.endswith("MergeTree"):
            edits.replace(token, token.text[len("Replicated"):])
            args = tokens[i + 2:i + 6]  # 'path' , 'replica' then ) or ,
            assert tokens[i + 1].token_type == TokenType.L_PAREN and len(args) == 4
            if args[3].token_type == TokenType.R_PAREN:
                edits.edits.append((tokens[i + 1].start, args[3].end + 1, ""))
            else:
                edits.edits.append((args[0].start, tokens[i + 6].start, ""))
    return edits.apply()
