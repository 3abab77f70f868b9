from datetime import UTC, datetime

from pipeline.cohorts import cohort, run_sql, segment_sizes
from pipeline.profile import columns, new_profile
from pipeline.sinks.clickhouse import ClickHouseWriter, connect, event_row, migrate

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


def test_every_table_reads_back_what_the_writer_was_given(chdb_dsn, chdb_client, unique):
    """The column-oriented inserts (date-times as epoch ms ticks) store the exact values: epoch ms
    and aware/naive datetimes alike, NULLs where a column allows them, arrays and maps."""
    database = f"t_{unique}"
    writer = ClickHouseWriter(chdb_dsn, database)
    profile = new_profile("c1")
    profile.anonymous_ids.extend(["a1", "a2"])
    profile.first_seen_at = T - 86_400_000 + 7  # a millisecond that a float conversion could round away
    profile.updated_at = T
    row = columns(profile, T)
    as_sent = {**row, "customer_id": "c2", "first_seen_at": T - 1, "updated_at": T,  # JSON carries epoch ms
               "category_affinity": {"books": 0.25}, "nps": None}
    naive = {**row, "customer_id": "c3", "updated_at": datetime(2026, 9, 21, 12, 0, 0, 123000)}  # naive is UTC
    # an older producer's row without some nullable columns: they are NULL
    partial = {name: value for name, value in as_sent.items() if name not in ("first_seen_at", "nps", "top_category")}
    partial.update(customer_id="c4", anonymous_ids=[], category_affinity={}, version=1)
    writer.write(profiles=[row, as_sent, naive, partial],
                 changes=[change("c1", "buyers", "entered", 1, at=datetime.fromtimestamp(T / 1000, tz=UTC)),
                          change("c2", "buyers", "entered", 1, at=T + 1), change("c2", "buyers", "exited", 2, T + 2)],
                 dead_letters=[{"source_topic": "pos", "source_partition": 1, "source_offset": 42,
                                "error_class": "invalid_json", "error_message": "bad", "payload": "{",
                                "received_at": T + 3}],
                 events=[event_row({"event_id": "e1", "source": "pos", "type": "purchase", "occurred_at": T + 4,
                                    "total": 12.5, "items": [{"sku": "s", "quantity": 1}],
                                    "interests": ["x"], "traits": {"k": "v"}}, "c1")])
    client = connect(chdb_dsn)
    profiles = {r[0]: r[1:] for r in client.query(
        f"SELECT customer_id, first_seen_at, updated_at, anonymous_ids, category_affinity, nps, version "
        f"FROM {database}.customer_profiles FINAL").result_rows}

    def utc(ms):
        return datetime.fromtimestamp(ms / 1000, tz=UTC).replace(tzinfo=None)  # chDB hands back naive UTC

    assert profiles["c1"][:4] == (utc(T - 86_400_000 + 7), utc(T), ["a1", "a2"], {})
    assert profiles["c2"][:3] == (utc(T - 1), utc(T), ["a1", "a2"])
    assert profiles["c2"][3:5] == ({"books": 0.25}, None)
    assert profiles["c3"][1] == datetime(2026, 9, 21, 12, 0, 0, 123000)
    assert profiles["c4"] == (None, utc(T), [], {}, None, 1)
    assert client.query(f"SELECT customer_id, change, changed_at FROM {database}.segment_changes FINAL "
                        "ORDER BY changed_at").result_rows == [("c1", "entered", utc(T)), ("c2", "entered", utc(T + 1)),
                                                               ("c2", "exited", utc(T + 2))]
    assert client.query(f"SELECT customer_id, is_member, since, profile_version FROM {database}.segment_membership "
                        "FINAL ORDER BY customer_id").result_rows == [("c1", 1, utc(T), 1), ("c2", 0, utc(T + 2), 2)]
    assert client.query(f"SELECT source_offset, received_at FROM {database}.dead_letters").result_rows == [
        (42, utc(T + 3))]
    assert client.query(f"SELECT customer_id, occurred_at, total, items, interests, traits, anonymous_id "
                        f"FROM {database}.events").result_rows == [
        ("c1", utc(T + 4), 12.5, '[{"sku":"s","quantity":1}]', ["x"], {"k": "v"}, None)]
    # hourly size history through the materialized view: +1 +1 -1
    assert client.query(f"SELECT sum(delta) FROM {database}.segment_size_history FINAL").result_rows == [(1,)]


def test_cohort_pages_walk_the_whole_cohort_in_order(chdb_dsn, chdb_client, unique):
    """Keyset pages (limit, after) give every member exactly once, in the order of the whole
    cohort (since, then customer id: ties on since included), each with its anonymous ids; a
    member who left or a superseded version never shows."""
    database = f"t_{unique}"
    writer = ClickHouseWriter(chdb_dsn, database)
    batch = [change(f"c{i:02d}", "buyers", "entered", 1, at=T + (i // 3) * 1000) for i in range(20)]  # ties by 3
    batch += [change("c05", "buyers", "exited", 2, T + 99_000), change("c07", "other", "entered", 1)]
    profiles = []
    for i in range(0, 20, 2):  # every other member has a profile with anonymous ids
        profile = new_profile(f"c{i:02d}")
        profile.anonymous_ids.append(f"a{i:02d}")
        profile.updated_at = T
        profiles.append(columns(profile, T))
    writer.write(changes=batch, profiles=profiles)
    client = connect(chdb_dsn)
    whole = cohort(client, database, "buyers")
    assert [m["customer_id"] for m in whole] == [f"c{i:02d}" for i in range(20) if i != 5]
    assert whole[0] == {"customer_id": "c00", "since": datetime.fromtimestamp(T / 1000, tz=UTC),
                        "anonymous_ids": ["a00"], "profile_version": 1}
    assert whole[1]["anonymous_ids"] == []  # no profile: no anonymous ids
    walked, after = [], None
    while True:
        page = cohort(client, database, "buyers", limit=4, after=after)
        assert len(page) <= 4
        if not page:
            break
        walked.extend(page)
        after = (page[-1]["since"], page[-1]["customer_id"])
    assert walked == whole
    bare = cohort(client, database, "buyers", anonymous_ids=False)
    assert [(m["customer_id"], m["since"], m["anonymous_ids"]) for m in bare] == [
        (m["customer_id"], m["since"], []) for m in whole]
    assert cohort(client, database, "nobody") == []
