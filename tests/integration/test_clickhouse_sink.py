from datetime import UTC, datetime

from pipeline.cohorts import cohort, run_sql, segment_sizes
from pipeline.profile import columns, new_profile
from pipeline.sinks.clickhouse import ClickHouseWriter, connect, migrate

T = 1_790_000_000_000


def change(customer, segment, kind, version, at=T):
    return {"customer_id": customer, "segment_id": segment, "change": kind, "changed_at": at,
            "profile_version": version, "cause": f"e{version}"}


def test_membership_is_idempotent_under_redelivery(chdb_dsn, chdb_client, unique):
    database = f"t_{unique}"
    writer = ClickHouseWriter(chdb_dsn, database)
    batch = [change("c1", "buyers", "entered", 1), change("c2", "buyers", "entered", 1),
             change("c2", "buyers", "exited", 2, T + 5)]
    profile = new_profile("c1")
    profile.anonymous_ids.append("a1")
    writer.write(changes=batch, profiles=[columns(profile, T)])
    writer.write(changes=batch)  # redelivered after a crash
    client = connect(chdb_dsn)
    assert client is chdb_client  # one chDB client per data path and process
    assert migrate(client, database) == []  # already applied
    members = cohort(client, database, "buyers")
    assert [(m["customer_id"], m["anonymous_ids"]) for m in members] == [("c1", ["a1"])]
    assert members[0]["since"] == datetime.fromtimestamp(T / 1000, tz=UTC)
    assert segment_sizes(client, database) == {"buyers": 1}
    names, rows = run_sql(client, f"SELECT count() FROM {database}.segment_changes FINAL")
    assert rows == [(3,)]
