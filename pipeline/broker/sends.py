"""A stage batch's outputs, sent as one produce batch per topic partition.

Every record a stage sends through ``AIOKafkaProducer.send`` pays for itself: the topic's
metadata check, a size estimate, the partitioner with two fresh partition lists, the
accumulator's lookup and one delivery future per record, and the caller's gather over those
futures: ~15 % of the worker's samples in a py-spy profile (benchmarks/README.md). A stage
batch knows all its outputs before it needs any acknowledgement (at-least-once: outputs are
acknowledged before the batch's offsets are committed, and before its state is written), so
``Sends`` collects them (``add``: one tuple per record) and ``flush`` groups them per
(topic, partition) into aiokafka ``BatchBuilder``s, submits each with ``send_batch`` and
awaits one future per builder.

What stays as with per-record sends:

- partitions: a keyed record goes where faust's producer would send it: its partitioner
  (aiokafka's ``DefaultPartitioner``, murmur2, unless the app configured another) over the
  topic's partitions as the producer's metadata lists them; an unkeyed one to a random
  available partition; an explicit partition is kept;
- order: records of one partition are appended in ``add`` order, and the builders of one
  partition are submitted in order (aiokafka waits for a partition's previous batch to be
  drained before it queues the next, and keeps one request in flight per broker);
- errors: any record that fails fails ``flush`` (a stage batch that raises is redelivered);
- timestamps: the builder stamps each record with the time it is appended (as ``send``
  does), here at ``flush``.

Other faust transports (and the agent tests' in-memory producer) have no aiokafka producer:
there ``flush`` sends record by record through faust's ``Producer.send``, in ``add`` order.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import DefaultPartitioner, murmur2

Headers = Sequence[tuple[str, bytes]]
# (topic, key, value, headers, partition or None)
_Record = tuple[str, bytes | None, bytes | None, Headers | None, int | None]


class Sends:
    """``add`` records during a stage batch; ``await flush()`` sends them and returns once the
    broker acknowledged every one (raises if any failed). Reusable: a flush empties it."""

    __slots__ = ("_producer", "_records")

    def __init__(self, producer: Any) -> None:
        self._producer = producer  # faust's Producer (app.producer): resolved at flush, it may start later
        self._records: list[_Record] = []

    def add(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None = None, *,
            partition: int | None = None) -> None:
        self._records.append((topic, key, value, headers, partition))

    def __len__(self) -> int:
        return len(self._records)

    async def flush(self) -> None:
        records, self._records = self._records, []
        if not records:
            return
        faust_producer = self._producer
        producer = getattr(faust_producer, "_producer", None)
        if not isinstance(producer, AIOKafkaProducer):
            acks = [await faust_producer.send(topic, key, value, partition, None, headers)
                    for topic, key, value, headers, partition in records]
            await asyncio.gather(*acks)
            return
        partitioner = getattr(faust_producer, "partitioner", None) or DefaultPartitioner()
        builders = await _build(producer, partitioner, records)
        futures: list[asyncio.Future[Any]] = []
        try:
            # In rounds: every partition's first builder, then every second one, ...: aiokafka queues a
            # partition's next batch only once its previous one was drained (one request in flight per
            # broker), so a chain submitted whole would cost a round trip per builder, each request
            # carrying one partition's batch instead of one batch of every partition.
            for depth in range(max(len(chain) for chain in builders.values())):
                for (topic, partition), chain in builders.items():
                    if depth < len(chain):
                        builder = chain[depth]
                        # Closed: the sender takes it at once instead of lingering, and no other
                        # sender's send() adds to it.
                        builder.close()
                        futures.append(await producer.send_batch(builder, topic, partition=partition))
        except BaseException:
            for future in futures:  # shields: cancelling them marks the batches' outcome as seen
                future.cancel()
            raise
        await asyncio.gather(*futures)


async def _build(producer: AIOKafkaProducer, partitioner: Any,
                 records: list[_Record]) -> dict[tuple[str, int], list[Any]]:
    """The records in builders per (topic, partition), in order; a full builder is followed by another."""
    partitions: dict[str, list[int]] = {}
    default = isinstance(partitioner, DefaultPartitioner)
    hashes: dict[bytes, int] = {}  # a batch sends several records per customer key: hash each key once
    builders: dict[tuple[str, int], list[Any]] = {}
    for topic, key, value, headers, partition in records:
        if partition is None:
            every = partitions.get(topic)
            if every is None:
                # As AIOKafkaProducer._partition: the partitions the producer's metadata knows, in its order.
                every = partitions[topic] = list(await producer.partitions_for(topic))
            if key is None:
                available = list(producer.client.cluster.available_partitions_for_topic(topic) or ())
                partition = random.choice(available or every)
            elif default:
                h = hashes.get(key)
                if h is None:
                    h = hashes[key] = murmur2(key) & 0x7FFFFFFF
                partition = every[h % len(every)]
            else:
                available = list(producer.client.cluster.available_partitions_for_topic(topic) or ())
                partition = partitioner(key, every, available)
        chain = builders.get((topic, partition))
        if chain is None:
            chain = builders[(topic, partition)] = [producer.create_batch()]
        if chain[-1].append(timestamp=None, key=key, value=value, headers=headers or []) is None:
            builder = producer.create_batch()  # full (an empty builder takes any one record)
            builder.append(timestamp=None, key=key, value=value, headers=headers or [])
            chain.append(builder)
    return builders
