"""Live segment definitions on a running worker (issue 5 item 5): `pipeline segments apply`
publishes to the compacted topic; the worker re-evaluates every profile with no restart (cause
`definition_changed`): a new segment covers existing profiles, an edited one is re-evaluated, a
removed one exits its members; a profile the new set changes nothing for is left as stored and still
enters a time-driven new segment at its instant; a restarted worker emits nothing spurious."""

import json
import subprocess
import sys
import time

from kafka import KafkaProducer

from pipeline.codecs import decode_change
from tests.integration.workers import running_worker, topic_consumer, worker_log

INITIAL = """segments:
  - id: buyers
    where: orders_count >= 1
  - id: big
    where: lifetime_value > 100
"""
EDITED = """segments:
  - id: buyers
    where: orders_count >= 1
  - id: big
    where: lifetime_value > 40
  - id: small
    where: lifetime_value < 100
"""
REMOVED = """segments:
  - id: buyers
    where: orders_count >= 1
  - id: big
    where: lifetime_value > 40
"""
# A segment entered by time alone: a profile that is not a member when the set is applied is left
# as stored (nothing changed for it, nothing written) and must still enter when its instant comes.
IDLE = REMOVED + """  - id: idle
    where: dateDiff('second', last_seen_at, now()) >= 30
"""


def apply(tmp_path, env, text, name):
    path = tmp_path / f"{name}.yaml"
    path.write_text(text)
    run = subprocess.run([sys.executable, "-m", "pipeline", "segments", "apply", str(path)], capture_output=True,
                         text=True, timeout=120, env=env)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout


def collect(consumer, worker, tmp_path, count):
    changes, deadline = [], time.monotonic() + 120
    while len(changes) < count and time.monotonic() < deadline:
        assert worker.poll() is None, worker_log(tmp_path)
        changes += [decode_change(m.value) for m in consumer if m.value is not None]
    assert len(changes) >= count, (changes, worker_log(tmp_path))
    return [(c["customer_id"], c["segment_id"], c["change"], c["cause"]) for c in changes]


def purchase(prefix, producer, customer, total):
    record = {"transaction_id": f"t-{customer}", "customer_id": customer, "total": total,
              "occurred_at": int(time.time() * 1000)}
    producer.send(f"{prefix}pos", key=customer.encode(), value=json.dumps(record).encode())
    producer.flush()


def test_apply_without_restart(broker, unique, tmp_path):
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    with running_worker(broker, tmp_path, unique, INITIAL) as (worker, env, prefix):
        consumer = topic_consumer(broker, f"{prefix}segment-changes")
        purchase(prefix, producer, "c1", 50.0)
        purchase(prefix, producer, "c2", 150.0)
        assert sorted(collect(consumer, worker, tmp_path, 3)) == [
            ("c1", "buyers", "entered", "t-c1"), ("c2", "big", "entered", "t-c2"), ("c2", "buyers", "entered", "t-c2")]

        said = apply(tmp_path, env, EDITED, "edited")
        assert "added: big, buyers, small" in said  # the topic held nothing yet: the worker ran on its file
        assert sorted(collect(consumer, worker, tmp_path, 2)) == [
            ("c1", "big", "entered", "definition_changed"), ("c1", "small", "entered", "definition_changed")]

        said = apply(tmp_path, env, REMOVED, "removed")
        assert "removed: small" in said
        assert collect(consumer, worker, tmp_path, 1) == [("c1", "small", "exited", "definition_changed")]

        purchase(prefix, producer, "c4", 20.0)
        assert collect(consumer, worker, tmp_path, 1) == [("c4", "buyers", "entered", "t-c4")]
        said = apply(tmp_path, env, IDLE, "idle")
        assert "added: idle" in said
        # c4 (and whoever was active less than 30 s before the backfill) enters by time, at its instant,
        # the others when the set is applied: each exactly once
        idle = collect(consumer, worker, tmp_path, 3)
        assert sorted(c[:3] for c in idle) == [("c1", "idle", "entered"), ("c2", "idle", "entered"),
                                               ("c4", "idle", "entered")], idle
        assert {c[3] for c in idle} <= {"definition_changed", "time"}, idle
        consumer.close()
    # A restarted worker reads the applied set from the topic, not its file: nothing moves.
    with running_worker(broker, tmp_path, unique, INITIAL) as (worker, env, prefix):
        consumer = topic_consumer(broker, f"{prefix}segment-changes")  # from the start: end offsets are unreliable
        purchase(prefix, producer, "c3", 45.0)
        changes = collect(consumer, worker, tmp_path, 10 + 2)[10:]  # the ten changes above come first
        assert sorted(changes) == [
            ("c3", "big", "entered", "t-c3"), ("c3", "buyers", "entered", "t-c3")]  # big is the applied > 40
        time.sleep(3)  # a spurious re-evaluation at start would have shown by now (ticks every 0.5 s)
        assert [decode_change(m.value) for m in consumer if m.value is not None] == []
        consumer.close()
    producer.close()
