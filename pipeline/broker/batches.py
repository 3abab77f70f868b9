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
from collections.abc import Awaitable, Callable, Iterable, Sequence
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
# Offsets are committed at most this often (and when stopping, or when partitions are revoked), not
# after every batch: at a steady rate batches are small (one per fetch, ~50 a second), and a commit
# per batch was one more broker round trip in each batch's path and one more request for the broker
# (~0.4 ms of client and ~0.4 ms of broker CPU each, measured here). A crash redelivers what was
# handled since the last commit, as it already redelivers the batch in hand: effects are idempotent.
COMMIT_INTERVAL_S = 0.5
# A stage that fills its batches over a longer window (the ClickHouse writer's 0.5 s) gains little
# from polling every 20 ms, and each idle poll is a fetch the broker answers empty: an idle consumer
# polling every 20 ms cost 0.028 CPU-s/s here and the broker 0.055 (on 2 shared cores). 100 ms
# polls a fifth as often and adds at most 80 ms to a row's way into ClickHouse.
FILL_FETCH_MAX_WAIT_MS = 100
# The embedded broker (Tansu, memory storage) can serve a partition's later batch before an earlier
# one, written by another connection, is stored: a consumer at the partition's end then jumps over
# offsets that are on the topic (docs/reliability.md defect 5; benchmarks/crash_ingest.py --tail
# --writers 4). A fetch from Kafka has no gap in a topic that is neither compacted nor transactional,
# and where one is real (compaction, transaction markers) it is there on every fetch. So a gap within
# GAP_TAIL offsets of the high watermark is fetched again from its first offset, up to GAP_REFETCHES
# times, before it is taken as real; one further back is taken at once (the race needs a write in
# flight, at the end of the partition).
GAP_REFETCHES = 3
GAP_TAIL = 10_000
# How long the profile stage's batch stays open after its first event when nothing more is queued
# (BatchedTopic.batches, pipeline/broker/stream.py), as a fraction of its longest window
# (batch_seconds): at the default 0.05 s, 5 ms gathers what one fetch delivered without making
# every event wait for the whole window.
TAKE_LINGER_FRACTION = 0.1


class BatchConsumer:
    """A consumer group reading ``topics`` in batches of at most ``max_records``: what has arrived
    (waiting at most ``max_wait_s`` for anything), or with ``fill`` up to ``max_records`` within
    ``max_wait_s``; ``run(handler)`` until ``stop()``, which drains what is already fetched,
    commits and leaves the group."""

    def __init__(self, *, bootstrap_servers: list[str], group_id: str, topics: Sequence[str], max_records: int,
                 max_wait_s: float, fill: bool = False, options: dict[str, Any] | None = None,
                 on_batch: Callable[[int], None] | None = None, commit_interval_s: float = COMMIT_INTERVAL_S) -> None:
        self.group_id = group_id
        self.on_batch = on_batch  # told each handled batch's size (metrics: batches per stage)
        self.fill = fill  # wait up to max_wait_s for max_records (throughput), or take what has come (latency)
        self.topics = list(topics)
        self.max_records = max_records
        self.max_wait_ms = max(1, int(max_wait_s * 1000))
        self._options = {"bootstrap_servers": bootstrap_servers, "group_id": group_id, "enable_auto_commit": False,
                         "auto_offset_reset": "earliest", "max_poll_interval_ms": 300_000,
                         "fetch_max_wait_ms": FILL_FETCH_MAX_WAIT_MS if fill else FETCH_MAX_WAIT_MS,
                         **GROUP_TIMEOUTS,
                         **(options or {})}
        self._consumer: AIOKafkaConsumer | None = None
        self._committed: dict[TopicPartition, int] = {}
        self._handled: dict[TopicPartition, int] = {}  # next offset after the batches handled, not yet committed
        self.commit_interval_s = commit_interval_s
        self._last_commit = 0.0  # loop time of the last commit
        self._next: dict[TopicPartition, int] = {}  # the offset each partition's next fetched record should have
        self._refetched: dict[TopicPartition, tuple[int, int]] = {}  # (first missing offset, times fetched again)
        self.gaps_refetched = 0  # fetches repeated over a gap (tests, logs)
        self.gaps_accepted = 0  # gaps taken as real after GAP_REFETCHES, or far from the end
        self._stopping = asyncio.Event()
        self._done = asyncio.Event()
        self._joined = asyncio.Event()

    async def run(self, handle: Handler) -> None:
        consumer = AIOKafkaConsumer(**self._options)
        self._consumer = consumer
        await consumer.start()
        consumer.subscribe(self.topics, listener=_Joined(self._joined, self._commit_revoked))
        try:
            while not self._stopping.is_set():
                if not await self._one_batch(consumer, handle, self.max_wait_ms):
                    await self._commit(consumer, force=False)  # idle: what was handled last gets committed
            # Stopping: what was fetched already is handled and committed before we leave.
            while await self._one_batch(consumer, handle, 200):
                pass
            await self._commit(consumer, force=True)
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
        self._mend_gaps(consumer, fetched)
        # Across partitions in the order the records reached the broker (each partition's own
        # order kept): a replay's files, or a visit then the sign-up it led to, are handled in the
        # order they were published rather than in the order the fetches came back.
        records = list(heapq.merge(*fetched.values(), key=_timestamp))
        if not records:
            return 0
        for tp, batch in fetched.items():
            if batch:
                self._committed.setdefault(tp, batch[0].offset)  # the lag's base until the first commit
        if self.on_batch is not None:
            self.on_batch(len(records))
        try:
            await handle(records)
        except Exception as exc:
            # A failure that is not the input's fault (bad input is a dead letter, not an
            # exception): consume the batch again after a pause, losing nothing.
            log.error("%s: handling %s failed, retrying in 1 s: %r", self.group_id, where(records), exc,
                      exc_info=True)
            for tp, batch in fetched.items():
                if batch:
                    consumer.seek(tp, batch[0].offset)
                    self._next[tp] = batch[0].offset
            await asyncio.sleep(1.0)
            return 0 if self._stopping.is_set() else len(records)
        self._handled.update({tp: batch[-1].offset + 1 for tp, batch in fetched.items() if batch})
        await self._commit(consumer, force=False)
        return len(records)

    def _mend_gaps(self, consumer: AIOKafkaConsumer, fetched: dict[TopicPartition, list[Any]]) -> None:
        """Cut each partition's records at a gap near its end and fetch again from the first missing
        offset (GAP_REFETCHES): the records after the gap are fetched again with it."""
        for tp, batch in fetched.items():
            expected = self._next.get(tp)
            start = 0
            while start < len(batch):
                gap = first_gap([record.offset for record in batch[start:]], expected)
                if gap is None:
                    break
                index, missing = gap[0] + start, gap[1]
                highwater = consumer.highwater(tp)
                tried = self._refetched.get(tp)
                times = tried[1] if tried is not None and tried[0] == missing else 0
                if times < GAP_REFETCHES and (highwater is None or highwater - missing <= GAP_TAIL):
                    self._refetched[tp] = (missing, times + 1)
                    self.gaps_refetched += 1
                    log.info("%s: %s[%s] skipped offsets %s..%s: fetching again from %s", self.group_id, tp.topic,
                             tp.partition, missing, batch[index].offset - 1, missing)
                    del batch[index:]
                    consumer.seek(tp, missing)
                    break
                self._refetched.pop(tp, None)
                self.gaps_accepted += 1
                log.warning("%s: %s[%s] has no records at offsets %s..%s (fetched %d times): a real gap",
                            self.group_id, tp.topic, tp.partition, missing, batch[index].offset - 1, times + 1)
                expected, start = batch[index].offset, index  # go on checking past it
            if batch:
                self._next[tp] = batch[-1].offset + 1

    async def _commit(self, consumer: AIOKafkaConsumer, *, force: bool,
                      only: set[TopicPartition] | None = None) -> None:
        """Commit the offsets of the batches handled so far, if COMMIT_INTERVAL_S passed since the
        last commit (``force``: now; ``only``: those partitions, which are being revoked)."""
        loop = asyncio.get_running_loop()
        if not self._handled or not (force or loop.time() - self._last_commit >= self.commit_interval_s):
            return
        assigned = consumer.assignment()
        for tp in [tp for tp in self._handled if tp not in assigned]:
            del self._handled[tp]  # revoked meanwhile (its new owner consumes it again): not ours to commit
        offsets = {tp: OffsetAndMetadata(offset, "") for tp, offset in self._handled.items()
                   if only is None or tp in only}
        if not offsets:
            return
        for tp in offsets:
            del self._handled[tp]
        self._last_commit = loop.time()
        try:
            await consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # The group rebalanced meanwhile: the partitions' new owner reads them again from the
            # last commit (at-least-once; the effects are idempotent).
            log.warning("%s: commit of handled batches failed (%s): they will be consumed again", self.group_id, exc)
        else:
            self._committed.update({tp: meta.offset for tp, meta in offsets.items()})

    async def _commit_revoked(self, revoked: set[TopicPartition]) -> None:
        """Partitions are being taken away: commit what was handled of them, so their next owner
        does not consume it again."""
        for tp in revoked:  # a later assignment starts from the committed offset, wherever that is
            self._next.pop(tp, None)
            self._refetched.pop(tp, None)
        consumer = self._consumer
        if consumer is not None:
            await self._commit(consumer, force=True, only=set(revoked))

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


def where(records: Iterable[Any]) -> str:
    """Records (anything with topic, partition, offset) as topic[partition]@first..last, for the logs
    of the one error policy of the batched stages: a failed batch is logged and handled again."""
    spans: dict[tuple[str, int], list[int]] = {}
    for record in records:
        span = spans.setdefault((record.topic, record.partition), [record.offset, record.offset])
        span[0], span[1] = min(span[0], record.offset), max(span[1], record.offset)
    return ", ".join(f"{topic}[{partition}]@{first}..{last}" for (topic, partition), (first, last) in spans.items())


def first_gap(offsets: Sequence[int], expected: int | None) -> tuple[int, int] | None:
    """Where one partition's fetched offsets skip some: (index of the first record after the gap,
    the first missing offset), or None. ``expected``: the offset the first record should have
    (None: not known, e.g. after an assignment). A step back (a seek, a redelivery) is no gap."""
    previous = None if expected is None else expected - 1
    for index, offset in enumerate(offsets):
        if previous is not None and offset > previous + 1:
            return index, previous + 1
        previous = offset
    return None


def _timestamp(record: Any) -> int:
    return int(record.timestamp or 0)


class _Joined(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, joined: asyncio.Event, revoking: Callable[[set[TopicPartition]], Awaitable[None]]) -> None:
        self.joined = joined
        self.revoking = revoking

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.revoking(set(revoked))

    async def on_partitions_assigned(self, assigned: Any) -> None:
        self.joined.set()
