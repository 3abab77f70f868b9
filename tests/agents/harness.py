"""The profile agent (``fold_profiles``) run alone in faust's ``test_context()``, no broker.

The app is the product's own ``create_app`` with ``store="memory://"``; records go in through
the test wrapper's channel in the wire format the ingest stage writes to ``customer-events``.
What the agent sends is kept by ``MemoryProducer``: faust-streaming 0.15 has no ``memory://``
transport (only aiokafka and confluent), so the one stand-in here is for the Kafka broker at
faust's producer interface (the product's ``produce()``, ``Topic.send`` and the tables' changelog
sends all end there). Nothing of ``pipeline`` is replaced.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import faust
from faust.transport.producer import Producer
from faust.types import TP
from faust.types.tuples import RecordMetadata
from kafka.partitioner import murmur2

from pipeline import codecs, profile_encoding
from pipeline.app import create_app
from pipeline.broker import topics as t
from pipeline.control import control_kind
from pipeline.decode import decode
from pipeline.events import DeadLetter, Event
from pipeline.identity import routing_key
from pipeline.linking import Alias
from pipeline.profile import ProfileState
from pipeline.segments.definitions import Segment, load_segments
from pipeline.settings import Settings

AGENT = "pipeline.app.fold_profiles"
SETTLE_SECONDS = 10.0  # a hang guard only: a batch here takes milliseconds
ACK_SECONDS = 0.001  # the in-memory broker's acknowledgement comes after the send returned


def ms(iso: str) -> int:
    """Epoch milliseconds of an ISO-8601 instant with its offset."""
    instant = datetime.fromisoformat(iso)
    assert instant.tzinfo is not None, "give the offset: instants are timezone-aware"
    return int(instant.timestamp() * 1000)


def kafka_partition(key: bytes, partitions: int) -> int:
    """Kafka's default partitioner (murmur2), which the broker would apply to a keyed send."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


@dataclass(frozen=True)
class Sent:
    topic: str
    partition: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    unacknowledged: frozenset[int]  # indexes of earlier sends not yet acknowledged when this one was made


class MemoryProducer(Producer):
    """faust's producer interface over a list: every send is recorded in order, partitioned as
    Kafka would, and acknowledged a moment later (as a broker does, not within the send): so a
    record shows which earlier sends the sender had not waited for."""

    def __init__(self, transport: Any, partitions: int, **kwargs: Any) -> None:
        super().__init__(transport, **kwargs)
        self.partitions = partitions
        self.sent: list[Sent] = []
        self._offsets: dict[tuple[str, int], int] = {}
        self._unacknowledged: set[int] = set()

    async def send(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None,
                   timestamp: float | None, headers: Any, *, transactional_id: str | None = None) -> Any:
        if partition is None:
            partition = kafka_partition(key, self.partitions) if key is not None else 0
        offset = self._offsets.get((topic, partition), 0)
        self._offsets[(topic, partition)] = offset + 1
        pairs = headers.items() if isinstance(headers, dict) else headers or ()
        index = len(self.sent)
        self.sent.append(Sent(topic, partition, key, value, {name: bytes(v) for name, v in pairs},
                              frozenset(self._unacknowledged)))
        self._unacknowledged.add(index)
        loop = asyncio.get_running_loop()
        done = loop.create_future()
        metadata = RecordMetadata(topic=topic, partition=partition, topic_partition=TP(topic, partition),
                                  offset=offset, timestamp=timestamp, timestamp_type=0)
        loop.call_later(ACK_SECONDS, self._acknowledge, index, done, metadata)
        return done

    def _acknowledge(self, index: int, done: asyncio.Future, metadata: RecordMetadata) -> None:
        self._unacknowledged.discard(index)
        done.set_result(metadata)

    async def send_and_wait(self, topic: str, key: bytes | None, value: bytes | None, partition: int | None,
                            timestamp: float | None, headers: Any, *,
                            transactional_id: str | None = None) -> Any:
        return await (await self.send(topic, key, value, partition, timestamp, headers))

    async def flush(self) -> None:
        await self.buffer.flush()

    def key_partition(self, topic: str, key: bytes) -> TP:
        return TP(topic, kafka_partition(key, self.partitions))

    def supports_headers(self) -> bool:
        return True


class Processed(faust.Sensor):
    """Counts events the agent's stream acknowledged: ``BatchedTopic.batches`` acks a batch's events only
    after the agent's body for that batch returned, so the count says which batches are done."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0
        self.moved = asyncio.Event()

    def on_stream_event_out(self, tp: TP, offset: int, stream: Any, event: Any, state: Any = None) -> None:
        self.count += 1
        self.moved.set()


class FoldAgent:
    """``async with FoldAgent(settings) as fold:`` the app, its profile agent in ``test_context()``,
    and what it sent (``fold.producer.sent``)."""

    def __init__(self, settings: Settings, segments: Sequence[Segment] | None = None) -> None:
        self.settings = settings
        self.segments = list(segments) if segments is not None else load_segments(None)
        self.put_count = 0
        self._looped = 0  # sent records already fed back to customer-events

    async def __aenter__(self) -> FoldAgent:
        self.app = create_app(self.settings, self.segments, live_definitions=False)
        self.producer = MemoryProducer(self.app.transport, self.settings.partitions)
        self.app.producer = self.producer
        await self.producer.start()
        self.processed = Processed()
        self.app.sensors.add(self.processed)
        self._context = self.app.agents[AGENT].test_context()
        self.agent = await self._context.__aenter__()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        try:
            await self._context.__aexit__(*exc)
        finally:
            self.app.sensors.remove(self.processed)
            await self.producer.stop()

    # --- input ------------------------------------------------------------------------------

    async def put(self, key: bytes, value: bytes, *, headers: dict[str, bytes] | None = None,
                  partition: int | None = None, received_ms: int | None = None, settle: bool = True) -> None:
        """One ``customer-events`` record, on the partition Kafka gives its key unless told; with
        ``settle``, return once the agent has handled every batch put so far."""
        if partition is None:
            partition = kafka_partition(key, self.settings.partitions)
        await self.agent.put(value, key=key, partition=partition,
                             timestamp=(received_ms if received_ms is not None else time.time() * 1000) / 1000,
                             headers=list((headers or {}).items()))
        self.put_count += 1
        if settle:
            await self.settle()

    async def settle(self) -> None:
        """Until every record put so far was handled (or the agent crashed)."""
        deadline = asyncio.get_running_loop().time() + SETTLE_SECONDS
        while self.processed.count < self.put_count:
            crash = getattr(self.agent, "_crash_reason", None)
            if crash is not None:
                raise crash
            remaining = deadline - asyncio.get_running_loop().time()
            assert remaining > 0, f"the agent handled {self.processed.count} of {self.put_count} records"
            self.processed.moved.clear()
            try:
                await asyncio.wait_for(self.processed.moved.wait(), min(remaining, 0.2))
            except TimeoutError:
                pass

    async def event(self, source: str, fields: dict[str, Any], *, received_ms: int | None = None,
                    settle: bool = True) -> Event:
        """Put an input record of ``source`` as the ingest stage would pass it on (``ingested``)."""
        key, value, event = ingested(source, fields)
        await self.put(key, value, received_ms=received_ms, settle=settle)
        return event

    async def loop_back(self) -> int:
        """Feed what the agent sent to ``customer-events`` (identity commands, forwarded events)
        back to it, as the broker would, until it sends nothing more there. Returns how many."""
        topic = self.settings.topic(t.CUSTOMER_EVENTS)
        fed = 0
        while self._looped < len(self.producer.sent):
            record = self.producer.sent[self._looped]
            self._looped += 1
            if record.topic == topic and record.key is not None and record.value is not None:
                await self.put(record.key, record.value, headers=record.headers, partition=record.partition)
                fed += 1
        return fed

    # --- output and state -------------------------------------------------------------------

    def sent(self, name: str) -> list[Sent]:
        """The records sent to one of the product's topics (``pipeline.broker.topics`` name),
        control markers left out."""
        topic = self.settings.topic(name)
        return [r for r in self.producer.sent if r.topic == topic and control_kind(r.headers) is None]

    def markers(self, name: str) -> list[Sent]:
        """The control markers sent to one of the product's topics."""
        return [r for r in self.producer.sent if r.topic == self.settings.topic(name) and control_kind(r.headers)]

    def changes(self) -> list[dict[str, Any]]:
        """The segment changes sent, decoded (erasure tombstones left out)."""
        return [codecs.decode_change(r.value) for r in self.sent(t.SEGMENT_CHANGES) if r.value is not None]

    def changelog(self, table: str) -> list[Sent]:
        return [r for r in self.producer.sent if r.topic == f"{self.settings.app_id}-{table}-changelog"]

    def profile(self, key: str) -> ProfileState | None:
        """The profile stored under ``key`` in the agent's table."""
        value = self.app.tables["profiles"].data.get(key.encode())
        return profile_encoding.decode(value) if value else None

    def alias(self, key: str) -> Alias | None:
        value = self.app.tables["aliases"].data.get(key.encode())
        return Alias.decode(value) if value else None


def ingested(source: str, fields: dict[str, Any]) -> tuple[bytes, bytes, Event]:
    """An input record of ``source`` as the ingest stage turns it into a ``customer-events``
    record: decoded and normalized, keyed by its routing key, the internal JSON as value."""
    decoded = decode(source, json.dumps(fields).encode(), now_ms=int(time.time() * 1000))
    assert not isinstance(decoded, DeadLetter), decoded
    key = routing_key(customer_id=decoded.customer_id, loyalty_id=decoded.loyalty_id,
                      email_hash=decoded.email_hash, anonymous_id=decoded.anonymous_id)
    assert key is not None
    return key.encode(), codecs.encode_event(decoded), decoded


def agent_settings(data_dir: Path, **overrides: Any) -> Settings:
    """Settings of a worker whose profile stage is driven by tests: memory store, one event per
    batch unless told (a full batch is taken at once; the long wait never ends a batch early),
    no HTTP API. The broker address is never dialled: nothing here connects."""
    values: dict[str, Any] = {"broker": "kafka://127.0.0.1:9", "store": "memory://", "data_dir": data_dir,
                              "http_port": 0, "clock": "event", "batch_size": 1, "batch_seconds": 60.0,
                              "topic_prefix": "agents-"}
    values.update(overrides)
    return Settings(**values)


def run(scenario: Any) -> Any:
    """Run one test's coroutine on a fresh event loop (faust binds its services to the loop)."""
    return asyncio.run(scenario)
