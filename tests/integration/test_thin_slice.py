"""A POS purchase through Kafka -> worker -> segment-changes and ClickHouse (issue 2)."""

import json
import os
import subprocess
import sys
import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from pipeline.codecs import decode_change
from pipeline.processes import stop_process


def test_pos_purchase_enters_buyers(broker, unique, tmp_path):
    prefix = f"t{unique}-"
    segments = tmp_path / "segments.yaml"
    segments.write_text("segments:\n  - id: buyers\n    where: orders_count >= 1\n")
    env = {**os.environ, "PIPELINE_BROKER": broker.url, "PIPELINE_TOPIC_PREFIX": prefix,
           "PIPELINE_APP_ID": f"app-{unique}", "PIPELINE_DATA_DIR": str(tmp_path / "data"),
           "PIPELINE_STORE": "memory://", "PIPELINE_PARTITIONS": "2", "PIPELINE_SEGMENTS_PATH": str(segments),
           "PIPELINE_LOG_LEVEL": "warning", "PIPELINE_HTTP_PORT": "0"}
    log_file = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "pipeline", "worker"], env=env, stdout=log_file,
                              stderr=subprocess.STDOUT)
    try:
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, consumer_timeout_ms=1000)
        deadline = time.monotonic() + 60
        while not consumer.partitions_for_topic(f"{prefix}segment-changes") and time.monotonic() < deadline:
            time.sleep(0.5)
        consumer.assign([TopicPartition(f"{prefix}segment-changes", p) for p in range(2)])
        consumer.seek_to_beginning()
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        purchase = {"transaction_id": f"tx-{unique}", "occurred_at": int(time.time() * 1000),
                    "customer_id": "cust-1", "total": 25.0,
                    "items": [{"sku": "pan", "category": "cookware", "quantity": 1, "unit_price": 25.0}]}
        producer.send(f"{prefix}pos", key=b"cust-1", value=json.dumps(purchase).encode())
        producer.flush()
        producer.close()
        changes = []
        deadline = time.monotonic() + 120
        while not changes and time.monotonic() < deadline:
            assert worker.poll() is None, (tmp_path / "worker.log").read_text()[-3000:]
            changes = [decode_change(m.value) for m in consumer]
        consumer.close()
        assert [(c["customer_id"], c["segment_id"], c["change"], c["cause"]) for c in changes] == [
            ("cust-1", "buyers", "entered", f"tx-{unique}")]
        time.sleep(3)  # the sink's batch window is 0.5 s; the check below is on ClickHouse itself
    finally:
        stop_process(worker)
        log_file.close()
    # chDB serves one data directory per process: ask the CLI, in its own process.
    read = subprocess.run([sys.executable, "-m", "pipeline", "cohort", "buyers", "--data-dir",
                           str(tmp_path / "data"), "--format", "json"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert read.returncode == 0, read.stderr[-2000:]
    members = json.loads(read.stdout)
    assert [(m["customer_id"], m["anonymous_ids"]) for m in members] == [("cust-1", [])]
    assert members[0]["since"]
