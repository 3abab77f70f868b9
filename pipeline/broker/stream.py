"""Batched consumption of one topic inside a faust app: the profile stage's ``customer-events``.

faust hands every record to a stream through four per-message layers: its consumer's drain loop
(``Consumer._drain_messages`` awaits ``Service.wait_first`` per record: four tasks created and
three cancelled each time), the conductor (flow control, decode into an ``Event``, a queue put),
the stream's iterator (sensors, the current-event context) and an ack per event. The profile
stage reads whole batches anyway; ``BatchedTopic`` takes that topic's records
off faust's consumer where they are fetched and hands them to the agent in batches, and leaves
everything else to faust:

- the topic is still the agent's (faust subscribes it, assigns its partitions with the tables'
  changelogs, recovers the tables before the partitions resume, and pauses/clears on rebalance);
- the records are still faust's ``ConsumerMessage`` objects from faust's consumer, with its read
  offsets and offset gaps kept as its drain loop keeps them;
- a batch's records are tracked as faust's stream tracks them (``Consumer.track_message``: a
  rebalance or shutdown waits for them) when the batch is taken, and acked through
  ``Consumer.ack`` only after the agent's body for the batch returned; faust commits what is
  acked, as before. A body that raised leaves them unacked: consumed again after a restart.

Records of an older consumer generation, or taken while faust's flow control is suspended (a
rebalance), are dropped unacked, as faust's stream skips them: their partition's next owner
reads them again from the committed offset. Records still waiting when faust clears its
buffers on a revocation are dropped the same way (``clear``, registered with flow control).

Events put into the agent's channel the ordinary way (faust's ``test_context()``, which has no
consumer loop) go into the same batches through a stream processor, and are acked through the
stream, after the batch's body returned.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

log = logging.getLogger(__name__)

# Records of the topic fetched but not yet taken into a batch: the drain loop waits beyond this
# (faust's own per-stream buffer is stream_buffer_maxsize, 4,096 by default).
MAX_BUFFERED = 8192
# The drain loop lets other tasks run after this many of the topic's records in one fetch.
YIELD_EVERY = 500


class BatchedTopic:
    """``batches(stream, …)`` yields lists of the ``topic``'s records (faust ``Message``) taken
    straight from ``app``'s consumer. Create it before the app's consumer is first used (with the
    agent); ``enabled=False``: records take faust's ordinary path and ``batches`` reads them from
    the stream (faust's own dispatch, for comparison)."""

    def __init__(self, app: Any, topic: Any, *, enabled: bool = True, max_buffered: int = MAX_BUFFERED) -> None:
        self.app = app
        self.topic_names = frozenset(topic.topics)  # a faust topic may name several
        self.enabled = enabled
        self.max_buffered = max_buffered
        # (message, event): event is None for a record taken off the consumer, else the stream's Event
        self._pending: collections.deque[tuple[Any, Any]] = collections.deque()
        self._first_at = 0.0  # monotonic time the oldest pending record arrived
        self._arrivals = 0  # records appended so far (the window grows while this moves)
        self._max = 1  # the current batches() call's max_
        self._events: dict[str, asyncio.Event] | None = None  # made in the loop that uses them
        self._consumers: list[Any] = []  # the consumers hooked (one per app, kept alive by it)
        self.taken = 0  # records handed to batches from the consumer (tests and metrics)
        self.dropped = 0  # records dropped unacked (older generation, suspended flow, cleared)
        if enabled:
            self._install()
        app.flow_control.manage_queue(self)  # cleared with faust's stream buffers on a revocation

    # -- the consumer side ------------------------------------------------------------------------

    def _install(self) -> None:
        app = self.app
        if getattr(app, "_consumer", None) is not None:
            self._hook(app._consumer)
            return
        new_consumer = app._new_consumer

        def _new_consumer() -> Any:
            consumer = new_consumer()
            self._hook(consumer)
            return consumer

        app._new_consumer = _new_consumer  # faust creates its consumer through it, once (App.consumer)

    def _hook(self, consumer: Any) -> None:
        """Wrap the consumer's ``getmany`` (read by its drain loop each time the fetcher starts):
        the topic's records go to the pending buffer, every other record on to faust's loop."""
        if consumer in self._consumers:
            return
        self._consumers.append(consumer)
        getmany = consumer.getmany
        names = self.topic_names
        read_offset = consumer._read_offset
        app = self.app
        acks_enabled_for = app.topics.acks_enabled_for
        flow_control = app.flow_control
        append = self._append

        async def batched_getmany(timeout: float) -> AsyncIterator[tuple[Any, Any]]:
            taken = 0
            async for tp, message in getmany(timeout=timeout):
                if tp.topic not in names:
                    yield tp, message
                    continue
                if not flow_control.is_active():
                    # A rebalance is under way: as faust's conductor does, hold the record until flow
                    # resumes (after faust cleared its buffers and sought to the committed offsets).
                    await flow_control.acquire()
                if message.generation_id != app.consumer_generation_id:
                    # Fetched before that rebalance: the seek reads it again. Its offset is not
                    # noted as read, or the records before it would be skipped as read already.
                    continue
                # What faust's drain loop does with a record before delivering it: skip what was
                # read already (a seek back), note gaps in the offsets (they would hold commits back).
                offset = message.offset
                r_offset = read_offset[tp]
                if r_offset is not None and offset < r_offset:
                    continue
                if r_offset and offset - r_offset > 1 and acks_enabled_for(tp.topic):
                    await consumer._add_gap(tp, r_offset + 1, offset)
                append(message, None)
                read_offset[tp] = offset
                taken += 1
                if len(self._pending) >= self.max_buffered:
                    await self._wait_for_space(consumer)
                elif taken % YIELD_EVERY == 0:
                    await asyncio.sleep(0)
            commit_every = consumer._commit_every
            if taken and commit_every is not None and consumer._n_acked >= commit_every:
                consumer._n_acked = 0
                await consumer.commit()

        consumer.getmany = batched_getmany

    async def _wait_for_space(self, consumer: Any) -> None:
        """The agent is this far behind: hold faust's drain loop (and so its fetches of every
        partition) until it took half, or faust stops the flow (a rebalance: it clears the buffer)."""
        space = self._event("space")
        space.clear()
        while (len(self._pending) >= self.max_buffered and not consumer.should_stop
               and not consumer.suspend_flow.is_set()):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(space.wait(), 1.0)
            space.clear()

    def _event(self, name: str) -> asyncio.Event:
        if self._events is None:
            self._events = {"arrived": asyncio.Event(), "full": asyncio.Event(), "space": asyncio.Event()}
        return self._events[name]

    def _append(self, message: Any, event: Any) -> None:
        pending = self._pending
        if not pending:
            self._first_at = time.monotonic()
            self._event("arrived").set()
        pending.append((message, event))
        self._arrivals += 1
        if len(pending) >= self._max:
            self._event("full").set()

    def pending(self) -> int:
        """Records taken off the consumer and not yet handed to a batch."""
        return len(self._pending)

    def clear(self) -> None:
        """faust's flow control clears its buffers (partitions are being revoked, or flow resumes
        after a rebalance): what is pending here is of the old assignment. Untracked and unacked,
        it is read again by the partitions' next owner."""
        if self._pending:
            self.dropped += len(self._pending)
            log.debug("%s: %d pending records dropped on a rebalance", sorted(self.topic_names), len(self._pending))
            self._pending.clear()
        if self._events is not None:
            self._events["full"].clear()
            self._events["space"].set()

    # -- the agent side ---------------------------------------------------------------------------

    async def batches(self, stream: Any, max_: int, within: float, linger: float) -> AsyncIterator[list[Any]]:
        """Batches of at most ``max_`` records (faust ``Message``: key, value, partition, offset,
        headers, timestamp): the window opens at a batch's first record, closes ``linger`` later if
        no more arrived meanwhile, and grows while records keep arriving up to ``within`` after the
        first or ``max_`` records. The records are acked once the caller's
        body for the batch returned, never when it raised or was cancelled."""
        app = self.app
        self._max = max_
        arrived, full = self._event("arrived"), self._event("full")
        consuming: asyncio.Future[None] | None = None
        channel = stream.channel
        channel_it = channel.__aiter__()  # subscribes the topic (faust's conductor), as iterating it would
        loop = asyncio.get_running_loop()

        async def add_to_buffer(value: Any) -> Any:
            """Events delivered through the stream (test_context, or faust's path when not enabled)."""
            nonlocal consuming
            if consuming is not None:  # a batch is being handled: the next one waits for it
                try:
                    await consuming
                finally:
                    consuming = None
            event = stream.current_event
            if event is None:
                raise RuntimeError("batches() found no current event")
            self._append(event.message, event)
            while len(self._pending) >= max_ and not stream.should_stop:
                await stream.wait_for_stopped(self._event("space"), timeout=1.0)
            return value

        enable_acks = stream.enable_acks
        stream.enable_acks = False  # acked here, after the batch's body ran
        stream.add_processor(add_to_buffer)
        stream._enable_passive(channel_it)
        try:
            while not stream.should_stop:
                await stream.wait_for_stopped(arrived)
                if not self._pending:
                    arrived.clear()
                    continue
                seen = self._arrivals
                while len(self._pending) < max_ and not stream.should_stop:
                    elapsed = time.monotonic() - self._first_at
                    if elapsed >= within:
                        break
                    if elapsed >= linger:
                        if self._arrivals == seen and not _queued(channel):
                            break  # nothing came during the last linger: the burst is over
                        seen = self._arrivals
                    await stream.wait_for_stopped(full, timeout=max(0.001, min(linger, within - elapsed)))
                taken = self._take(max_, app)
                if not taken:
                    continue
                consuming = loop.create_future()
                handled = False
                try:
                    yield [message for message, _ in taken]
                    handled = True  # resumed: the caller's body for this batch returned
                finally:
                    # Acked (and so committed by faust) only once the body returned; a body that
                    # raised or was cancelled closes this generator at the yield, unacked.
                    if handled:
                        await self._ack(stream, taken)
                    if not consuming.done():
                        consuming.set_result(None)  # let the stream's drainer add to the next batch
        finally:
            stream.enable_acks = enable_acks
            stream._processors.remove(add_to_buffer)

    def _take(self, max_: int, app: Any) -> list[tuple[Any, Any]]:
        pending = self._pending
        count = min(max_, len(pending))
        taken = [pending.popleft() for _ in range(count)]
        if pending:
            self._first_at = time.monotonic()  # they waited for this batch: the next window opens now
        else:
            self._event("arrived").clear()
        self._event("full").clear()
        if len(pending) < self.max_buffered // 2:
            self._event("space").set()
        if all(event is not None for _, event in taken):
            return taken
        # Records from the consumer: as faust's stream does when it takes an event, skip what belongs
        # to an older generation or arrived during a rebalance, and track the rest (a rebalance or a
        # shutdown waits until they are acked).
        consumer = app.consumer
        generation = app.consumer_generation_id
        active = app.flow_control.is_active()
        track = consumer.track_message
        inbound = app.monitor.stream_inbound_time if app.monitor is not None else None
        kept = []
        for message, event in taken:
            if event is None:
                if not active or message.generation_id != generation:
                    self.dropped += 1
                    continue
                message.tracked = True
                track(message)
                if inbound is not None:
                    inbound[message.tp] = time.monotonic()  # faust's "stream is idle" check reads it
            kept.append((message, event))
        self.taken += len(kept)
        return kept

    async def _ack(self, stream: Any, taken: list[tuple[Any, Any]]) -> None:
        consumer = self.app.consumer
        ack = consumer.ack
        on_message_out: Callable[..., None] = self.app.sensors.on_message_out
        for message, event in taken:
            if event is not None:
                await stream.ack(event)
            elif ack(message):
                on_message_out(message.tp, message.offset, message)


def _queued(channel: Any) -> bool:
    """Events delivered to the stream's channel and not yet taken into the buffer."""
    empty = getattr(channel, "empty", None)
    return empty is not None and not empty()
