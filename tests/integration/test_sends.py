"""pipeline.broker.sends against the real embedded broker, next to faust's own producer.

A stage's records must land where faust's ``Producer.send`` put them before (the profile stage
relies on ``customer-events`` keys' partitions), in ``add`` order per partition, and a failed
delivery must fail ``flush`` (the stage batch is then redelivered).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict

import faust
import pytest
from aiokafka.errors import KafkaError
from kafka import KafkaConsumer, TopicPartition

from pipeline.broker.embedded import EmbeddedBroker
from pipeline.broker.sends import Sends
from pipeline.broker.topics import TopicSpec, ensure_topics


def _app(broker_url: str, unique: str, **conf: object) -> faust.App:
    return faust.App(f"sends-{unique}", broker=broker_url, web_enabled=False, producer_linger=0.005, **conf)


def _read(bootstrap: str, topic: str, partitions: int, expected: int) -> dict[int, list]:
    """Every record of ``topic``, per partition, in partition order."""
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, consumer_timeout_ms=20000)
    try:
        consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
        consumer.seek_to_beginning()
        out: dict[int, list] = defaultdict(list)
        seen = 0
        for message in consumer:
            out[message.partition].append(message)
            seen += 1
            if seen == expected:
                break
        return out
    finally:
        consumer.close()


@pytest.mark.parametrize("partitions", [1, 3, 4])
def test_keyed_records_land_where_fausts_producer_sends_them(broker, unique, partitions):
    keys = [f"cust-{i:05d}".encode() for i in range(300)] + [b"a", b"email:0f3a", "ü-ñ".encode()]
    ours, theirs = f"sends-ours-{unique}-{partitions}", f"sends-faust-{unique}-{partitions}"
    ensure_topics([broker.bootstrap], [TopicSpec(ours), TopicSpec(theirs)], partitions=partitions)

    async def run() -> dict[bytes, int]:
        app = _app(broker.url, unique)
        await app.producer.start()
        try:
            expected = {}
            for key in keys:  # faust's own send: what the worker did before
                metadata = await (await app.producer.send(theirs, key, b"v", partition=None, timestamp=None,
                                                          headers=None))
                expected[key] = metadata.partition
            sends = Sends(app.producer)
            for key in keys:
                sends.add(ours, key, b"v")
            await sends.flush()
            return expected
        finally:
            await app.producer.stop()

    expected = asyncio.run(run())
    landed = {m.key: p for p, messages in _read(broker.bootstrap, ours, partitions, len(keys)).items()
              for m in messages}
    assert landed == expected
    if partitions > 1:
        assert len(set(landed.values())) == partitions  # the test would see a wrong choice


def test_order_per_partition_across_full_batches_with_tombstones_and_headers(broker, unique):
    """More than one builder per partition (16 KiB each) and several topics in one flush, records
    added before and after the topics' metadata is known: each partition holds its records in ``add``
    order; tombstones, headers and explicit partitions kept."""
    partitions = 4
    first, second = f"sends-a-{unique}", f"sends-b-{unique}"
    ensure_topics([broker.bootstrap], [TopicSpec(first), TopicSpec(second)], partitions=partitions)
    padding = b"x" * 150
    added: list[tuple[str, bytes, bytes | None, list[tuple[str, bytes]]]] = []
    for i in range(3000):
        key = f"cust-{i % 37:03d}".encode()
        topic = first if i % 3 else second
        value = None if i % 101 == 0 else f"{i:06d}".encode() + padding
        headers = [("seq", str(i).encode())] + ([("op", b"erase")] if value is None else [])
        added.append((topic, key, value, headers))
    markers = [(first, p) for p in range(partitions)]

    async def run() -> None:
        app = _app(broker.url, unique)
        await app.producer.start()
        try:
            sends = Sends(app.producer)
            # The first half waits for the topics' metadata until the flush fetches it; the second is
            # put into builders as it is added.
            for n, (topic, key, value, headers) in enumerate(added):
                if n == len(added) // 2:
                    await sends.flush()
                    assert len(sends) == 0
                sends.add(topic, key, value, headers)
            await sends.flush()
            for topic, p in markers:  # after everything above was acknowledged
                sends.add(topic, b"", b"marker", [("pipeline-control", b"marker")], partition=p)
            await sends.flush()
        finally:
            await app.producer.stop()

    asyncio.run(run())
    per_topic = {first: [a for a in added if a[0] == first], second: [a for a in added if a[0] == second]}
    for topic, records in per_topic.items():
        tail = partitions if topic == first else 0
        got = _read(broker.bootstrap, topic, partitions, len(records) + tail)
        seqs_of_key: dict[bytes, set[int]] = defaultdict(set)
        for messages in got.values():
            if topic == first:
                assert messages[-1].value == b"marker" and messages[-1].key == b""
                messages = messages[:-1]
            seqs = [int(dict(m.headers)["seq"]) for m in messages]
            assert seqs == sorted(seqs)  # add order within the partition
            for m, seq in zip(messages, seqs, strict=True):
                _, key, value, headers = added[seq]
                assert (m.key, m.value, list(m.headers)) == (key, value, headers)
                seqs_of_key[m.key].add(seq)
        assert sum(len(s) for s in seqs_of_key.values()) == len(records)  # every record, once
        assert all(len({p for p, ms in got.items() for m in ms if m.key == key}) == 1 for key in seqs_of_key)


def test_a_failed_delivery_fails_the_flush(tmp_path, unique):
    """The broker is gone before the records go out: ``flush`` raises (the stage's batch is then
    redelivered) rather than returning as if they were acknowledged."""
    with EmbeddedBroker(tmp_path / "broker") as own:
        topic = f"sends-fail-{unique}"
        ensure_topics([own.bootstrap], [TopicSpec(topic)], partitions=2)

        async def run() -> type[BaseException] | None:
            app = _app(own.url, unique, producer_request_timeout=3.0)
            await app.producer.start()
            try:
                sends = Sends(app.producer)
                sends.add(topic, b"k", b"before")
                await sends.flush()  # metadata known, delivered
                own.stop()
                sends.add(topic, b"k", b"after")
                sends.add(topic, b"other", b"after")
                try:
                    await asyncio.wait_for(sends.flush(), timeout=60)
                except TimeoutError:  # wait_for's, not a delivery error (aiokafka's are KafkaErrors)
                    raise AssertionError("flush neither returned nor failed with the broker gone") from None
                except Exception as exc:  # noqa: BLE001 - what failed is the point
                    return type(exc)
                return None
            finally:
                await app.producer.stop()

        failed = asyncio.run(run())
    assert failed is not None and issubclass(failed, KafkaError)  # the broker's absence, not a bug of ours
