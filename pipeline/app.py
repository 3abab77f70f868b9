"""The composition root: the one place that creates the faust.App, its topics, table, agents and timer.

Agents only move records: read a batch (``take_events``), call the pure core, write the
store once per changed customer per batch (plus one changelog message), send, and let faust
ack the batch after the body ran — offsets are committed only after the sends completed.
Time-driven transitions come from a timer index (``pipeline.timers``) ticked by a faust
timer; the profile agent and the tick share one lock, so a customer's state is never
written by both at once. Control markers (``pipeline.control``) tell a replay when
everything before them was processed and flushed.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import time
import weakref
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

import faust
from faust.streams import _current_event

from pipeline import codecs
from pipeline.broker import topics as t
from pipeline.control import DONE, HEADER, MARKER, Completion, Marker, control_kind
from pipeline.decode import Limits, decode, schema_id_of
from pipeline.events import DeadLetter
from pipeline.identity import routing_key
from pipeline.privacy import redact_emails
from pipeline.processor import Config, StepResult, advance, schedule, step
from pipeline.profile import ProfileState
from pipeline.registry import RegistrySchemas, schema_source
from pipeline.segments.definitions import Segment
from pipeline.settings import Settings
from pipeline.sinks.clickhouse import ClickHouseWriter
from pipeline.timers import TimerIndex

log = logging.getLogger(__name__)


class _PartitionOf:
    """Stands for an event of a partition: faust's RocksDB store picks the partition's DB
    from the current event, and in a batch (or a timer) the current event is not the key's."""

    def __init__(self, partition: int) -> None:
        self.message = type("M", (), {"partition": partition})()


class Clock:
    """now(): wall time, or in event mode (replays) event time.

    In event mode an event is evaluated at its own ``occurred_at`` (never before the profile's
    last evaluation), so a replay gives the same changes whatever the interleaving of
    partitions; a partition's timers fire as its watermark — the latest event time it has
    seen — passes them, since all of a customer's later events come through that partition.
    """

    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.watermarks: dict[int, int] = {}

    def observe(self, partition: int, occurred_at: int) -> None:
        if occurred_at > self.watermarks.get(partition, 0):
            self.watermarks[partition] = occurred_at

    def now_ms(self, partition: int) -> int:
        return self.watermarks.get(partition, 0) if self.mode == "event" else int(time.time() * 1000)

    def evaluation_time(self, occurred_at: int, state: ProfileState | None) -> int:
        if self.mode != "event":
            return int(time.time() * 1000)
        return max(occurred_at, state.updated_at) if state is not None else occurred_at


def partition_for_key(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, as aiokafka and kafka-python) gives a key."""
    from kafka.partitioner import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions


class ProfileStore:
    """The profiles table read and written per partition, outside faust's per-event context."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self._pins: list[_PartitionOf] = []

    def _pin(self, partition: int) -> None:
        marker = _PartitionOf(partition)
        self._pins = [marker]  # keep it alive: faust holds only a weak reference
        _current_event.set(weakref.ref(marker))  # type: ignore[arg-type]

    def get(self, key: bytes, partition: int) -> ProfileState | None:
        self._pin(partition)
        stored = self.table.data.get(key)
        return ProfileState.from_dict(json.loads(stored)) if stored else None

    def put(self, key: bytes, partition: int, state: ProfileState) -> Any:
        """Write the store and send the changelog message; returns the send's future."""
        value = json.dumps(state.to_dict(), separators=(",", ":")).encode()
        self._pin(partition)
        self.table.data[key] = value
        return self.table.send_changelog(partition, key, value)

    def scan(self, partition: int, partitions: int) -> list[tuple[bytes, ProfileState]]:
        """Every profile of one partition (rebuilding the timer index after an assignment)."""
        data = self.table.data
        dbs = getattr(data, "_dbs", None)
        if dbs is not None:  # RocksDB: one database per partition
            db = data._db_for_partition(partition)
            items = list(data._visible_items(db))
        else:  # memory: one dict; the partition is the key's under the default partitioner
            items = [(k, v) for k, v in list(data.data.items()) if partition_for_key(k, partitions) == partition]
        return [(k, ProfileState.from_dict(json.loads(v))) for k, v in items if v]


def create_app(settings: Settings, segments: Sequence[Segment]) -> faust.App:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    app = faust.App(
        settings.app_id,
        broker=settings.broker.replace(",", ";kafka://"),
        store=settings.store,
        datadir=str(settings.data_dir / "state"),
        topic_partitions=settings.partitions,
        broker_rebalance_timeout=6, broker_session_timeout=6, broker_heartbeat_interval=1,
        web_enabled=False,
        topic_allow_declare=True,
        key_serializer="raw",
        value_serializer="raw",
    )
    clock = Clock(settings.clock)
    limits = Limits(settings.max_message_bytes, int(settings.max_future_skew_seconds * 1000),
                    int(datetime(settings.min_occurred_at_year, 1, 1, tzinfo=UTC).timestamp() * 1000))
    resolver = schema_source(settings.schema_registry_url)  # a bad schemas/ directory fails here, at start
    config = Config(settings.affinity_half_life_days, settings.dedup_window_events,
                    int(settings.timer_sweep_seconds * 1000))
    raw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
    inputs = app.topic(*(settings.topic(n) for n in t.INPUTS), **raw)
    source_of = {settings.topic(n): n for n in t.INPUTS}
    customer_events = app.topic(settings.topic(t.CUSTOMER_EVENTS), **raw)
    changes_name = settings.topic(t.SEGMENT_CHANGES)
    profiles_name = settings.topic(t.PROFILE_UPDATES)
    dead_name = settings.topic(t.DEAD_LETTERS)
    changes_topic = app.topic(changes_name, **raw)
    profiles_topic = app.topic(profiles_name, **raw)
    dead_topic = app.topic(dead_name, **raw)
    control_topic = app.topic(settings.topic(t.CONTROL), **raw)
    profiles = app.Table("profiles", partitions=settings.partitions, key_type=bytes, value_type=bytes)
    store = ProfileStore(profiles)
    timers = TimerIndex()
    state_lock = asyncio.Lock()
    writer = ClickHouseWriter(settings.clickhouse_dsn, settings.clickhouse_database)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")
    partitions = settings.partitions

    async def forward_marker(marker: Marker, *targets: Any) -> None:
        await asyncio.gather(*[
            await target.send(key=b"", value=marker.encode(), partition=p, headers=marker.headers())
            for target in targets for p in range(marker.partitions)
        ])

    async def emit(key: bytes, result: StepResult, sends: list[Any]) -> None:
        for change in result.changes:
            sends.append(await changes_topic.send(key=key, value=codecs.encode_change(change.to_dict())))
        if result.row is not None:
            sends.append(await profiles_topic.send(key=key, value=codecs.encode_profile(result.row)))

    @app.agent(inputs)
    async def ingest(stream: Any) -> None:
        loop = asyncio.get_running_loop()
        async for batch in stream.take_events(settings.batch_size, settings.batch_seconds):
            if isinstance(resolver, RegistrySchemas):
                # Fetch unknown schema ids off the event loop, once per id; decode then reads the cache.
                ids = {i for e in batch if (i := schema_id_of(e.message.value))}
                if resolver.missing(ids):
                    await loop.run_in_executor(None, resolver.prefetch, ids)
            sends: list[Any] = []
            for event in batch:
                message = event.message
                if control_kind(message.headers) == MARKER:
                    # Everything before the marker must be on its way before the marker is.
                    await asyncio.gather(*sends)
                    sends = []
                    marker = Marker.decode(message.value).via(f"{message.topic}:{message.partition}")
                    await forward_marker(marker, customer_events, dead_topic)
                    continue
                result = decode(source_of[message.topic], message.value, now_ms=int(time.time() * 1000),
                                limits=limits, resolver=resolver)
                if isinstance(result, DeadLetter):
                    dead = DeadLetter(redact_emails(result.payload), result.error_class, result.error_message,
                                      message.topic, message.partition, message.offset)
                    log.warning("dead letter %s[%s]@%s: %s", message.topic, message.partition, message.offset,
                                result.error_message)
                    sends.append(await dead_topic.send(key=message.key, value=dead.payload,
                                                       headers=dead.headers()))
                    continue
                key = routing_key(customer_id=result.customer_id, loyalty_id=result.loyalty_id,
                                  email_hash=result.email_hash, anonymous_id=result.anonymous_id)
                assert key is not None  # decode refuses events without an identifier
                sends.append(await customer_events.send(key=key.encode(), value=codecs.encode_event(result)))
            await asyncio.gather(*sends)

    markers_in = Completion()

    async def fire_timers(partition: int, now_ms: int, sends: list[Any]) -> None:
        """Apply the time-driven transitions of one partition due up to ``now_ms`` (lock held)."""
        for key, due in timers.pop_due(partition, now_ms):
            state = store.get(key, partition)
            if state is None or state.next_check_at != due:
                continue  # erased, or rescheduled since
            result = advance(state, now_ms, segments, config)
            if result.row is not None:
                sends.append(store.put(key, partition, state))
            await emit(key, result, sends)
            timers.put(partition, key, state.next_check_at)

    @app.agent(customer_events)
    async def fold_profiles(stream: Any) -> None:
        async for batch in stream.take_events(settings.batch_size, settings.batch_seconds):
            async with state_lock:
                await _fold_batch(batch)

    async def _fold_batch(batch: Sequence[Any]) -> None:
        dirty: dict[bytes, tuple[int, ProfileState, int]] = {}  # key -> (partition, state, evaluated at)
        completed: list[tuple[int, Marker]] = []
        sends: list[Any] = []
        for event in batch:
            message = event.message
            key, partition = message.key, message.partition
            if control_kind(message.headers) == MARKER:
                marker = Marker.decode(message.value)
                if markers_in.add(marker.run_id, partition, marker.origin, marker.origins):
                    completed.append((partition, marker))
                continue
            customer_event = codecs.decode_event(message.value)
            clock.observe(partition, customer_event.occurred_at)
            state = dirty[key][1] if key in dirty else store.get(key, partition)
            now_ms = clock.evaluation_time(customer_event.occurred_at, state)
            if state is not None and state.next_check_at is not None and state.next_check_at <= now_ms:
                # Transitions that fell due before this event are time's, at their own instants.
                await emit(key, advance(state, now_ms, segments, config), sends)
            result = step(state, key.decode(), customer_event, now_ms, segments, config)
            if result.duplicate:
                continue
            dirty[key] = (partition, result.state, now_ms)
            await emit(key, result, sends)
        for key, (partition, state, evaluated_at) in dirty.items():
            # Schedule from the instant this profile was last evaluated, then catch up on what
            # fell due while the rest of the batch moved the clock on.
            schedule(state, evaluated_at, segments, config)
            await emit(key, advance(state, clock.now_ms(partition), segments, config), sends)
            timers.put(partition, key, state.next_check_at)
            sends.append(store.put(key, partition, state))
        for partition, marker in completed:
            clock.observe(partition, marker.watermark)
            await fire_timers(partition, clock.now_ms(partition), sends)
        await asyncio.gather(*sends)
        for partition, marker in completed:  # only after everything before them was sent
            forwarded = marker.via("")
            for target in (changes_topic, profiles_topic):
                await (await target.send(key=b"", value=forwarded.encode(), partition=partition,
                                         headers=forwarded.headers()))

    indexed: set[int] = set()

    @app.timer(interval=settings.timer_interval_seconds)
    async def tick() -> None:
        """Time-driven transitions: pop what is due from the timer index, never sweep."""
        if app.rebalancing or app.in_recovery:
            return
        topic = customer_events.get_topic_name()
        assigned = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic}
        async with state_lock:
            for partition in indexed - assigned:
                timers.drop(partition)
            for partition in assigned - indexed:
                for key, state in store.scan(partition, partitions):
                    timers.put(partition, key, state.next_check_at)
            indexed.clear()
            indexed.update(assigned)
            sends: list[Any] = []
            for partition in sorted(assigned):
                await fire_timers(partition, clock.now_ms(partition), sends)
            await asyncio.gather(*sends)

    sink_markers = Completion()

    @app.agent(app.topic(changes_name, profiles_name, dead_name, **raw))
    async def clickhouse_sink(stream: Any) -> None:
        loop = asyncio.get_running_loop()
        async for batch in stream.take_events(settings.sink_batch_size, settings.sink_batch_seconds):
            changes, rows, dead, markers = [], [], [], []
            for event in batch:
                message = event.message
                if control_kind(message.headers) == MARKER:
                    markers.append((message.topic, message.partition, Marker.decode(message.value)))
                elif message.topic == changes_name:
                    changes.append(codecs.decode_change(message.value))
                elif message.topic == profiles_name:
                    rows.append(codecs.decode_profile(message.value))
                else:
                    dead.append(_dead_letter_row(message))
            write = functools.partial(writer.write, changes=changes, profiles=rows, dead_letters=dead)
            await _retry(loop, write)
            for topic, partition, marker in markers:
                expected = marker.partitions * (2 + marker.origins)  # changes, profiles, dead letters
                if sink_markers.add(marker.run_id, "sink", (topic, partition, marker.origin), expected):
                    log.info("run %s: every event processed and flushed", marker.run_id)
                    await (await control_topic.send(key=marker.run_id.encode(), value=marker.encode(),
                                                    headers=[(HEADER, DONE)]))

    async def _retry(loop: asyncio.AbstractEventLoop, write: Any) -> None:
        delay = 0.5
        while True:  # retry until ClickHouse takes the batch: the batch is acked only after
            try:
                await loop.run_in_executor(executor, write)
                return
            except Exception as exc:  # noqa: BLE001 - any failure: back off and retry
                log.error("ClickHouse insert failed (%s); retrying in %.1f s", exc, delay)
                await loop.run_in_executor(executor, writer.reset)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)

    return app


def _dead_letter_row(message: Any) -> dict[str, Any]:
    headers = dict(message.headers.items() if isinstance(message.headers, dict) else message.headers or ())

    def header(name: str) -> str:
        value = headers.get(name)
        return bytes(value).decode("utf-8", "replace") if value is not None else ""

    def number(name: str) -> int:
        text = header(name)
        return int(text) if text.lstrip("-").isdigit() else -1

    return {"source_topic": header("source_topic"), "source_partition": number("source_partition"),
            "source_offset": number("source_offset"), "error_class": header("error_class"),
            "error_message": header("error_message"),
            "payload": bytes(message.value or b"").decode("utf-8", "replace"),
            "received_at": int(message.timestamp * 1000) if message.timestamp else int(time.time() * 1000)}
