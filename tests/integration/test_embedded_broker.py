import os
import signal
import subprocess
import sys
import time

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from pipeline.broker.embedded import EmbeddedBroker
from pipeline.broker.topics import TopicSpec, ensure_topics


def test_bytes_round_trip_through_the_broker(broker, unique):
    topic = f"roundtrip-{unique}"
    ensure_topics([broker.bootstrap], [TopicSpec(topic)], partitions=2)
    ensure_topics([broker.bootstrap], [TopicSpec(topic)], partitions=2)  # idempotent
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    for i in range(20):
        producer.send(topic, key=f"k{i}".encode(), value=f"v{i}".encode())
    producer.flush()
    producer.close()
    # Assigned, not subscribed: Tansu holds a JoinGroup for half the rebalance timeout (DESIGN §3).
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, consumer_timeout_ms=20000)
    consumer.assign([TopicPartition(topic, p) for p in range(2)])
    consumer.seek_to_beginning()
    seen = set()
    for message in consumer:
        seen.add(message.value)
        if len(seen) == 20:
            break
    consumer.close()
    assert seen == {f"v{i}".encode() for i in range(20)}


def test_stop_leaves_no_process(tmp_path):
    broker = EmbeddedBroker(tmp_path).start()
    pid = broker.process.pid
    broker.stop()
    assert not _alive(pid)
    assert (tmp_path / "broker.log").exists()


def test_broker_dies_with_a_killed_parent(tmp_path):
    script = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from pipeline.broker.embedded import EmbeddedBroker\n"
        "b = EmbeddedBroker(Path(sys.argv[1])).start()\n"
        "print(b.process.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    parent = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    child_pid = int(parent.stdout.readline())
    assert _alive(child_pid)
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.monotonic() + 10
    while _alive(child_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(child_pid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie still answers kill(0): look at its state
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().split()[2] != "Z"
    except FileNotFoundError:
        return False
