"""The generated cluster DDL run in the real ClickHouse engine (chDB), minus what needs a cluster.

chDB refuses ON CLUSTER ("Replicated DDL queries are disabled") and has no Keeper for the Replicated
engines, so those two are stripped (cluster.strip_cluster); everything else runs as generated: the
``_local`` tables with their keys and versions, the Distributed tables over them (a one-shard cluster whose
replica is this process, declared in a config file with the {cluster}/{shard}/{replica} macros), the
materialized view between the local tables, the writer's inserts through the Distributed tables, cohort
queries with FINAL through them, and the erasure DELETE on the local tables. One chDB engine per process,
so this runs in a child process.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

CONFIG = """<clickhouse>
  <macros><cluster>pipeline_test</cluster><shard>01</shard><replica>r1</replica></macros>
  <remote_servers>
    <pipeline_test><shard><replica><host>localhost</host><port>9000</port></replica></shard></pipeline_test>
  </remote_servers>
  <tcp_port>9000</tcp_port>
</clickhouse>
"""

CHILD = textwrap.dedent('''
    import json, sys
    from datetime import UTC, datetime
    import chdb
    from pipeline.cohorts import cohort
    from pipeline.profile import columns, new_profile
    from pipeline.sinks.clickhouse import ClickHouseWriter, bookkeeping, connect, migrate, migrations
    from pipeline.sinks.cluster import Cluster, delete_target, strip_cluster

    path, config = sys.argv[1], sys.argv[2]
    engine = chdb.connect(f"{path}?config-file={config}")  # the process's engine, with the cluster config
    db, cluster = "segments", Cluster("{cluster}")
    client = connect(f"chdb://{path}", process=False)  # the engine opened above, with its config
    statements = bookkeeping(db, cluster=cluster) + [s for _, _, g in migrations(db, cluster=cluster) for s in g]
    for statement in statements:
        client.command(strip_cluster(statement))
    for version, description, _ in migrations(db):
        client.insert(f"{db}.schema_migrations", [[version, description, datetime.now(UTC)]],
                      column_names=["version", "description", "applied_at"])
    applied = migrate(client, db)  # the worker's own migrate finds every version applied

    writer = ClickHouseWriter(f"chdb://{path}", db)
    t0 = 1_767_268_800_000  # 2026-01-01T12:00:00Z
    changes = [
        {"customer_id": "c1", "segment_id": "vip", "change": "entered", "changed_at": t0, "profile_version": 1,
         "cause": "e1"},
        {"customer_id": "c2", "segment_id": "vip", "change": "entered", "changed_at": t0 + 1, "profile_version": 1,
         "cause": "e2"},
        {"customer_id": "c2", "segment_id": "vip", "change": "exited", "changed_at": t0 + 2, "profile_version": 2,
         "cause": "e3"},
        {"customer_id": "c3", "segment_id": "vip", "change": "entered", "changed_at": t0 + 3, "profile_version": 1,
         "cause": "e4"},
    ]
    profiles = []
    for c in ("c1", "c2", "c3"):
        state = new_profile(c)
        state.anonymous_ids.append(f"a-{c}")
        profiles.append(columns(state, t0))
    writer.write(changes=changes, profiles=profiles)
    writer.write(changes=changes[:1], profiles=profiles[:1])  # redelivered: no change in the results
    out = {"applied": applied,
           "members": [m["customer_id"] for m in cohort(client, db, "vip")],
           "anonymous_ids": {m["customer_id"]: m["anonymous_ids"] for m in cohort(client, db, "vip")},
           "history": client.query(f"SELECT sum(delta) FROM {db}.segment_size_history FINAL").result_rows[0][0],
           "local_history": client.query(
               f"SELECT count() FROM {db}.segment_size_history_local FINAL").result_rows[0][0]}
    for table in ("segment_membership", "segment_changes", "customer_profiles"):
        target = delete_target(db, table, cluster)
        client.command(strip_cluster(f"DELETE FROM {target} WHERE customer_id IN ('c1') AND 1 = 1"))
    out["after_erasure"] = [m["customer_id"] for m in cohort(client, db, "vip")]
    out["c1_rows"] = sum(client.query(f"SELECT count() FROM {db}.{t} WHERE customer_id = 'c1'").result_rows[0][0]
                         for t in ("segment_membership", "segment_changes", "customer_profiles"))
    out["engines"] = dict(client.query(
        f"SELECT name, engine FROM system.tables WHERE database = '{db}'").result_rows)
    print("RESULT " + json.dumps(out))
    engine.close()
''')


def test_the_generated_cluster_ddl_runs_in_clickhouse_without_the_cluster_parts(tmp_path: Path):
    config = tmp_path / "config.xml"
    config.write_text(CONFIG)
    done = subprocess.run([sys.executable, "-c", CHILD, str(tmp_path / "chdb"), str(config)],
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line[len("RESULT "):])
    assert out["applied"] == []
    assert out["members"] == ["c1", "c3"]
    assert out["anonymous_ids"] == {"c1": ["a-c1"], "c3": ["a-c3"]}
    assert out["history"] == 2 and out["local_history"] == 4, "the view fed the local history from the local changes"
    assert out["after_erasure"] == ["c3"]
    assert out["c1_rows"] == 0
    engines = out["engines"]
    for name in ("segment_changes", "segment_membership", "customer_profiles", "dead_letters", "events",
                 "segment_size_history"):
        assert engines[name] == "Distributed"
        assert engines[f"{name}_local"] == "ReplacingMergeTree"
    assert engines["segment_size_history_mv"] == "MaterializedView"
