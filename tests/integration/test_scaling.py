"""Two workers on the embedded broker split the partitions; one is killed with SIGKILL and the
other takes over its partitions, recovering their state from the changelog (issue 7 item 4,
issue 8 item 2). The final memberships on the topic equal the pure core's; redeliveries are
recognisable (same customer, segment, change and profile_version)."""

import json
import random
import signal
import time
import urllib.error
import urllib.request
from collections import defaultdict

from kafka import KafkaProducer

from pipeline.codecs import decode_change
from pipeline.decode import decode
from pipeline.processor import step
from pipeline.segments.definitions import parse_segments
from tests.integration.workers import running_worker, topic_consumer, worker_log

SEGMENTS = """segments:
  - id: buyers
    where: orders_count >= 1
  - id: regulars
    where: orders_count >= 3
  - id: big_spenders
    where: lifetime_value > 200
  - id: promoters
    where: nps >= 9
"""
T0 = 1_790_000_000_000


def events(rng, start, count, customers=60):
    out = []
    for i in range(start, start + count):
        customer = f"c{rng.randrange(customers):03d}"
        if rng.random() < 0.7:
            out.append(("pos", customer, {"transaction_id": f"t{i}", "customer_id": customer, "occurred_at": T0 + i,
                                          "total": round(rng.uniform(5, 120), 2)}))
        else:
            out.append(("surveys", customer, {"response_id": f"r{i}", "customer_id": customer, "occurred_at": T0 + i,
                                              "survey_id": "nps", "nps": rng.randint(0, 10)}))
    return out


def expected_members(stream, segments):
    """Final memberships by the pure core. A customer's pos and survey events come through
    different topics, so their relative order (and so the versions) is not fixed; the fold is
    order-insensitive, so the final memberships are."""
    states = {}
    for source, customer, record in stream:
        event = decode(source, json.dumps(record).encode(), now_ms=T0 + 10**9)
        states[customer] = step(states.get(customer), customer, event, event.occurred_at, segments).state
    return {(customer, segment) for customer, state in states.items() for segment in state.segments}


def final_members(changes):
    """(customer, segment) pairs whose latest change (by profile_version) is an entry."""
    latest = {}
    for customer, segment, change, version in changes:
        if (customer, segment) not in latest or version > latest[(customer, segment)][0]:
            latest[(customer, segment)] = (version, change)
    return {pair for pair, (_, change) in latest.items() if change == "entered"}


def ready(port):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/ready", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def test_two_workers_split_then_one_takes_over(broker, unique, tmp_path):
    segments = parse_segments(SEGMENTS)
    rng = random.Random(11)
    first, second = events(rng, 0, 400), events(rng, 400, 400)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    seen: set[tuple] = set()
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=5)

    def send(batch, prefix):
        for source, customer, record in batch:
            producer.send(f"{prefix}{source}", key=customer.encode(), value=json.dumps(record).encode())
        producer.flush()

    def wait_for(consumer, wanted, workers, logs):
        deadline = time.monotonic() + 180
        while final_members(seen) != wanted and time.monotonic() < deadline:
            for worker, log in zip(workers, logs, strict=True):
                assert worker.poll() is None, worker_log(log)
            for message in consumer:
                if message.value is not None:
                    c = decode_change(message.value)
                    seen.add((c["customer_id"], c["segment_id"], c["change"], c["profile_version"]))
        got = final_members(seen)
        assert got == wanted, (sorted(wanted - got)[:10], sorted(got - wanted)[:10])

    with running_worker(broker, tmp_path / "a", unique, SEGMENTS, partitions=4, store="rocksdb://",
                        log_level="info") as (a, env_a, prefix):
        with running_worker(broker, tmp_path / "b", unique, SEGMENTS, partitions=4,
                            store="rocksdb://", log_level="info") as (b, env_b, _):
            deadline = time.monotonic() + 120
            while not (ready(env_a["PIPELINE_HTTP_PORT"]) and ready(env_b["PIPELINE_HTTP_PORT"])):
                assert time.monotonic() < deadline, (worker_log(tmp_path / "a"), worker_log(tmp_path / "b"))
                time.sleep(0.5)  # both hold partitions: the group split them
            consumer = topic_consumer(broker, f"{prefix}segment-changes", partitions=4)
            send(first, prefix)
            wait_for(consumer, expected_members(first, segments), [a, b], [tmp_path / "a", tmp_path / "b"])
            # Either worker answers for every customer: requests for the other's are proxied to it.
            customers = sorted({customer for _, customer, _ in first})
            for env in (env_a, env_b):
                served = {}
                for customer in customers:
                    with urllib.request.urlopen(f"http://127.0.0.1:{env['PIPELINE_HTTP_PORT']}/profiles/{customer}",
                                                timeout=30) as response:
                        served[customer] = response.headers.get("X-Pipeline-Served-By", "")
                        assert json.loads(response.read())["customer_id"] == customer
                assert len(set(served.values())) == 2, served  # both workers served some
            a.send_signal(signal.SIGKILL)
            a.wait()
            send(second, prefix)
            wait_for(consumer, expected_members(first + second, segments), [b], [tmp_path / "b"])
            consumer.close()
    producer.close()
    # Redeliveries are recognisable: one change per (customer, segment, version); and per customer
    # and segment the states alternate (never entered twice without an exit between).
    by_version = defaultdict(set)
    for customer, segment, change, version in seen:
        by_version[(customer, segment, version)].add(change)
    assert all(len(changes) == 1 for changes in by_version.values())
    history = defaultdict(list)
    for customer, segment, change, _version in sorted(seen, key=lambda c: c[3]):
        history[(customer, segment)].append(change)
    for changes in history.values():
        assert changes[0] == "entered" and all(x != y for x, y in zip(changes, changes[1:], strict=False)), changes
