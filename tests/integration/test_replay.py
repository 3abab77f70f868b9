"""`pipeline replay` on the real embedded broker, worker (RocksDB store, the service default) and
chDB: events in, the event-time clock's transitions applied up to the last event, then
`pipeline cohort` and `pipeline sql` on the same data dir (issue 2 item 3, issue 5 item 4)."""

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

T0 = datetime(2026, 1, 1, 10, 0, tzinfo=UTC)
DAY = timedelta(days=1)

SEGMENTS = """segments:
  - id: buyers
    where: orders_count >= 1
  - id: recent_buyers
    where: orders_30d >= 1
  - id: inactive_week
    where: dateDiff('day', last_seen_at, now()) >= 7
"""


def ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def pipeline(*args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replay")
    (tmp / "segments.yaml").write_text(SEGMENTS)
    purchase = {"items": [{"sku": "pan", "category": "cookware", "quantity": 1, "unit_price": 25.0}], "total": 25.0}
    (tmp / "pos.jsonl").write_text("\n".join(json.dumps(e) for e in [
        {**purchase, "transaction_id": "tx-1", "customer_id": "c1", "occurred_at": T0.isoformat()},
        {**purchase, "transaction_id": "tx-2", "customer_id": "c2", "occurred_at": ms(T0 + 31 * DAY)},
    ]) + "\n")
    (tmp / "clicks.jsonl").write_text(
        json.dumps({"event_id": "v-1", "customer_id": "c3", "type": "page_view",
                    "occurred_at": (T0 + 20 * DAY).isoformat()}) + "\n"
        "{not json\n"
        + json.dumps({"event_id": "v-2", "customer_id": "c4", "type": "teleport", "occurred_at": ms(T0)}) + "\n")
    env = {**os.environ, "PIPELINE_LOG_LEVEL": "warning"}
    env.pop("PIPELINE_STORE", None)  # the service default, rocksdb://
    data = tmp / "data"
    run = pipeline("replay", "--source", "pos", str(tmp / "pos.jsonl"), "--source", "clickstream",
                   str(tmp / "clicks.jsonl"), "--segments", str(tmp / "segments.yaml"), "--data-dir", str(data),
                   "--json", env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(run.stdout), data, env


def test_replay_then_cohort_lists_the_buyer(replayed):
    summary, data, env = replayed
    cohort = pipeline("cohort", "buyers", "--data-dir", str(data), "--format", "json", env=env)
    assert cohort.returncode == 0, cohort.stderr[-2000:]
    assert sorted(m["customer_id"] for m in json.loads(cohort.stdout)) == ["c1", "c2"]
    assert summary["produced"] == {"pos": 2, "clickstream": 3}
    assert summary["watermark"] == ms(T0 + 31 * DAY)  # now() is the latest occurred_at


def test_replay_summary_groups_dead_letters(replayed):
    summary, _, _ = replayed
    classes = sorted(reason.split(":")[0] for reason, count in summary["dead_letters"].items() for _ in range(count))
    assert len(classes) == 2, summary["dead_letters"]
    assert any("json" in c for c in classes) and any("type" in c for c in classes), classes


def test_replay_applies_time_driven_transitions_at_their_instant(replayed):
    summary, data, env = replayed
    query = ("SELECT customer_id, segment_id, toString(change) AS change, "
             "toUnixTimestamp64Milli(changed_at) AS at, cause FROM segments.segment_changes FINAL "
             "ORDER BY customer_id, at, segment_id")
    run = pipeline("sql", query, "--data-dir", str(data), "--format", "json", env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    changes = [(r["customer_id"], r["segment_id"], r["change"], r["at"], r["cause"]) for r in json.loads(run.stdout)]
    midnight = T0.replace(hour=0)
    assert changes == [
        ("c1", "buyers", "entered", ms(T0), "tx-1"),
        ("c1", "recent_buyers", "entered", ms(T0), "tx-1"),
        ("c1", "inactive_week", "entered", ms(midnight + 7 * DAY), "time"),  # 7 day boundaries after last seen
        ("c1", "recent_buyers", "exited", ms(T0 + 30 * DAY), "time"),  # the window is (now - 30 d, now]
        ("c2", "buyers", "entered", ms(T0 + 31 * DAY), "tx-2"),
        ("c2", "recent_buyers", "entered", ms(T0 + 31 * DAY), "tx-2"),
        ("c3", "inactive_week", "entered", ms(midnight + 27 * DAY), "time"),
    ]
    assert summary["changes"] == {"entered": 6, "exited": 1}
    assert summary["sizes"] == {"buyers": 2, "recent_buyers": 1, "inactive_week": 2}


def test_replay_fills_events_and_the_size_history(replayed):
    summary, data, env = replayed

    def sql(query):
        run = pipeline("sql", query, "--data-dir", str(data), "--format", "json", env=env)
        assert run.returncode == 0, run.stderr[-2000:]
        return json.loads(run.stdout)

    events = sql("SELECT customer_id, event_id, source FROM segments.events FINAL ORDER BY event_id")
    assert [(e["customer_id"], e["event_id"], e["source"]) for e in events] == [
        ("c1", "tx-1", "pos"), ("c2", "tx-2", "pos"), ("c3", "v-1", "clickstream")]  # dead letters are not events
    history = sql("SELECT segment_id, toString(hour) AS hour, sum(delta) AS delta FROM segments.segment_size_history "
                  "FINAL GROUP BY segment_id, hour ORDER BY segment_id, hour")
    sizes: dict[str, int] = {}
    for row in history:  # the running sum of the hourly deltas ends at the live size
        sizes[row["segment_id"]] = sizes.get(row["segment_id"], 0) + int(row["delta"])
    assert sizes == summary["sizes"]
    assert [r["hour"] for r in history if r["segment_id"] == "recent_buyers"] == [
        "2026-01-01 10:00:00", "2026-01-31 10:00:00", "2026-02-01 10:00:00"]
