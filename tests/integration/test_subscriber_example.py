"""The README's subscription example, run exactly as written against a real worker (issue 6 item 4).

The code block between ``<!-- subscriber:start -->`` and ``<!-- subscriber:end -->`` in README.md
is written to a file and run from the repository root, pointed at the session's embedded broker
and the worker's topic prefix through its environment variables. A purchase must print the
`entered` line; an internal control marker on the topic must be skipped; an erasure must print
the `exited` line (cause `erasure`) and its tombstone must not stop the subscriber.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from queue import Empty, Queue

from kafka import KafkaConsumer, KafkaProducer

from pipeline.control import HEADER, MARKER, Marker
from pipeline.processes import stop_process
from tests.integration.workers import running_worker, topic_consumer, worker_log

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = re.compile(r"<!-- subscriber:start -->\n```python\n(.*?)\n```\n<!-- subscriber:end -->", re.DOTALL)
SEGMENTS = "segments:\n  - id: buyers\n    where: orders_count >= 1\n"


def readme_example() -> str:
    found = EXAMPLE.search((ROOT / "README.md").read_text())
    assert found, "README.md has no subscriber example between its markers"
    return found.group(1) + "\n"


def _wait_for_topic(broker, topic: str, timeout: float = 60.0) -> None:
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap)
    try:
        deadline = time.monotonic() + timeout
        while not consumer.partitions_for_topic(topic):
            assert time.monotonic() < deadline, f"topic {topic} was not created"
            time.sleep(0.5)
    finally:
        consumer.close()


def _lines(process: subprocess.Popen) -> Queue:
    lines: Queue = Queue()

    def pump() -> None:
        for line in process.stdout:
            lines.put(line.rstrip("\n"))
    threading.Thread(target=pump, daemon=True).start()
    return lines


def _next_line(lines: Queue, process: subprocess.Popen, worker, tmp_path, timeout: float = 120.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        assert process.poll() is None, f"the example stopped: {process.stderr.read()[-3000:]}"
        assert worker.poll() is None, worker_log(tmp_path)
        try:
            return lines.get(timeout=0.5)
        except Empty:
            assert time.monotonic() < deadline, "the example printed nothing"


def test_readme_subscriber_prints_the_change(broker, unique, tmp_path):
    script = tmp_path / "subscriber.py"
    script.write_text(readme_example())
    with running_worker(broker, tmp_path, unique, SEGMENTS) as (worker, _, prefix):
        topic = f"{prefix}segment-changes"
        _wait_for_topic(broker, topic)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        # An internal marker first: a subscriber that decoded it as Avro would print garbage or crash.
        marker = Marker(run_id=f"r-{unique}", watermark=0, origins=1, partitions=2)
        producer.send(topic, key=b"", value=marker.encode(), partition=0, headers=[(HEADER, MARKER)])
        producer.flush()
        example = subprocess.Popen([sys.executable, str(script)], cwd=ROOT, text=True, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE,
                                   env={**os.environ, "KAFKA_BOOTSTRAP": broker.bootstrap,
                                        "SEGMENT_CHANGES_TOPIC": topic})
        try:
            lines = _lines(example)
            purchase = {"transaction_id": f"tx-{unique}", "occurred_at": int(time.time() * 1000),
                        "customer_id": "cust-1", "total": 25.0,
                        "items": [{"sku": "pan", "category": "cookware", "quantity": 1, "unit_price": 25.0}]}
            producer.send(f"{prefix}pos", key=b"cust-1", value=json.dumps(purchase).encode())
            producer.flush()
            entered = _next_line(lines, example, worker, tmp_path)
            assert re.fullmatch(rf"\d{{4}}-\d\d-\d\d \d\d:\d\d:\d\d cust-1 entered buyers "
                                rf"\(cause tx-{unique}, profile version 1\)", entered), entered

            erase = {"event_id": f"x-{unique}", "type": "erasure_request", "customer_id": "cust-1",
                     "occurred_at": int(time.time() * 1000)}
            producer.send(f"{prefix}crm", key=b"cust-1", value=json.dumps(erase).encode())
            producer.flush()
            producer.close()
            exited = _next_line(lines, example, worker, tmp_path)
            assert re.fullmatch(r"\S+ \S+ cust-1 exited buyers \(cause erasure, profile version \d+\)", exited), exited

            # The tombstone follows the exit on the same partition: once it is on the topic, the
            # example must still be running and have printed nothing for it.
            consumer = topic_consumer(broker, topic)
            deadline = time.monotonic() + 60
            tombstones = []
            while not tombstones and time.monotonic() < deadline:
                tombstones = [m for m in consumer if m.key == b"cust-1" and m.value is None]
            consumer.close()
            assert tombstones, "the erasure sent no tombstone"
            time.sleep(2)
            assert example.poll() is None, example.stderr.read()[-3000:]
            assert lines.empty(), lines.get()
        finally:
            stop_process(example)
