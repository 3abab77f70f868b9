"""Crash test (issue 8 item 1): a steady stream into a worker (RocksDB store, the service
default; event clock), SIGKILLed at random moments while it consumes, at least 5 times, and
restarted each time with the same settings and data dir. At the end the memberships in
ClickHouse and the last state per (customer, segment) on segment-changes equal those of an
uninterrupted run of the same input by the pure core; every event was counted exactly once in
its customer's profile; redelivered changes are recognizable (same profile_version and change)
and collapse in ClickHouse FINAL results."""

import threading
import time
from collections import Counter
from datetime import UTC, datetime
from random import Random

from kafka.admin import KafkaAdminClient

from pipeline.broker import topics as t
from pipeline.codecs import decode_change, decode_event
from pipeline.control import control_kind
from pipeline.decode import decode
from pipeline.events import DeadLetter
from pipeline.identity import routing_key
from pipeline.linking import OP_HEADER
from tests.integration.faults import (
    SEGMENTS,
    Feeder,
    Worker,
    changes_of,
    consumer_for,
    count_records,
    expected,
    faulty_traffic,
    last_states,
    membership,
    read_topic,
    repeated_states,
    segments_of,
    sql,
    wait_done,
)

SEED = 20261125
KILLS = 6
START = int(datetime(2025, 1, 1, tzinfo=UTC).timestamp() * 1000)


class _Steadily(threading.Thread):
    """Sends the chunks 0.2 s apart, each flushed; an error is kept for the test to raise (a
    thread's exception would otherwise only be printed, and the unsent messages look lost)."""

    def __init__(self, feeder: Feeder, messages: list, chunks: list) -> None:
        super().__init__(daemon=True)
        self.feeder, self.messages, self.chunks = feeder, messages, chunks
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            for chunk in self.chunks:
                self.feeder.send((i, self.messages[i]) for i in chunk)
                self.feeder.producer.flush()
                time.sleep(0.2)
        except BaseException as exc:  # noqa: BLE001 - re-raised by _finished in the test's thread
            self.error = exc


def _finished(producer: _Steadily) -> None:
    """The steady producer sent and flushed all its chunks (it shares the feeder with the next
    phase's first chunk and with the end markers, which must come after every data message)."""
    producer.join(timeout=300)
    assert not producer.is_alive(), "the steady producer did not finish within 300 s"
    if producer.error is not None:
        raise producer.error


def _history(records: list, customers: set[str]) -> str:
    """The changes of ``customers`` on segment-changes, in topic order with their partition and
    offset: what a failure needs to tell a redelivery (same version and change, a higher offset)
    from a re-evaluation that shifted versions."""
    lines = []
    for record in records:
        if record.value is None:
            continue
        change = decode_change(record.value)
        if change["customer_id"] in customers:
            lines.append(f"  {change['customer_id']} p{record.partition}@{record.offset} v{change['profile_version']} "
                         f"{change['change']} {change['segment_id']} cause={change['cause']} "
                         f"at={change['changed_at']}")
    return "\n".join(lines)


def _where_lost(worker: Worker, messages: list, sent: list, customers: set[str]) -> str:
    """For the events of ``customers`` that no profile counted: where each was produced (input
    topic, partition, offset), whether that record is still on the input topic, and whether the
    ingest stage put it on customer-events. Tells a loss in the broker, in ingest, or in the profile
    stage apart (the broker is still up: the topics outlive the worker)."""
    on_input: dict[tuple[str, int, int], bytes | None] = {}
    for name in t.INPUTS:
        consumer = consumer_for(worker, name, timeout_ms=5000)  # a diagnosis: read to the very end
        try:
            on_input.update({(m.topic, m.partition, m.offset): m.value for m in consumer})
        finally:
            consumer.close()
    consumer = consumer_for(worker, t.CUSTOMER_EVENTS, timeout_ms=5000)
    try:
        ingested = {decode_event(m.value).event_id: (m.partition, m.offset) for m in consumer
                    if m.value and control_kind(m.headers) is None and not dict(m.headers or ()).get(OP_HEADER)}
    finally:
        consumer.close()
    # Where the ingest stage's group says it got to: a lost event below its partition's committed
    # offset was passed over by ingest (or its output lost by the broker); above it, never handled.
    group = f"{worker.env['PIPELINE_APP_ID']}-ingest"
    admin = KafkaAdminClient(bootstrap_servers=worker.broker.bootstrap)
    try:
        committed = {(tp.topic, tp.partition): meta.offset
                     for tp, meta in admin.list_group_offsets(group).get(group, {}).items()}
    finally:
        admin.close()
    lines, where = [], {s.index: s for s in sent}
    unsent = 0  # not acknowledged before the end markers were sent (a test fault, not the pipeline's)
    for index, message in enumerate(messages):
        event = decode(message.source, message.value, now_ms=int(time.time() * 1000))
        if isinstance(event, DeadLetter):
            continue
        key = routing_key(customer_id=event.customer_id, loyalty_id=event.loyalty_id,
                          email_hash=event.email_hash, anonymous_id=event.anonymous_id)
        if key not in customers or event.event_id in ingested:
            continue
        if index not in where:
            unsent += 1
            continue
        at = where[index]
        lines.append(f"  #{index} {event.event_id} of {key}: {at.topic}[{at.partition}]@{at.offset} "
                     f"on the input topic: {on_input.get((at.topic, at.partition, at.offset)) == message.value}, "
                     f"on customer-events: no, ingest committed up to {committed.get((at.topic, at.partition))}")
    return (f"{len(lines)} events of these customers never reached customer-events ({unsent} more were not "
            f"acknowledged before the end markers):\n" + "\n".join(lines[:60]))


def test_sigkill_mid_stream_loses_and_doubles_nothing(broker, unique, tmp_path):
    messages = faulty_traffic(events=3000, customers=300, seed=SEED, start_ms=START, step_ms=3 * 3_600_000)
    truth = expected(messages, segments_of(SEGMENTS))
    assert truth.duplicates >= 90 and truth.changes > 3000  # the input exercises what it should
    rng = Random(SEED)

    with Worker(broker, tmp_path, unique, store="rocksdb://") as worker:
        feeder = Feeder(worker)
        phases = [range(len(messages) * k // (KILLS + 1), len(messages) * (k + 1) // (KILLS + 1))
                  for k in range(KILLS + 1)]
        moments = []
        for phase, indexes in enumerate(phases):
            # A steady stream: the phase's first chunk, then (once the (re)started worker is seen
            # writing changes) the rest in chunks every 0.2 s, and SIGKILL at a random moment of it.
            before = count_records(worker, "segment-changes")
            chunks = [indexes[i:i + 25] for i in range(0, len(indexes), 25)]
            feeder.send((i, messages[i]) for i in chunks[0])
            feeder.producer.flush()
            deadline = time.monotonic() + 120
            while count_records(worker, "segment-changes") == before and time.monotonic() < deadline:
                assert worker.alive, worker.log()
                time.sleep(0.2)
            producer = _Steadily(feeder, messages, chunks[1:])
            producer.start()
            if phase == KILLS:
                break
            time.sleep(rng.uniform(0.2, 0.2 * len(chunks)))
            moments.append(len(feeder._futures))
            worker.kill()
            _finished(producer)
            time.sleep(rng.uniform(0.0, 1.0))
            worker.start()
        # Every data message is acknowledged before the end markers are sent: a message sent after
        # them would be processed after the run's "done" and look exactly like a lost event.
        _finished(producer)
        sent = feeder.flush()
        run_id = feeder.send_markers(truth.watermark)
        feeder.close()
        wait_done(worker, run_id)
        records = read_topic(worker, "segment-changes", run_id, markers=worker.partitions)
        on_topic = changes_of(records)
        worker.stop()
        log = worker.log(20000)

    print(f"SIGKILLed {worker.kills} times, after {moments} of {len(messages)} messages were produced; "
          f"{len(on_topic)} changes on the topic (uninterrupted run: {truth.changes})")
    assert worker.kills >= 5
    members, ch_changes = membership(worker)

    # (a) ClickHouse memberships equal the uninterrupted run's.
    assert members - truth.members == set() and truth.members - members == set(), (
        sorted(members - truth.members)[:20], sorted(truth.members - members)[:20], log)

    # Every good event counted exactly once in its customer's profile: nothing lost, nothing doubled.
    profiles = sql(worker, "SELECT customer_id, events_count, version FROM segments.customer_profiles FINAL")
    counts = {r["customer_id"]: r["events_count"] for r in profiles}
    want = {key: state.events_count for key, state in truth.states.items()}
    differing = {c: (counts.get(c), want.get(c)) for c in {*counts, *want} if counts.get(c) != want.get(c)}
    assert not differing, (sorted(differing.items())[:20], _where_lost(worker, messages, sent, set(differing)), log)

    # No time-driven transition lost: a profile's version goes up by one per event folded and
    # per time-driven re-evaluation that changed a membership, so each customer's final version
    # is its events plus its distinct versions of cause `time` on the topic.
    timed: dict[str, set[int]] = {}
    for change in on_topic:
        if change["cause"] == "time":
            timed.setdefault(change["customer_id"], set()).add(change["profile_version"])
    gaps = {r["customer_id"]: (r["version"], r["events_count"], len(timed.get(r["customer_id"], ())))
            for r in profiles if r["version"] != r["events_count"] + len(timed.get(r["customer_id"], ()))}
    assert not gaps, (f"(version, events, time versions) differ: {sorted(gaps.items())[:20]}\n"
                      f"{_history(records, set(sorted(gaps)[:5]))}\n{log}")

    # (b) The last change per (customer, segment) on segment-changes is the uninterrupted run's.
    last = last_states(on_topic)
    on_topic_members = {pair for pair, change in last.items() if change == "entered"}
    assert on_topic_members == truth.members, (
        sorted(on_topic_members ^ truth.members)[:20],
        _history(records, {c for c, _ in sorted(on_topic_members ^ truth.members)[:5]}), log)

    # (c) Per (customer, segment), once exact redeliveries are dropped, no state twice in a row.
    repeated, redelivered = repeated_states(on_topic)
    assert not repeated, (f"{repeated[:10]}\n{_history(records, {c for c, _, _ in repeated[:5]})}\n{log}")
    print(f"{redelivered} redelivered changes on the topic (same profile_version and change)")

    # (d) ClickHouse FINAL holds every distinct change of the topic exactly once.
    rows = Counter((r["customer_id"], r["segment_id"], r["profile_version"], r["change"]) for r in ch_changes)
    assert [k for k, n in rows.items() if n > 1] == []
    distinct = {(c["customer_id"], c["segment_id"], c["profile_version"], c["change"]) for c in on_topic}
    assert set(rows) == distinct, (sorted(set(rows) ^ distinct)[:20])
