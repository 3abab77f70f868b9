"""Table recovery from the changelogs is complete (issue 4 item 4).

The embedded broker answers ListOffsets with the base offset of a partition's last record batch
+ 1, not its last offset + 1 (DESIGN §3), and faust reads each changelog only up to that answer:
a restarted worker (memory://) or one taking over on a fresh data dir (rocksdb://) declared
itself ready without the last records of each partition. ``pipeline.recovery`` corrects the
highwater; these tests feed a real worker, stop it, start a fresh one with the same app id and
ask it for every profile and every alias.
"""

import json
import time

import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from pipeline.identity import ANONYMOUS_PREFIX
from tests.integration.workers import http_get, running_worker, topic_consumer, worker_log

PARTITIONS = 4
CUSTOMERS = 300
BURST = 150
SEGMENTS = """segments:
  - id: buyers
    where: orders_count >= 1
"""


def _purchases(unique: str) -> list[dict]:
    now = int(time.time() * 1000)
    return [{"transaction_id": f"tx-{unique}-{i}", "customer_id": f"c{i}", "anonymous_id": f"anon-{unique}-{i}",
             "total": float(10 + i % 50), "occurred_at": now - i} for i in range(CUSTOMERS)]


def _changelog_keys(broker, topic: str, wanted: int, worker, tmp_path,
                    timeout: float = 90.0) -> dict[tuple[str, int], int]:
    """Read ``topic`` until it holds ``wanted`` distinct keys with a value; the real end (last
    offset + 1) of each partition, as read."""
    consumer = topic_consumer(broker, topic, PARTITIONS)
    keys: set[bytes] = set()
    ends: dict[tuple[str, int], int] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(keys) < wanted and time.monotonic() < deadline:
            assert worker.poll() is None, worker_log(tmp_path)
            for record in consumer:
                ends[(topic, record.partition)] = record.offset + 1
                if record.value is not None:
                    keys.add(record.key)
    finally:
        consumer.close()
    assert len(keys) == wanted, f"{topic}: {len(keys)} of {wanted} keys written\n{worker_log(tmp_path)}"
    return ends


def _reported_ends(broker, topic: str) -> dict[tuple[str, int], int]:
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap)
    try:
        tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
        return {(topic, tp.partition): end for tp, end in consumer.end_offsets(tps).items()}
    finally:
        consumer.close()


def _wait_ready(port: int, worker, tmp_path, timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while http_get(port, "/ready")[0] != 200:
        assert worker.poll() is None, worker_log(tmp_path)
        assert time.monotonic() < deadline, f"not ready within {timeout} s\n{worker_log(tmp_path)}"
        time.sleep(0.2)


@pytest.mark.parametrize("store", ["memory://", "rocksdb://"])
def test_a_fresh_worker_recovers_every_profile_and_alias(broker, unique, tmp_path, store):
    app_id = f"app-{unique}"
    first_dir, second_dir = tmp_path / "first", tmp_path / "second"
    first_dir.mkdir()
    second_dir.mkdir()
    purchases = _purchases(unique)
    profiles, aliases = f"{app_id}-profiles-changelog", f"{app_id}-aliases-changelog"
    with running_worker(broker, first_dir, unique, SEGMENTS, partitions=PARTITIONS, store=store) as (worker, _, prefix):
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=200, batch_size=1 << 20)
        for count in (CUSTOMERS - BURST, CUSTOMERS):
            # The last BURST customers in one request once the others are folded: the worker folds
            # them in one batch, so each changelog partition ends with a batch of many records.
            for purchase in purchases[count - BURST if count == CUSTOMERS else 0:count]:
                producer.send(f"{prefix}pos", key=purchase["customer_id"].encode(),
                              value=json.dumps(purchase).encode())
            producer.flush()
            real_ends = {**_changelog_keys(broker, profiles, count, worker, first_dir),
                         **_changelog_keys(broker, aliases, count, worker, first_dir)}
        producer.close()
    # The condition under test: the broker reports an end short of the last record somewhere.
    reported = {**_reported_ends(broker, profiles), **_reported_ends(broker, aliases)}
    assert any(reported[tp] < real_ends[tp] for tp in real_ends), (reported, real_ends)

    # A new worker, same app id and topics, nothing local: everything comes from the changelogs.
    with running_worker(broker, second_dir, unique, SEGMENTS, partitions=PARTITIONS, store=store) as (worker, env, _):
        port = int(env["PIPELINE_HTTP_PORT"])
        _wait_ready(port, worker, second_dir)
        missing, unaliased = [], []
        for purchase in purchases:
            customer = purchase["customer_id"]
            status, body = http_get(port, f"/profiles/{customer}")
            if status != 200 or json.loads(body)["lifetime_value"] != purchase["total"]:
                missing.append(customer)
            status, body = http_get(port, f"/profiles/{ANONYMOUS_PREFIX}{purchase['anonymous_id']}")
            if status != 200 or json.loads(body)["customer_id"] != customer:
                unaliased.append(purchase["anonymous_id"])
        assert not missing, f"{len(missing)} of {CUSTOMERS} profiles not recovered: {missing[:20]}"
        assert not unaliased, f"{len(unaliased)} of {CUSTOMERS} aliases not recovered: {unaliased[:20]}"
