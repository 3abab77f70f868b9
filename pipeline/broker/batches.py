"""Batched consumption for the worker's stateless stages (ingest, ClickHouse writer).

faust hands every message through its conductor, a queue, an ``Event`` and an ack record: about
0.2 ms each here (DESIGN §3, benchmarks/README.md), 20× what aiokafka's ``getmany`` costs. The
profile stage needs faust (its tables, changelogs, recovery and co-partitioned assignment); the
stages that keep no state do not, so they read whole batches with their own consumer group,
hand each batch to a handler and commit the batch's offsets only after the handler returned:
at-least-once, like faust's acks. A batch interrupted by a crash or a rebalance is consumed
again; the handlers' effects are idempotent (event ids, profile versions, ReplacingMergeTree).
"""

from __future__ import annotations

import asyncio
import heapq
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError
from aiokafka.structs import OffsetAndMetadata

log = logging.getLogger(__name__)

Handler = Callable[[Sequence[Any]], Awaitable[None]]

# Short group timeouts: a worker that stops is replaced within seconds (the embedded broker
# keeps a departed member until its session times out).
GROUP_TIMEOUTS = {"session_timeout_ms": 6000, "heartbeat_interval_ms": 1000, "rebalance_timeout_ms": 6000}
# The embedded broker answers a fetch when its wait expires, not when data arrives (measured:
# p50 115 ms at aiokafka's default 500 ms, 4 ms at 10 ms): a short wait keeps latency low.
FETCH_MAX_WAIT_MS = 20


class BatchConsumer:
    """A consumer group reading ``topics`` in batches of at most ``max_records``: what has arrived
    (waiting at most ``max_wait_s`` for anything), or with ``fill`` up to ``max_records`` within
    ``max_wait_s``; ``run(handler)`` until ``stop()``, which drains what is already fetched,
    commits and leaves the group."""

    def __init__(self, *, bootstrap_servers: list[str], group_id: str, topics: Sequence[str], max_records: int,
                 max_wait_s: float, fill: bool = False, options: dict[str, Any] | None = None) -> None:
        self.group_id = group_id
        self.fill = fill  # wait up to max_wait_s for max_records (throughput), or take what has come (latency)
        self.topics = list(topics)
        self.max_records = max_records
        self.max_wait_ms = max(1, int(max_wait_s * 1000))
        self._options = {"bootstrap_servers": bootstrap_servers, "group_id": group_id, "enable_auto_commit": False,
                         "auto_offset_reset": "earliest", "max_poll_interval_ms": 300_000,
                         "fetch_max_wait_ms": FETCH_MAX_WAIT_MS, **GROUP_TIMEOUTS,
                         **(options or {})}
        self._consumer: AIOKafkaConsumer | None = None
        self._committed: dict[TopicPartition, int] = {}
        self._stopping = asyncio.Event()
        self._done = asyncio.Event()
        self._joined = asyncio.Event()

    async def run(self, handle: Handler) -> None:
        consumer = AIOKafkaConsumer(**self._options)
        self._consumer = consumer
        await consumer.start()
        consumer.subscribe(self.topics, listener=_Joined(self._joined))
        try:
            while not self._stopping.is_set():
                await self._one_batch(consumer, handle, self.max_wait_ms)
            # Stopping: what was fetched already is handled and committed before we leave.
            while await self._one_batch(consumer, handle, 200):
                pass
        finally:
            self._done.set()
            self._consumer = None
            await consumer.stop()

    async def _one_batch(self, consumer: AIOKafkaConsumer, handle: Handler, wait_ms: int) -> int:
        fetched = await consumer.getmany(timeout_ms=wait_ms, max_records=self.max_records)
        if self.fill and fetched:
            # Fill the batch up to max_records or max_wait: a ClickHouse insert costs the same
            # ~tens of ms for 100 rows as for 10,000 (getmany alone returns whatever has arrived).
            loop = asyncio.get_running_loop()
            deadline = loop.time() + self.max_wait_ms / 1000
            count = sum(len(b) for b in fetched.values())
            while count < self.max_records and not self._stopping.is_set():
                left = int((deadline - loop.time()) * 1000)
                if left <= 0:
                    break
                more = await consumer.getmany(timeout_ms=min(left, 100), max_records=self.max_records - count)
                for tp, batch in more.items():
                    fetched.setdefault(tp, []).extend(batch)
                    count += len(batch)
        # Across partitions in the order the records reached the broker (each partition's own
        # order kept): a replay's files, or a visit then the sign-up it led to, are handled in the
        # order they were published rather than in the order the fetches came back.
        records = list(heapq.merge(*fetched.values(), key=_timestamp))
        if not records:
            return 0
        for tp, batch in fetched.items():
            if batch:
                self._committed.setdefault(tp, batch[0].offset)  # the lag's base until the first commit
        try:
            await handle(records)
        except Exception as exc:
            # A failure that is not the input's fault (bad input is a dead letter, not an
            # exception): consume the batch again after a pause, losing nothing.
            where = ", ".join(f"{tp.topic}[{tp.partition}]@{b[0].offset}..{b[-1].offset}"
                              for tp, b in fetched.items() if b)
            log.error("%s: handling %s failed, retrying in 1 s: %r", self.group_id, where, exc, exc_info=True)
            for tp, batch in fetched.items():
                if batch:
                    consumer.seek(tp, batch[0].offset)
            await asyncio.sleep(1.0)
            return 0 if self._stopping.is_set() else len(records)
        offsets = {tp: OffsetAndMetadata(batch[-1].offset + 1, "") for tp, batch in fetched.items() if batch}
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # The group rebalanced while the batch was handled: its partitions' new owner reads
            # them again from the last commit (at-least-once; the effects are idempotent).
            log.warning("%s: commit after a batch failed (%s): it will be consumed again", self.group_id, exc)
        else:
            self._committed.update({tp: meta.offset for tp, meta in offsets.items()})
        return len(records)

    async def stop(self, timeout: float = 30.0) -> None:
        """Finish the batch in hand and what is fetched, commit, leave the group."""
        if self._consumer is None:
            return
        self._stopping.set()
        try:
            await asyncio.wait_for(self._done.wait(), timeout)
        except TimeoutError:
            log.error("%s: did not stop within %.0f s; uncommitted batches will be consumed again",
                      self.group_id, timeout)

    def lag(self) -> dict[tuple[str, int], int]:
        """Per assigned partition: the highwater last fetched minus the committed offset."""
        consumer = self._consumer
        if consumer is None:
            return {}
        lags = {}
        for tp in consumer.assignment():
            highwater = consumer.highwater(tp)
            if highwater is not None:
                lags[(tp.topic, tp.partition)] = max(0, highwater - self._committed.get(tp, 0))
        return lags

    def joined(self) -> bool:
        """The group gave this consumer its partitions (perhaps none) at least once."""
        return self._joined.is_set()


def _timestamp(record: Any) -> int:
    return int(record.timestamp or 0)


class _Joined(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, joined: asyncio.Event) -> None:
        self.joined = joined

    async def on_partitions_revoked(self, revoked: Any) -> None:
        pass

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.joined.set()
