"""A stage batch's outputs, sent as one produce batch per topic partition.

Every record a stage sends through ``AIOKafkaProducer.send`` pays for itself: the topic's
metadata check, a size estimate, the partitioner with two fresh partition lists, the
accumulator's lookup and one delivery future per record, and the caller's gather over those
futures: ~15 % of the worker's samples in a py-spy profile (benchmarks/README.md). A stage
batch knows all its outputs before it needs any acknowledgement (at-least-once: outputs are
acknowledged before the batch's offsets are committed, and before its state is written), so
``Sends.add`` appends each record to an aiokafka ``BatchBuilder`` of its (topic, partition) and
``flush`` submits the builders with ``send_batch`` and awaits one future per builder.

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
  does): at ``add``, or at ``flush`` for a topic whose metadata was not known yet.

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
    broker acknowledged every one (raises if any failed). Reusable: a flush empties it.

    A record goes into its partition's builder when it is added: its bytes are copied there and
    the caller's value can be freed at once (a whole batch's encoded values held until the flush
    raised the worker's peak RSS). A topic whose partitions the producer's metadata does not know
    yet waits in a list until the flush fetches them, and so do its later records (order)."""

    __slots__ = ("_producer", "_kafka", "_partitioner", "_default", "_partitions", "_hashes", "_builders",
                 "_waiting", "_waiting_topics", "_count")

    def __init__(self, producer: Any) -> None:
        self._producer = producer  # faust's Producer (app.producer), started by the time records are added
        self._kafka: AIOKafkaProducer | None | bool = False  # False: not looked up yet; None: not aiokafka
        self._partitioner: Any = None
        self._default = False
        self._partitions: dict[str, list[int]] = {}
        self._hashes: dict[bytes, int] = {}  # a batch sends several records per customer key: hash each once
        self._builders: dict[tuple[str, int], list[Any]] = {}
        self._waiting: list[_Record] = []  # records of topics without metadata yet (or of another transport)
        self._waiting_topics: set[str] = set()
        self._count = 0

    def _resolve(self) -> AIOKafkaProducer | None:
        kafka = getattr(self._producer, "_producer", None)
        if isinstance(kafka, AIOKafkaProducer):
            self._kafka = kafka
            self._partitioner = getattr(self._producer, "partitioner", None) or DefaultPartitioner()
            self._default = isinstance(self._partitioner, DefaultPartitioner)
            return kafka
        self._kafka = None
        return None

    def add(self, topic: str, key: bytes | None, value: bytes | None, headers: Headers | None = None, *,
            partition: int | None = None) -> None:
        self._count += 1
        kafka = self._resolve() if self._kafka is False else self._kafka
        if kafka is None or topic in self._waiting_topics:
            self._waiting.append((topic, key, value, headers, partition))
            return
        assert isinstance(kafka, AIOKafkaProducer)
        if partition is None:
            every = self._partitions.get(topic)
            if every is None:
                known = kafka.client.cluster.partitions_for_topic(topic)
                if not known:
                    self._waiting_topics.add(topic)
                    self._waiting.append((topic, key, value, headers, partition))
                    return
                # As AIOKafkaProducer._partition: the partitions the producer's metadata knows, in its order.
                every = self._partitions[topic] = list(known)
            partition = self._choose(kafka, topic, key, every)
        self._append(kafka, topic, partition, key, value, headers)

    def _choose(self, kafka: AIOKafkaProducer, topic: str, key: bytes | None, every: list[int]) -> int:
        if key is not None and self._default:
            h = self._hashes.get(key)
            if h is None:
                h = self._hashes[key] = murmur2(key) & 0x7FFFFFFF
            return every[h % len(every)]
        available = list(kafka.client.cluster.available_partitions_for_topic(topic) or ())
        if key is None:
            return random.choice(available or every)
        return int(self._partitioner(key, every, available))

    def _append(self, kafka: AIOKafkaProducer, topic: str, partition: int, key: bytes | None, value: bytes | None,
                headers: Headers | None) -> None:
        chain = self._builders.get((topic, partition))
        if chain is None:
            chain = self._builders[(topic, partition)] = [kafka.create_batch()]
        if chain[-1].append(timestamp=None, key=key, value=value, headers=headers or []) is None:
            builder = kafka.create_batch()  # full (an empty builder takes any one record)
            builder.append(timestamp=None, key=key, value=value, headers=headers or [])
            chain.append(builder)

    def __len__(self) -> int:
        return self._count

    async def flush(self) -> None:
        waiting, builders, self._waiting, self._builders = self._waiting, self._builders, [], {}
        self._waiting_topics.clear()
        self._count = 0
        self._hashes.clear()
        kafka = self._kafka
        if not isinstance(kafka, AIOKafkaProducer):
            acks = [await self._producer.send(topic, key, value, partition, None, headers)
                    for topic, key, value, headers, partition in waiting]
            await asyncio.gather(*acks)
            return
        if waiting:
            self._builders = builders  # the waiting records go after those of their partitions built so far
            for topic, key, value, headers, partition in waiting:
                if partition is None:
                    every = self._partitions.get(topic)
                    if every is None:
                        every = self._partitions[topic] = list(await kafka.partitions_for(topic))
                    partition = self._choose(kafka, topic, key, every)
                self._append(kafka, topic, partition, key, value, headers)
            builders, self._builders = self._builders, {}
        if not builders:
            return
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
                        futures.append(await kafka.send_batch(builder, topic, partition=partition))
        except BaseException:
            for future in futures:  # shields: cancelling them marks the batches' outcome as seen
                future.cancel()
            raise
        await asyncio.gather(*futures)
