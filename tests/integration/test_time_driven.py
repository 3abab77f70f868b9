"""Wall-clock time-driven transitions on a real worker: a customer leaves a segment when its
predicate stops holding, with no new event (issue 5 item 4)."""

import json
import time

from kafka import KafkaProducer

from pipeline.codecs import decode_change
from tests.integration.workers import running_worker, topic_consumer, worker_log

SEGMENTS = """segments:
  - id: buyers
    where: orders_count >= 1
  - id: seen_just_now
    where: dateDiff('second', last_seen_at, now()) < 15
"""


def test_exit_with_no_event_at_the_exact_instant(broker, unique, tmp_path):
    with running_worker(broker, tmp_path, unique, SEGMENTS) as (worker, _, prefix):
        consumer = topic_consumer(broker, f"{prefix}segment-changes")
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)

        def send(topic, record):
            producer.send(f"{prefix}{topic}", key=record["customer_id"].encode(), value=json.dumps(record).encode())
            producer.flush()

        def wait_for(count):
            changes, deadline = [], time.monotonic() + 120
            while len(changes) < count and time.monotonic() < deadline:
                assert worker.poll() is None, worker_log(tmp_path)
                changes += [decode_change(m.value) for m in consumer]
            return changes

        # First make sure the worker has joined and is processing: the window below is wall time.
        send("pos", {"transaction_id": f"warm-{unique}", "customer_id": "c-warm", "total": 1.0,
                     "occurred_at": int(time.time() * 1000) - 3_600_000})
        assert [c["segment_id"] for c in wait_for(1)] == ["buyers"], worker_log(tmp_path)
        seen_at = int(time.time() * 1000)
        send("clickstream", {"event_id": f"v-{unique}", "customer_id": "c-time", "type": "page_view",
                             "occurred_at": seen_at})
        changes = wait_for(2)
        consumer.close()
        producer.close()
    assert [(c["segment_id"], c["change"], c["cause"]) for c in changes] == [
        ("seen_just_now", "entered", f"v-{unique}"), ("seen_just_now", "exited", "time")], worker_log(tmp_path)
    # The exit carries the instant the predicate stopped holding, not the tick's: dateDiff counts
    # second boundaries crossed, so it is the 15th whole second after the one last seen in.
    assert changes[1]["changed_at"] == (seen_at // 1000 + 15) * 1000
    assert changes[1]["profile_version"] == changes[0]["profile_version"] + 1
