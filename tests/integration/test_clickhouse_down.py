"""ClickHouse unreachable for 30 s mid-stream (issue 8 item 3): nothing lost, the writer retries
with backoff and catches up, no duplicates in query results.

The worker's chDB is in-process, so the outage is injected where the worker meets it: while the
file ``DATA_DIR/clickhouse.unavailable`` exists, ``ClickHouseWriter.write`` raises (the test hook
documented in pipeline/sinks/clickhouse.py and docs/reliability.md). Upstream keeps running; the
sink agent keeps retrying the same batch and takes no new one (its batches are acked only once
written), so the live sizes the worker serves from ClickHouse stay frozen for the outage.
"""

import json
import re
import time
import urllib.error
import urllib.request
from collections import Counter
from datetime import UTC, datetime

from tests.integration.faults import (
    SEGMENTS,
    Feeder,
    Worker,
    changes_of,
    count_records,
    expected,
    faulty_traffic,
    membership,
    read_topic,
    segments_of,
    sql,
    wait_done,
)

OUTAGE_SECONDS = 30
START = int(datetime(2025, 3, 1, tzinfo=UTC).timestamp() * 1000)


def _sizes(worker: Worker) -> dict[str, int | None]:
    """The live segment sizes the worker serves from its ClickHouse (its HTTP API, GET /segments)."""
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{worker.http_port}/segments", timeout=30) as response:
                return {s["id"]: s["size"] for s in json.load(response)["segments"]}
        except urllib.error.URLError:
            if time.monotonic() > deadline or not worker.alive:
                raise
            time.sleep(0.5)  # the API is not listening yet


def test_clickhouse_down_for_30_s_loses_and_doubles_nothing(broker, unique, tmp_path):
    messages = faulty_traffic(events=2400, customers=250, seed=8, start_ms=START, step_ms=4 * 3_600_000)
    truth = expected(messages, segments_of(SEGMENTS))
    thirds = [range(len(messages) * k // 3, len(messages) * (k + 1) // 3) for k in range(3)]

    with Worker(broker, tmp_path, unique) as worker:
        flag = worker.data_dir / "clickhouse.unavailable"
        feeder = Feeder(worker)
        feeder.send((i, messages[i]) for i in thirds[0])
        feeder.flush()
        deadline = time.monotonic() + 120  # until the writer has written some of it
        while not any(_sizes(worker).values()) and time.monotonic() < deadline:
            assert worker.alive, worker.log()
            time.sleep(0.5)
        assert any(_sizes(worker).values()), worker.log()

        flag.touch()  # ClickHouse goes away
        down_at = time.monotonic()
        while "ClickHouse insert failed" not in worker.log(100_000) and time.monotonic() < deadline + 60:
            feeder.send([(thirds[1][0], messages[thirds[1][0]])])  # something for the writer to write
            feeder.flush()
            time.sleep(0.5)
        frozen = _sizes(worker)
        changes_when_frozen = count_records(worker, "segment-changes")
        for index in thirds[1][1:]:  # the stream goes on meanwhile
            feeder.send([(index, messages[index])])
            if index % 40 == 0:
                feeder.flush()
                time.sleep(0.5)
        feeder.flush()
        time.sleep(max(0.0, OUTAGE_SECONDS - (time.monotonic() - down_at)))
        during = _sizes(worker)
        changes_during = count_records(worker, "segment-changes")
        assert worker.alive, worker.log()
        flag.unlink()  # ClickHouse is back
        print(f"ClickHouse down {time.monotonic() - down_at:.0f} s; changes on the topic "
              f"{changes_when_frozen} -> {changes_during}; sizes frozen at {frozen}")

        feeder.send((i, messages[i]) for i in thirds[2])
        feeder.flush()
        run_id = feeder.send_markers(truth.watermark)
        feeder.close()
        wait_done(worker, run_id)
        on_topic = changes_of(read_topic(worker, "segment-changes", run_id, markers=worker.partitions))
        worker.stop()
        log = worker.log(1_000_000)

    # Nothing reached ClickHouse while it was down: the writer neither wrote nor skipped ahead.
    assert during == frozen
    # It retried the same batch with growing delays (0.5 s doubling, capped at 30 s).
    delays = [float(d) for d in re.findall(r"ClickHouse insert failed .*?retrying in ([0-9.]+) s", log)]
    assert len(delays) >= 4 and delays[:4] == [0.5, 1.0, 2.0, 4.0], delays
    assert all(b == min(a * 2, 30.0) for a, b in zip(delays, delays[1:], strict=False)), delays

    members, ch_changes = membership(worker)
    # Nothing lost: memberships and every event counted, as in the uninterrupted run of the pure core.
    assert members == truth.members, (sorted(members ^ truth.members)[:20], log[-3000:])
    profiles = sql(worker, "SELECT customer_id, events_count FROM segments.customer_profiles FINAL")
    assert {r["customer_id"]: r["events_count"] for r in profiles} == {
        key: state.events_count for key, state in truth.states.items()}
    # No duplicates in query results, and every change of the topic is there exactly once.
    rows = Counter((r["customer_id"], r["segment_id"], r["profile_version"], r["change"]) for r in ch_changes)
    assert [k for k, n in rows.items() if n > 1] == []
    assert set(rows) == {(c["customer_id"], c["segment_id"], c["profile_version"], c["change"]) for c in on_topic}
