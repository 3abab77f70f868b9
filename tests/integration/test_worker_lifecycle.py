"""Graceful shutdown and structured logs (issue 7 item 4): on SIGTERM the worker flushes its
sinks, commits its offsets and exits 0, so a restarted worker neither loses nor repeats work;
with PIPELINE_LOG_FORMAT=json its log records are JSON objects."""

import json
import signal
import subprocess
import sys
import time

from kafka import KafkaProducer

from pipeline.codecs import decode_change
from tests.integration.workers import running_worker, topic_consumer, worker_log

SEGMENTS = "segments:\n  - id: buyers\n    where: orders_count >= 1\n"


def purchase(producer, prefix, customer, unique):
    record = {"transaction_id": f"t-{customer}-{unique}", "customer_id": customer, "total": 9.0,
              "occurred_at": int(time.time() * 1000)}
    producer.send(f"{prefix}pos", key=customer.encode(), value=json.dumps(record).encode())
    producer.flush()


def changes_of(consumer, worker, tmp_path, count):
    changes, deadline = [], time.monotonic() + 120
    while len(changes) < count and time.monotonic() < deadline:
        assert worker.poll() is None, worker_log(tmp_path)
        changes += [decode_change(m.value) for m in consumer if m.value is not None]
    return [(c["customer_id"], c["change"]) for c in changes]


def test_sigterm_flushes_commits_and_exits_cleanly(broker, unique, tmp_path):
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    settings = {"store": "rocksdb://", "log_format": "json", "log_level": "info"}
    with running_worker(broker, tmp_path, unique, SEGMENTS, **settings) as (worker, env, prefix):
        consumer = topic_consumer(broker, f"{prefix}segment-changes")
        purchase(producer, prefix, "first", unique)
        assert changes_of(consumer, worker, tmp_path, 1) == [("first", "entered")]
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(90) == 0, worker_log(tmp_path)
    log = (tmp_path / "worker.log").read_text(errors="replace")
    records = [json.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert len(records) > 10 and all({"time", "level", "logger", "message"} <= set(r) for r in records)
    # The sink was flushed: ClickHouse has the change (read by the CLI once the worker let go of chDB).
    read = subprocess.run([sys.executable, "-m", "pipeline", "cohort", "buyers", "--data-dir",
                           env["PIPELINE_DATA_DIR"], "--format", "json"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert [m["customer_id"] for m in json.loads(read.stdout)] == ["first"], read.stderr[-2000:]
    # Offsets were committed: a restarted worker processes only what is new.
    with running_worker(broker, tmp_path, unique, SEGMENTS, **settings) as (worker, env, prefix):
        purchase(producer, prefix, "second", unique)
        assert changes_of(consumer, worker, tmp_path, 1) == [("second", "entered")]
        time.sleep(2)  # a redelivered "first" would have come with or before "second"
        assert [m for m in consumer if m.value is not None] == []
    consumer.close()
    producer.close()
