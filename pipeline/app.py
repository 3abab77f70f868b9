"""The composition root: the one place that creates the faust.App, its topics, table, agents and timer.

Agents only move records: read a batch (``pipeline.broker.stream.BatchedTopic``: records taken
off faust's consumer in batches), call the pure core, write the store once per changed customer
per batch (plus one changelog message), send, and ack the batch through faust's consumer after
the body ran — offsets are committed only after the sends completed.
Time-driven transitions come from a timer index (``pipeline.timers``) ticked by a faust
timer; the profile agent and the tick share one lock, so a customer's state is never
written by both at once. Control markers (``pipeline.control``) tell a replay when
everything before them was processed and flushed.
"""

from __future__ import annotations

import asyncio
import bisect
import itertools
import logging
import time
import uuid
import weakref
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import faust
from faust.streams import _current_event
from faust.types import TP

from pipeline import codecs, profile_encoding
from pipeline.api import WorkerBackend, build_api, dashboard_data, start_api, stop_api
from pipeline.broker import topics as t
from pipeline.broker.batches import FETCH_MAX_WAIT_MS, TAKE_LINGER_FRACTION, BatchConsumer, where
from pipeline.broker.sends import Sends
from pipeline.broker.stream import BatchedTopic
from pipeline.cohorts import cohort, segment_sizes
from pipeline.control import DONE, HEADER, MARKER, Completion, Marker, control_kind
from pipeline.decode import Limits, decode, schema_id_of
from pipeline.errors import DefinitionError
from pipeline.events import DeadLetter
from pipeline.identity import alias_keys, identifiers_of, routing_key
from pipeline.linking import (
    AT_HEADER,
    ERASE,
    HOPS_HEADER,
    LINK,
    MAX_HOPS,
    MERGE,
    OP_HEADER,
    Alias,
    Command,
    canonical,
    erased_before,
    on_link,
)
from pipeline.metrics import Metrics
from pipeline.privacy import redact_emails
from pipeline.processor import Config, StepResult, absorb, advance, release, schedule, step
from pipeline.profile import ProfileState
from pipeline.recovery import CompleteTableManager, fetched_ends
from pipeline.registry import RegistrySchemas, schema_source
from pipeline.segments.definitions import Segment
from pipeline.segments.live import SENTINEL_PREFIX, DefinitionLog, SetHistory, set_fingerprint
from pipeline.settings import Settings
from pipeline.sinks.clickhouse import CHANGE_TABLES, EVENT_TABLES, PROFILE_TABLES, ClickHouseWriter, event_row
from pipeline.sinks.cluster import cluster_from_settings
from pipeline.timers import TimerIndex

log = logging.getLogger(__name__)

CATCH_UP_SECONDS = 10.0  # longest the timers of a newly assigned partition wait for its backlog (hold_timers)
WATERMARK_KEY = b"\x00watermark"  # event clock: a partition's watermark, kept in the aliases table (no identifier)

# faust's RocksDB defaults are per partition database: 64 MiB memtables (up to 3) and a 2 GiB block
# cache each, 8 databases at 4 partitions. The soak (issue 8) saw the memtables alone grow the
# worker ~21 MiB/min toward that bound. Profiles are ~2 KB: 8 MiB memtables flush every minute or so
# at 300 events/s; reads of older profiles come from the OS page cache under the small block cache.
ROCKSDB_OPTIONS = {"write_buffer_size": 8 * 2**20, "max_write_buffer_number": 2, "block_cache_size": 8 * 2**20}


class _PartitionOf:
    """Stands for an event of a partition: faust's RocksDB store picks the partition's DB
    from the current event, and in a batch (or a timer) the current event is not the key's."""

    __slots__ = ("message", "__weakref__")

    class _Message:
        __slots__ = ("partition",)

        def __init__(self, partition: int) -> None:
            self.partition = partition

    def __init__(self, partition: int) -> None:
        self.message = self._Message(partition)


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

    def evaluation_time(self, occurred_at: int, state: ProfileState | None, received_ms: int) -> int:
        """The instant an event (or command) is evaluated at. On the wall clock: when it entered
        ``customer-events`` (its record's timestamp), not when it is handled, so a batch redelivered
        after a crash is evaluated as it was the first time and re-sends the same changes with the
        same versions (time-driven transitions fall on the same side of each event)."""
        instant = received_ms if self.mode != "event" else occurred_at
        return max(instant, state.updated_at) if state is not None else instant


def partition_for_key(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner (murmur2, as aiokafka and kafka-python) gives a key."""
    from kafka.partitioner import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % partitions


class PartitionedStore:
    """A faust table read and written per partition, outside faust's per-event context, with
    the changelog message sent by hand (one per changed key per batch, DESIGN §3)."""

    def __init__(self, table: Any) -> None:
        self.table = table
        self._pins: dict[int, Any] = {}  # partition -> weak reference to its stand-in, kept alive here
        self._scan_keys: dict[int, list[bytes]] = {}  # memory://: a scan's sorted keys, per partition

    def _pin(self, partition: int) -> None:
        pin = self._pins.get(partition)
        if pin is None:
            marker = _PartitionOf(partition)
            pin = self._pins[partition] = (marker, weakref.ref(marker))  # faust holds only a weak reference
        _current_event.set(pin[1])  # type: ignore[arg-type]  # a stand-in, not an EventT

    def get(self, key: bytes, partition: int) -> bytes | None:
        self._pin(partition)
        value: bytes | None = self.table.data.get(key)
        return value

    def put(self, key: bytes, partition: int, value: bytes | None) -> Any:
        """Write (None: delete) the store and send the changelog message; returns the send's future."""
        self._pin(partition)
        if value is None:
            self.table.data.pop(key, None)
        else:
            self.table.data[key] = value
        return self.table.send_changelog(partition, key, value)

    def scan(self, partition: int, partitions: int, after: bytes | None, limit: int) -> list[tuple[bytes, bytes]]:
        """The next ``limit`` entries of one partition in key order, after the key ``after`` (None: from
        the first). A scan goes through a partition chunk by chunk with the values read as they are
        now (events are folded in between chunks), with no list of every key held meanwhile."""
        data = self.table.data
        if getattr(data, "_dbs", None) is not None:  # RocksDB: one database per partition, sorted by key
            offset_key = getattr(data, "offset_key", None)
            out = []
            for k, v in data._db_for_partition(partition).items(from_key=after):
                if k == after or k == offset_key or not v:
                    continue
                out.append((k, v))
                if len(out) >= limit:
                    break
            return out
        # memory: one dict; the partition is the key's under the default partitioner. The partition's
        # keys are sorted once per scan (a chunk each time would make a scan quadratic in the profiles);
        # a key added meanwhile is a profile folded under the current set, which needs no check.
        keys = self._scan_keys.get(partition)
        if after is None or keys is None:
            keys = self._scan_keys[partition] = sorted(
                k for k, v in data.data.items() if v and partition_for_key(k, partitions) == partition)
        out = []
        for k in itertools.islice(keys, bisect.bisect_right(keys, after) if after is not None else 0, None):
            v = data.data.get(k)
            if v:
                out.append((k, v))
                if len(out) >= limit:
                    return out
        del self._scan_keys[partition]  # the partition's end
        return out


def _encode_state(state: ProfileState) -> bytes:
    return profile_encoding.encode(state)  # compact binary; reads back older JSON values too


def _decode_state(value: bytes | None) -> ProfileState | None:
    return profile_encoding.decode(value) if value else None


class Definitions:
    """The segment definitions in force, replaced as a whole when a new set is applied."""

    def __init__(self, initial: Sequence[Segment]) -> None:
        self.current: list[Segment] = list(initial)
        self.fingerprint = set_fingerprint(self.current)
        self.ready = asyncio.Event()

    def replace(self, new: Sequence[Segment]) -> None:
        self.current = list(new)
        self.fingerprint = set_fingerprint(self.current)


def _short_fetch_wait() -> None:
    """Make faust's consumer ask for data every FETCH_MAX_WAIT_MS instead of every 1.5 s.

    faust builds its aiokafka consumer with ``fetch_max_wait_ms=1500`` (not a setting), and the
    embedded broker does not answer a waiting fetch when data arrives: measured here, one record's
    fetch latency is 115 ms at 500 ms, 16 ms at 100 ms, 4 ms at 10 ms (p50). The profile stage
    added hundreds of ms to every event's latency; an idle consumer now polls 50 times a second.
    """
    from faust.transport.drivers import aiokafka as driver

    create = driver.AIOKafkaConsumerThread._create_worker_consumer
    if getattr(create, "short_fetch_wait", False):
        return

    def create_with_short_wait(self: Any, transport: Any) -> Any:
        consumer = create(self, transport)
        consumer._fetch_max_wait_ms = FETCH_MAX_WAIT_MS  # read by consumer.start() when it builds its fetcher
        return consumer

    create_with_short_wait.short_fetch_wait = True  # type: ignore[attr-defined]
    driver.AIOKafkaConsumerThread._create_worker_consumer = create_with_short_wait  # type: ignore[method-assign]


def create_app(settings: Settings, segments: Sequence[Segment], *, live_definitions: bool = True) -> faust.App:
    """The worker's faust.App. ``live_definitions=False``: the given segments stay in force, no
    follower of the definitions topic (agent tests, tests/agents, run the profile agent alone in
    faust's ``test_context()``, where no app task runs to make the definitions ready)."""
    _short_fetch_wait()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    # Shared with the other workers through the group's assignment: where each one's API is.
    web_identity: dict[str, Any] = {"canonical_url": settings.advertised_url} if settings.http_port else {}
    app = faust.App(
        settings.app_id,
        broker=settings.broker.replace(",", ";kafka://"),
        store=settings.store,
        datadir=str(settings.data_dir / "state"),
        topic_partitions=settings.partitions,
        broker_rebalance_timeout=6, broker_session_timeout=6, broker_heartbeat_interval=1,
        web_enabled=False,
        # The embedded broker under-reports end offsets (DESIGN §3): faust's check that a RocksDB
        # partition's persisted offset is not past the changelog's end would stop every restart.
        recovery_consistency_check=False,
        TableManager=CompleteTableManager,  # recovery reads each changelog to its real end (pipeline.recovery)
        broker_credentials=settings.faust_credentials(),
        **web_identity,
        topic_allow_declare=True,
        key_serializer="raw",
        value_serializer="raw",
        # A few ms of linger packs a batch's sends into a few produce requests instead of one
        # request per message (syscalls and broker work per request dominated the profile).
        producer_linger=0.005,
    )
    clock = Clock(settings.clock)
    limits = Limits(settings.max_message_bytes, int(settings.max_future_skew_seconds * 1000),
                    int(datetime(settings.min_occurred_at_year, 1, 1, tzinfo=UTC).timestamp() * 1000))
    resolver = schema_source(settings.schema_registry_url)  # a bad schemas/ directory fails here, at start
    config = Config(settings.affinity_half_life_days, settings.dedup_window_events,
                    int(settings.timer_sweep_seconds * 1000), settings.lateness_days)
    raw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
    source_of = {settings.topic(n): n for n in t.INPUTS}
    customer_events = app.topic(settings.topic(t.CUSTOMER_EVENTS), **raw)
    changes_name = settings.topic(t.SEGMENT_CHANGES)
    profiles_name = settings.topic(t.PROFILE_UPDATES)
    dead_name = settings.topic(t.DEAD_LETTERS)
    changes_topic = app.topic(changes_name, **raw)
    profiles_topic = app.topic(profiles_name, **raw)
    dead_topic = app.topic(dead_name, **raw)
    folded_name = settings.topic(t.FOLDED_EVENTS)
    folded_topic = app.topic(folded_name, **raw)
    control_topic = app.topic(settings.topic(t.CONTROL), **raw)
    profiles = app.Table("profiles", partitions=settings.partitions, key_type=bytes, value_type=bytes,
                         options=dict(ROCKSDB_OPTIONS))
    store = PartitionedStore(profiles)
    aliases = PartitionedStore(app.Table("aliases", partitions=settings.partitions, key_type=bytes, value_type=bytes,
                                         options=dict(ROCKSDB_OPTIONS)))
    timers = TimerIndex()
    state_lock = asyncio.Lock()
    writer = ClickHouseWriter(settings.clickhouse_dsn, settings.clickhouse_database,
                              events_ttl_days=settings.events_ttl_days, cluster=cluster_from_settings(settings))
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")  # chDB: one thread
    partitions = settings.partitions
    metrics = Metrics()
    metrics.on_scrape(lambda m: m.set_timers_pending(len(timers)))

    stage_lags: list[Any] = []  # lag() of the batched stages (below)

    def scrape_lag(m: Metrics) -> None:
        """Consumer lag per assigned partition: the highwater the fetcher last saw minus the committed
        offset (the embedded broker under-reports highwaters, DESIGN §3: there it reads low)."""
        consumer = app.consumer
        for tp in app.assignor.assigned_actives():
            if tp.topic.endswith("-changelog") or "__assignor" in tp.topic:
                continue
            try:
                highwater = consumer.highwater(tp)
            except Exception:  # noqa: BLE001 - not fetched yet
                continue
            committed = getattr(consumer, "_committed_offset", {}).get(tp) or 0
            m.set_consumer_lag(tp.topic, tp.partition, max(0, (highwater or 0) - committed))
        for lags in stage_lags:
            for (topic, partition), lag in lags().items():
                m.set_consumer_lag(topic, partition, lag)

    metrics.on_scrape(scrape_lag)
    definitions = Definitions(segments)
    definitions_name = settings.topic(t.DEFINITIONS)
    definitions_topic = app.topic(definitions_name, **raw)

    events_name = customer_events.get_topic_name()

    async def forward_marker(marker: Marker, *targets: Any) -> None:
        await asyncio.gather(*[
            await target.send(key=b"", value=marker.encode(), partition=p, headers=marker.headers())
            for target in targets for p in range(marker.partitions)
        ])

    async def emit(key: bytes, result: StepResult, sends: Sends,
                   rows: dict[bytes, dict[str, Any]] | None = None) -> None:
        """Send the changes; the profile row now, or into ``rows`` to send once per key per batch."""
        metrics.segment_changes_sent(result.changes)
        for change in result.changes:
            sends.add(changes_name, key, value=codecs.encode_change(change.to_dict()))
        if result.row is not None:
            if rows is not None:
                rows[key] = result.row  # a later row of the same customer in the batch supersedes it
            else:
                sends.add(profiles_name, key, value=codecs.encode_profile(result.row))

    async def ingest(batch: Sequence[Any]) -> None:
        """Decode a batch of input records and repartition them by customer (``customer-events``);
        bad ones become dead letters. Returns once every send was acknowledged."""
        if isinstance(resolver, RegistrySchemas):
            # Fetch unknown schema ids off the event loop, once per id; decode then reads the cache.
            ids = {i for r in batch if (i := schema_id_of(r.value))}
            if resolver.missing(ids):
                await asyncio.get_running_loop().run_in_executor(None, resolver.prefetch, ids)
        sends = Sends(app.producer)  # one produce batch per partition, flushed before the batch is acked
        now_ms = int(time.time() * 1000)
        # Counted once per topic per batch: a labelled counter's lookup per record was ~5 % of the
        # worker's main thread at a steady rate (py-spy).
        for topic, count in Counter(record.topic for record in batch).items():
            metrics.event_in(topic, count)
        for record in batch:
            if control_kind(record.headers) == MARKER:
                # Everything before the marker must be acknowledged before the marker is sent.
                await sends.flush()
                marker = Marker.decode(record.value).via(f"{record.topic}:{record.partition}")
                await forward_marker(marker, customer_events, dead_topic)
                continue
            result = decode(source_of[record.topic], record.value, now_ms=now_ms, limits=limits, resolver=resolver)
            if isinstance(result, DeadLetter):
                metrics.dead_letter(source_of[record.topic], result.error_class)
                dead = DeadLetter(redact_emails(result.payload), result.error_class, result.error_message,
                                  record.topic, record.partition, record.offset)
                log.warning("dead letter %s[%s]@%s: %s", record.topic, record.partition, record.offset,
                            result.error_message)
                sends.add(dead_name, record.key, value=dead.payload, headers=dead.headers())
                continue
            key = routing_key(customer_id=result.customer_id, loyalty_id=result.loyalty_id,
                              email_hash=result.email_hash, anonymous_id=result.anonymous_id)
            assert key is not None  # decode refuses events without an identifier
            sends.add(events_name, key.encode(), value=codecs.encode_event(result))
        await sends.flush()

    markers_in = Completion()
    busy_since_marker: set[int] = set()  # partitions that sent commands since their last round marker

    Write = tuple[PartitionedStore, bytes, int, bytes | None]

    async def deliver(sends: Sends, writes: list[Write]) -> None:
        """Outputs first, state second: the store (and its changelog) never gets ahead of the
        changes it caused, so a crash in between redelivers the input and the changes are sent
        again with the same versions, instead of being lost (tests/integration/test_crash.py)."""
        await sends.flush()
        await asyncio.gather(*[target.put(key, partition, value) for target, key, partition, value in writes])

    async def fire_timers(partition: int, now_ms: int, sends: Sends, writes: list[Write]) -> None:
        """Apply the time-driven transitions of one partition due up to ``now_ms`` (lock held)."""
        for key, due in timers.pop_due(partition, now_ms):
            state = _decode_state(store.get(key, partition))
            if state is None:
                continue  # erased
            if state.definitions != definitions.fingerprint:
                # Left under an older set by a backfill that changed nothing for it (_scan_some): the
                # index holds that backfill's next check, maybe a new segment's before the stored one.
                if state.next_check_at is None or state.next_check_at > due:
                    state.next_check_at = due
            elif state.next_check_at != due:
                continue  # rescheduled since
            result = advance(state, now_ms, definitions.current, config)
            state.definitions = definitions.fingerprint  # advance evaluated every segment of this set
            # Written even when nothing changed: the stored next check must stay the index's, or the
            # next one would be taken for "rescheduled since" and skipped (a swept segment, a check
            # at an instant where nothing changes).
            writes.append((store, key, partition, _encode_state(state)))
            await emit(key, result, sends)
            timers.put(partition, key, state.next_check_at)

    # The profile stage takes customer-events off faust's consumer in batches, skipping faust's
    # per-message dispatch (conductor, channel, stream, Event: ~0.07 ms per record here), with
    # faust's assignment, tables, recovery and commits (pipeline.broker.stream).
    customer_batches = BatchedTopic(app, customer_events)

    @app.agent(customer_events)
    async def fold_profiles(stream: Any) -> None:
        # The window opens at a batch's first record, not when the previous batch is done (faust's
        # take_events): a record waits a tenth of batch_seconds, not up to all of it; batches still
        # grow up to batch_seconds while records keep arriving.
        async for batch in customer_batches.batches(stream, settings.batch_size, settings.batch_seconds,
                                                    settings.batch_seconds * TAKE_LINGER_FRACTION):
            await definitions.ready.wait()  # never evaluate under a set the topic has replaced
            for attempt in itertools.count(1):
                try:
                    async with state_lock:
                        with metrics.time_evaluation():
                            await _fold_batch(batch)
                    break
                except Exception as exc:
                    # Not the input's fault (bad input is a dead letter): a send or store write failed.
                    # The batch is folded again here, from the stored state (written only after its
                    # outputs were acknowledged): left to faust, the agent would restart on the next
                    # batch, and faust 0.15 commits past a failed batch of one record, or past any
                    # before a partition's first commit (docs/reliability.md defect 5): lost events.
                    log.error("profile stage: batch %s failed (attempt %d), folding it again: %r",
                              where(batch), attempt, exc, exc_info=attempt == 1)
                    await asyncio.sleep(min(2.0 ** (attempt - 1), 30.0))

    class Batch:
        """What one batch read and changed: profiles and aliases are read through to the stores
        once and written back once, at the end (one changelog message per changed key)."""

        def __init__(self) -> None:
            # (partition, state, at, op, columns evaluated at ``at`` or None)
            self.profiles: dict[bytes, tuple[int, ProfileState | None, int, str, dict[str, Any] | None]] = {}
            self.aliases: dict[bytes, tuple[int, Alias | None]] = {}
            # Everything the batch sends, flushed by deliver() before its state is written.
            self.sends = Sends(app.producer)
            self.events: dict[bytes, list[dict[str, Any]]] = {}  # folded in this batch, per profile key
            self.rows: dict[bytes, dict[str, Any]] = {}  # the latest profile row per key, sent once
            self.partition = -1  # of the message being handled
            self.received = 0  # its record's timestamp (ms): when it entered customer-events
            self.sent_from: set[int] = set()  # partitions whose messages led to commands

        def profile(self, key: bytes, partition: int) -> ProfileState | None:
            if key in self.profiles:
                return self.profiles[key][1]
            return _decode_state(store.get(key, partition))

        def set_profile(self, key: bytes, partition: int, state: ProfileState | None, at: int, op: str = "",
                        row: dict[str, Any] | None = None) -> None:
            self.profiles[key] = (partition, state, at, op, row)

        def evaluated(self, key: bytes) -> tuple[int, dict[str, Any] | None]:
            """When the profile stepped in this batch was last evaluated, and the columns it had then
            (for ``schedule``: None if the state moved on since)."""
            _, state, at, _, row = self.profiles[key]
            fresh = row is not None and state is not None and row.get("version") == state.version
            return at, row if fresh else None

        def alias(self, key: bytes, partition: int) -> Alias | None:
            if key in self.aliases:
                return self.aliases[key][1]
            value = aliases.get(key, partition)
            return Alias.decode(value) if value else None

        def set_alias(self, key: bytes, partition: int, alias: Alias | None) -> None:
            self.aliases[key] = (partition, alias)

        async def forget(self, key: bytes, partition: int, at: int, op: str) -> None:
            """The profile under ``key`` is gone (``merge`` or ``erase``): tombstones now, in order
            after what was sent for it so far in this batch and before anything that follows."""
            self.set_profile(key, partition, None, at, op)
            self.rows.pop(key, None)  # superseded by the tombstone
            tombstone = [(OP_HEADER, op.encode()), (AT_HEADER, str(at).encode())]
            self.sends.add(profiles_name, key, value=None, headers=tombstone)
            if op == "erase":  # subscribers and ClickHouse forget its changes (after its exits) and events
                folded = self.events.pop(key, None)
                if folded:
                    self.sends.add(folded_name, key, value=codecs.encode_folded(folded))
                self.sends.add(changes_name, key, value=None, headers=tombstone)
                self.sends.add(folded_name, key, value=None, headers=tombstone)

        async def command(self, command: Command, hops: int = 0) -> None:
            self.sent_from.add(self.partition)
            headers = command.headers() + ([(HOPS_HEADER, str(hops).encode())] if hops else [])
            self.sends.add(events_name, command.key.encode(), value=command.encode(),
                           headers=headers)

    async def _fold_batch(batch: Sequence[Any]) -> None:
        b = Batch()
        completed: list[tuple[int, Marker]] = []
        persisted = restore_watermarks({message.partition for message in batch})
        for message in batch:  # faust Messages (pipeline.broker.stream.BatchedTopic)
            key, partition = message.key, message.partition
            headers = _headers(message)
            if headers.get(HEADER) == MARKER:
                marker = Marker.decode(message.value)
                expected = marker.origins if marker.round == 0 else marker.partitions
                scope = (marker.round, partition)
                if markers_in.add(marker.run_id, scope, marker.origin, expected, marker.busy):
                    completed.append((partition, marker))
                continue
            b.partition = partition
            b.received = int(message.timestamp * 1000) if message.timestamp else int(time.time() * 1000)
            handled[partition] = message.offset
            hops = int(headers.get(HOPS_HEADER, b"0") or 0)
            op = headers.get(OP_HEADER)
            if op is None:
                await _on_event(b, key, partition, message.value, hops)
                continue
            command = Command.decode(message.value)
            if op == LINK:
                await _on_link(b, key, partition, command)
            elif op == MERGE:
                await _on_merge(b, key, partition, command, hops)
            elif op == ERASE:
                await _on_erase(b, key, partition, command)
        sends = b.sends
        writes: list[Write] = [(aliases, key, partition, alias.encode() if alias is not None else None)
                               for key, (partition, alias) in b.aliases.items()]
        for key, folded in b.events.items():
            sends.add(folded_name, key, value=codecs.encode_folded(folded))
        for key, (partition, state, _, _, _) in b.profiles.items():
            if state is None:  # absorbed or erased (its tombstones went out when it happened)
                timers.put(partition, key, None)
                writes.append((store, key, partition, None))
                continue
            # Schedule from the instant this profile was last evaluated, then catch up on what
            # fell due while the rest of the batch moved the clock on.
            state.definitions = definitions.fingerprint
            evaluated_at, row = b.evaluated(key)
            schedule(state, evaluated_at, definitions.current, config, row=row)
            await emit(key, advance(state, clock.now_ms(partition), definitions.current, config), sends, b.rows)
            timers.put(partition, key, state.next_check_at)
            writes.append((store, key, partition, _encode_state(state)))
        for key, row in b.rows.items():
            sends.add(profiles_name, key, value=codecs.encode_profile(row))
        for partition in b.sent_from:
            busy_since_marker.add(partition)
        final = [(p, m) for p, m in completed if m.round > 0 and not markers_in.busy(m.run_id, (m.round, p))]
        for partition, marker in final:
            clock.observe(partition, marker.watermark)
            await fire_timers(partition, clock.now_ms(partition), sends, writes)
        writes += [(aliases, WATERMARK_KEY, p, str(clock.now_ms(p)).encode())
                   for p, was in persisted.items() if clock.now_ms(p) > was]
        await deliver(sends, writes)
        # Only after everything before them was sent (see pipeline.control).
        for partition, marker in completed:
            if (partition, marker) in final:
                forwarded = marker.via("")
                for target in (changes_topic, profiles_topic, folded_topic):
                    await (await target.send(key=b"", value=forwarded.encode(), partition=partition,
                                             headers=forwarded.headers()))
                continue
            following = replace(marker, origin=f"profiles:{partition}", round=marker.round + 1,
                                busy=marker.round == 0 or partition in busy_since_marker)
            busy_since_marker.discard(partition)
            await asyncio.gather(*[
                await customer_events.send(key=b"", value=following.encode(), partition=p, headers=following.headers())
                for p in range(following.partitions)])

    def restore_watermarks(partitions: set[int]) -> dict[int, int]:
        """Event clock: take each partition's watermark as last written with the store (the end of
        _fold_batch writes it with the profiles) and return it. A worker restarted after a crash,
        or taking a partition over, reads only what was not committed: a watermark rebuilt from
        that alone can fall short of what the first run saw, and catch_up then applies fewer
        time-driven transitions before a redelivered event than the first time."""
        if clock.mode != "event":
            return {}
        persisted = {}
        for partition in partitions:
            value = aliases.get(WATERMARK_KEY, partition)
            persisted[partition] = int(value) if value else 0
            clock.observe(partition, persisted[partition])
        return persisted

    async def catch_up(b: Batch, key: bytes, partition: int, state: ProfileState | None, now_ms: int) -> int:
        """Apply a profile's time-driven transitions due before it is evaluated at ``now_ms``, each at
        its own instant, and return the instant to evaluate it at. On the event clock, all that fell
        due up to the partition's watermark: a timer tick or the end of an earlier batch may have
        applied those already, and then which side of an event a transition landed on depended on
        batch boundaries and tick timing, so a batch redelivered after a crash (cut into other
        batches) re-sent its changes with shifted versions (test_crash.py under load)."""
        if state is None:
            return now_ms
        if key in b.profiles:
            # Stepped earlier in this batch: its next instant is computed at the end of the batch,
            # but this evaluation needs what time changed in between applied.
            evaluated_at, row = b.evaluated(key)
            schedule(state, evaluated_at, definitions.current, config, row=row)
        horizon = max(now_ms, clock.now_ms(partition)) if clock.mode == "event" else now_ms
        if state.next_check_at is not None and state.next_check_at <= horizon:
            await emit(key, advance(state, horizon, definitions.current, config), b.sends, b.rows)
            b.set_profile(key, partition, state, horizon)  # written even if the event is a duplicate
        return max(now_ms, state.updated_at)

    async def _forward(b: Batch, to: str, value: bytes, headers: list[tuple[str, bytes]], hops: int) -> None:
        b.sent_from.add(b.partition)
        if hops >= MAX_HOPS:
            log.error("identity chain longer than %s hops at %s: dropped to dead letters", MAX_HOPS, to)
            dead = DeadLetter(value, "identity_chain", f"more than {MAX_HOPS} alias hops; last key {to}")
            b.sends.add(dead_name, to.encode(), value=value, headers=dead.headers())
            return
        b.sends.add(events_name, to.encode(), value=value,
                    headers=[*headers, (HOPS_HEADER, str(hops + 1).encode())])

    async def _on_event(b: Batch, key: bytes, partition: int, value: bytes, hops: int) -> None:
        customer_event = codecs.decode_event(value)
        clock.observe(partition, customer_event.occurred_at)
        name = key.decode()
        alias = b.alias(key, partition)
        if erased_before(alias, customer_event.occurred_at):
            log.info("event %s under %s predates the erasure of its customer: dropped", customer_event.event_id, name)
            return
        target = canonical(alias, name)
        if target != name:  # the key was absorbed: its customer lives under another key now
            await _forward(b, target, value, [], hops)
            return
        state = b.profile(key, partition)
        now_ms = clock.evaluation_time(customer_event.occurred_at, state, b.received)
        if customer_event.source == "crm" and customer_event.type == "erasure_request":
            await _erase(b, key, partition, state, identifiers_of(customer_event), now_ms, customer_event.event_id)
            return
        now_ms = await catch_up(b, key, partition, state, now_ms)
        known = {*alias_keys(state), *state.merged_keys} if state is not None else set()
        result = step(state, name, customer_event, now_ms, definitions.current, config,
                      incremental=state is not None and state.definitions == definitions.fingerprint)
        if result.duplicate:
            metrics.duplicate()
            return
        b.set_profile(key, partition, result.state, now_ms, row=result.evaluated)
        await emit(key, result, b.sends, b.rows)
        if settings.store_events:
            b.events.setdefault(key, []).append(customer_event.to_dict())
        for ident in identifiers_of(customer_event):
            if ident != name and ident not in known:  # a new identifier: it is this customer's now
                await b.command(Command("link", ident, to=name, at=now_ms, cause=customer_event.event_id))

    async def _on_link(b: Batch, key: bytes, partition: int, command: Command) -> None:
        own = b.profile(key, partition)
        outcome = on_link(command, b.alias(key, partition), own, max_links=settings.identity_max_links)
        if outcome.conflict or outcome.capped:
            reason = "two CRM customer ids" if outcome.conflict else f"{settings.identity_max_links} links already"
            log.warning("identity link %s -> %s refused: %s", command.key, command.to, reason)
            metrics.identity_conflict()
            return
        if outcome.alias is not None:
            b.set_alias(key, partition, outcome.alias)
        if outcome.absorb and own is not None and outcome.alias is not None:
            metrics.merge()
            now_ms = await catch_up(b, key, partition, own, clock.evaluation_time(command.at, own, b.received))
            released = release(own, now_ms, cause="merge")
            await emit(key, released, b.sends, b.rows)
            await b.forget(key, partition, now_ms, "merge")
            await b.command(Command("merge", outcome.alias.to, source=command.key, state=own.to_dict(), at=now_ms,
                                    cause=command.cause))
        for follow in outcome.send or ():
            await b.command(follow)

    async def _on_merge(b: Batch, key: bytes, partition: int, command: Command, hops: int) -> None:
        name = key.decode()
        alias = b.alias(key, partition)
        absorbed = ProfileState.from_dict(command.state or {"customer_id": command.source})
        if erased_before(alias, absorbed.first_seen_at):
            log.info("merge of %s into %s predates the erasure of %s: dropped", command.source, name, name)
            return
        target = canonical(alias, name)
        if target != name:  # the survivor was itself absorbed meanwhile: follow it
            moved = Command("merge", target, source=command.source, state=command.state, at=command.at,
                            cause=command.cause)
            await _forward(b, target, moved.encode(), moved.headers(), hops)
            return
        state = b.profile(key, partition)
        now_ms = await catch_up(b, key, partition, state, clock.evaluation_time(command.at, state, b.received))
        result = absorb(state, name, absorbed, command.source, now_ms, definitions.current, config)
        if result.duplicate:
            return
        b.set_profile(key, partition, result.state, now_ms, row=result.evaluated)
        await emit(key, result, b.sends, b.rows)

    async def _on_erase(b: Batch, key: bytes, partition: int, command: Command) -> None:
        state = b.profile(key, partition)
        if state is not None and erased_before(Alias("", erased_at=command.at), state.first_seen_at):
            await _erase(b, key, partition, state, [], command.at, command.cause)
        else:  # no profile, or one that began after the erasure: the tombstone, and ClickHouse
            # still forgets what this key held before (memberships of a profile absorbed earlier)
            b.set_alias(key, partition, Alias("", erased_at=command.at))
            if state is None:
                await b.forget(key, partition, command.at, "erase")

    async def _erase(b: Batch, key: bytes, partition: int, state: ProfileState | None, identifiers: list[str],
                     now_ms: int, cause: str) -> None:
        """Forget a customer: exits (cause ``erasure``), the profile, and every key that led to it."""
        name = key.decode()
        linked = set(identifiers)
        if state is not None:
            linked |= {*alias_keys(state), *state.merged_keys}
            await emit(key, release(state, now_ms, cause="erasure"), b.sends, b.rows)
        await b.forget(key, partition, now_ms, "erase")
        b.set_alias(key, partition, Alias("", erased_at=now_ms))
        for other in sorted(linked - {name}):
            await b.command(Command("erase", other, at=now_ms, cause=cause))

    indexed: set[int] = set()
    # Partitions whose profiles are being checked (after an assignment or a new set): the last key
    # checked, None before the first.
    scan_from: dict[int, bytes | None] = {}
    rescan: set[int] = set()  # partitions to check again from the start (a new definition set)
    # The sets in force so far: a profile still marked with one of them is brought up to date by
    # evaluating only what changed since (pipeline.segments.live.backfill).
    history = SetHistory()
    history.add(definitions.current)
    scan_stats: dict[str, float] = {}

    def adopt(new: list[Segment]) -> None:
        definitions.replace(new)
        history.add(definitions.current)
        rescan.update(indexed)  # the next tick checks every profile again
        log.info("segment definitions now: %s (set %s)", ", ".join(s.id for s in new), definitions.fingerprint)

    if live_definitions and not settings.embedded_broker:
        @app.task
        async def follow_definitions() -> None:
            """Live definitions from the compacted topic; ready once read up to our own sentinel."""
            from aiokafka import AIOKafkaConsumer
            from aiokafka import TopicPartition as KafkaPartition

            feed = DefinitionLog()
            consumer = AIOKafkaConsumer(bootstrap_servers=settings.bootstrap_servers, enable_auto_commit=False,
                                        **settings.aiokafka_options())
            await consumer.start()
            try:
                partition = KafkaPartition(definitions_name, 0)
                consumer.assign([partition])
                await consumer.seek_to_beginning(partition)
                sentinel = f"{SENTINEL_PREFIX}{settings.app_id}-{uuid.uuid4().hex}"
                await (await definitions_topic.send(key=sentinel.encode(), value=b"1", partition=0))
                while True:
                    for records in (await consumer.getmany(timeout_ms=1000)).values():
                        for record in records:
                            key = record.key.decode() if record.key else ""
                            if key == sentinel:
                                definitions.ready.set()
                                await definitions_topic.send(key=sentinel.encode(), value=None, partition=0)
                                continue
                            try:
                                new = feed.feed(key, record.value)
                            except (DefinitionError, ValueError) as exc:
                                log.error("segment definitions on %s refused, keeping the current set: %s",
                                          definitions_name, exc)
                                continue
                            if new is not None:
                                adopt(new)
            finally:
                await consumer.stop()
    else:
        definitions.ready.set()

    handled: dict[int, int] = {}  # customer-events partition -> offset of the last message the profile stage took
    backlog: dict[int, tuple[int, float]] = {}  # partition -> (its end when assigned, since): timers wait

    async def hold_timers(assigned: set[int]) -> None:
        """Newly assigned partitions: their timers wait until the profile stage has taken what was
        on the partition when it was assigned (the batch a crash left uncommitted, redelivered):
        a transition that fell due meanwhile then lands after those events, as it did the first
        time, and re-sent changes keep their versions. At most CATCH_UP_SECONDS."""
        topic = customer_events.get_topic_name()
        committed = getattr(app.consumer, "_committed_offset", {})
        start = {TP(topic, p): int(committed.get(TP(topic, p)) or 0) for p in assigned}
        try:
            ends = await fetched_ends(settings.bootstrap_servers, start, timeout=5.0, **settings.aiokafka_options())
        except Exception as exc:  # noqa: BLE001 - no end known: timers run at once, as before
            log.warning("could not read the ends of %s (%s): timers are not held back", topic, exc)
            return
        now = time.monotonic()
        for tp, end in ends.items():
            if end > start[tp] and handled.get(tp.partition, -1) < end - 1:
                backlog[tp.partition] = (end, now)

    def caught_up(partition: int) -> bool:
        if partition not in backlog:
            return True
        end, since = backlog[partition]
        committed = getattr(app.consumer, "_committed_offset", {}).get(TP(customer_events.get_topic_name(), partition))
        if handled.get(partition, -1) >= end - 1 or (committed or 0) >= end:
            del backlog[partition]
            return True
        if time.monotonic() - since > CATCH_UP_SECONDS:
            log.warning("partition %s: the profile stage has not reached offset %s after %.0f s: timers resume",
                        partition, end - 1, CATCH_UP_SECONDS)
            del backlog[partition]
            return True
        return False

    @app.timer(interval=settings.timer_interval_seconds)
    async def tick() -> None:
        """Time-driven transitions: pop what is due from the timer index, never sweep; then
        check the profiles of newly assigned partitions (or all, after a new definition set)."""
        if app.rebalancing or app.in_recovery or not definitions.ready.is_set():
            return
        topic = customer_events.get_topic_name()
        assigned = {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic}
        if assigned - indexed:
            await hold_timers(assigned - indexed)
        async with state_lock:
            for partition in indexed - assigned:
                timers.drop(partition)
                scan_from.pop(partition, None)
            for partition in assigned:
                if partition not in indexed or partition in rescan:
                    if not scan_from:
                        scan_stats.clear()
                        scan_stats.update(started=time.time(), checked=0, backfilled=0, full=0, written=0, changes=0)
                    scan_from[partition] = None
                    rescan.discard(partition)
            indexed.clear()
            indexed.update(assigned)
            await _fire_all(assigned)
        while scan_from:
            async with state_lock:
                # Smaller chunks while events wait (an event waits for one chunk at most), larger ones
                # when none do: each chunk ends waiting ~35 ms for its sends and store writes to be
                # acknowledged, which at 1,000 profiles left the worker at ~0.55 of a core (H4).
                await _scan_some(SCAN_CHUNK if customer_batches.pending() else SCAN_CHUNK_IDLE)
                await _fire_all(indexed)
            await asyncio.sleep(0)  # let the agents in between chunks
        if scan_stats.get("checked"):
            st = scan_stats
            # benchmarks/bench_backfill.py reads this line ("finished at" is the epoch time)
            log.info("profiles checked against definition set %s: %d in %.1f s (%d brought up to date by the "
                     "changed segments, %d in full, %d written, %d changes); finished at %.3f",
                     definitions.fingerprint, st["checked"], time.time() - st["started"], st["backfilled"],
                     st["full"], st["written"], st["changes"], time.time())
            scan_stats.clear()

    async def _fire_all(assigned: set[int]) -> None:
        sends = Sends(app.producer)
        writes: list[Write] = []
        for partition in sorted(assigned):
            if caught_up(partition):
                await fire_timers(partition, clock.now_ms(partition), sends, writes)
        await deliver(sends, writes)

    async def _scan_some(budget: int) -> None:
        """Check up to ``budget`` profiles of the partitions in ``scan_from``: put each in the timer
        index, and bring those evaluated under another definition set up to this one (cause
        ``definition_changed``: a new segment covers every existing profile, a removed one exits its
        members). Only what changed for a profile is sent and written (``backfill``)."""
        sends = Sends(app.producer)
        writes: list[Write] = []
        scan = history.scan(definitions.current, definitions.fingerprint, config)
        event_clock = clock.mode == "event"
        checked = 0
        for partition in list(scan_from):
            if budget <= 0:
                break
            chunk = store.scan(partition, partitions, scan_from[partition], budget)
            budget -= len(chunk)
            if budget > 0:  # fewer than asked: the partition's end
                del scan_from[partition]
            else:
                scan_from[partition] = chunk[-1][0]
            now_ms = clock.now_ms(partition)
            for key, value in chunk:
                if not value:
                    continue  # erased
                checked += 1
                # Reads only what it needs of the stored value (live.Scan: most profiles, for a
                # selective new segment, are decided from a few fields and left as stored).
                found = scan.check(value, now_ms, event_clock=event_clock)
                done = found.done
                if done is not None:
                    scan_stats["full" if done.full else "backfilled"] += 1
                    if done.write:
                        scan_stats["written"] += 1
                        writes.append((store, key, partition, _encode_state(found.state)))
                    if done.result.changes or done.result.row is not None:
                        scan_stats["changes"] += len(done.result.changes)
                        await emit(key, done.result, sends)
                timers.put(partition, key, found.due)
        scan_stats["checked"] = scan_stats.get("checked", 0) + checked
        await deliver(sends, writes)

    sink_markers = Completion()

    async def clickhouse_sink(batch: Sequence[Any]) -> None:
        """Write a batch of output records to ClickHouse; returns once ClickHouse took them all."""
        loop = asyncio.get_running_loop()
        pending = _SinkBatch()
        markers = []
        for message in batch:
            headers = _headers(message)
            if headers.get(HEADER) == MARKER:
                markers.append((message.topic, message.partition, Marker.decode(message.value)))
            elif message.topic == changes_name:
                if message.value is None:  # an erased customer: its changes leave ClickHouse
                    at = int(headers.get(AT_HEADER, b"0") or 0)
                    pending.delete(message.key.decode(), at, CHANGE_TABLES)
                    continue
                change = codecs.decode_change(message.value)
                if change["cause"] == "erasure":
                    continue  # on the topic for subscribers; in ClickHouse the erasure deletes instead
                if pending.deleted(change["customer_id"], CHANGE_TABLES):
                    await _retry(loop, pending.flush())
                pending.changes.append(change)
            elif message.topic == folded_name:
                customer_id = message.key.decode()
                if message.value is None:  # an erased customer: its events leave ClickHouse
                    pending.delete(customer_id, int(headers.get(AT_HEADER, b"0") or 0), EVENT_TABLES)
                    continue
                if pending.deleted(customer_id, EVENT_TABLES):
                    await _retry(loop, pending.flush())
                pending.events.extend(event_row(e, customer_id) for e in codecs.decode_folded(message.value))
            elif message.topic == profiles_name:
                if message.value is None:  # a tombstone: the profile was absorbed or erased
                    at = int(headers.get(AT_HEADER, b"0") or 0)
                    pending.delete(message.key.decode(), at, PROFILE_TABLES)
                    continue
                row = codecs.decode_profile(message.value)
                if pending.deleted(row["customer_id"], PROFILE_TABLES):
                    await _retry(loop, pending.flush())
                pending.rows.append(row)
            else:
                pending.dead.append(_dead_letter_row(message))
        await _retry(loop, pending.flush())
        for topic, partition, marker in markers:
            expected = marker.partitions * (3 + marker.origins)  # changes, profiles, events, dead letters
            if sink_markers.add(marker.run_id, "sink", (topic, partition, marker.origin), expected):
                log.info("run %s: every event processed and flushed", marker.run_id)
                await (await control_topic.send(key=marker.run_id.encode(), value=marker.encode(),
                                                headers=[(HEADER, DONE)]))

    class _SinkBatch:
        """Rows to insert and customers to delete, applied in order: rows that follow a deletion
        of the same customer from the same tables in the batch are written after it. Each table's deletions come
        through the topic that feeds it, so they are ordered with that customer's rows."""

        def __init__(self) -> None:
            self.changes: list[dict[str, Any]] = []
            self.rows: list[dict[str, Any]] = []
            self.dead: list[dict[str, Any]] = []
            self.events: list[list[Any]] = []
            self.deletes: dict[tuple[str, ...], dict[str, int]] = {}

        def delete(self, customer_id: str, at: int, tables: tuple[str, ...]) -> None:
            keys = self.deletes.setdefault(tables, {})
            keys[customer_id] = max(at, keys.get(customer_id, 0))

        def deleted(self, customer_id: str, tables: tuple[str, ...]) -> bool:
            """A deletion of this customer from ``tables`` is pending: its rows for them must wait for
            it. Only the same tables: an absorbed profile's tombstone (customer_profiles) is followed
            by its folded events (events), and flushing for those made one single-key DELETE per
            merge (each ~30 ms, up to ~0.9 s with many parts: a 40,000-event run's writer ended
            50-200 s after the last change; benchmarks/README)."""
            return customer_id in self.deletes.get(tables, {})

        def flush(self) -> Any:
            changes, rows, dead, events, deletes = self.changes, self.rows, self.dead, self.events, self.deletes
            self.changes, self.rows, self.dead, self.events, self.deletes = [], [], [], [], {}

            def write() -> int:
                writer.write(changes=changes, profiles=rows, dead_letters=dead, events=events)
                for tables, keys in deletes.items():
                    writer.delete_customers(sorted(keys), until_ms=max(keys.values()), tables=tables)
                return len(changes) + len(rows) + len(dead) + len(events)
            return write

    def lookup(customer_id: str) -> ProfileState | None:
        """The profile under a key, following its aliases (this worker's partitions only)."""
        key = customer_id.encode()
        for _ in range(MAX_HOPS):
            partition = partition_for_key(key, partitions)
            value = aliases.get(key, partition)
            alias = Alias.decode(value) if value else None
            target = canonical(alias, key.decode())
            if target == key.decode():
                return _decode_state(store.get(key, partition))
            key = target.encode()
        return None

    async def members(segment_id: str, limit: int, after: tuple[int, str] | None) -> list[dict[str, Any]]:
        """One keyset page of a cohort: only that page is read from ClickHouse."""
        since = None if after is None else (datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=after[0]),
                                            after[1])
        client = await asyncio.get_running_loop().run_in_executor(executor, lambda: writer.client)
        return await asyncio.get_running_loop().run_in_executor(
            executor, lambda: cohort(client, settings.clickhouse_database, segment_id, limit=limit, after=since))

    async def sizes() -> dict[str, int]:
        client = await asyncio.get_running_loop().run_in_executor(executor, lambda: writer.client)
        return await asyncio.get_running_loop().run_in_executor(
            executor, segment_sizes, client, settings.clickhouse_database)

    async def dashboard() -> dict[str, Any]:
        client = await asyncio.get_running_loop().run_in_executor(executor, lambda: writer.client)
        return await asyncio.get_running_loop().run_in_executor(
            executor, dashboard_data, client, settings.clickhouse_database)

    def ready() -> bool:
        topic = customer_events.get_topic_name()
        assigned = any(tp.topic == topic for tp in app.assignor.assigned_actives())
        return assigned and not app.rebalancing and not app.in_recovery and all(g.joined() for g in groups)

    def owner(customer_id: str) -> str | None:
        """The API URL of the worker that owns this customer's partition (None: this one, or unknown)."""
        try:
            url = str(app.router.key_store("profiles", customer_id.encode())).rstrip("/")
        except Exception:  # noqa: BLE001 - no assignment yet: answer locally
            return None
        return None if url == settings.advertised_url else url

    backend = WorkerBackend(
        segments=lambda: definitions.current, lookup=lookup,
        now_ms=lambda customer_id: clock.now_ms(partition_for_key(customer_id.encode(), partitions)),
        members=members, sizes=sizes, ready=ready, half_life_days=settings.affinity_half_life_days,
        dashboard=dashboard, owner=owner if settings.http_port else None)

    if settings.http_port:
        @app.task
        async def http_api() -> None:
            token = settings.api_token.get_secret_value() if settings.api_token else None
            runner = await start_api(build_api(backend=backend, metrics=metrics, token=token),
                                     settings.http_host, settings.http_port)
            log.info("HTTP API on %s:%s", settings.http_host, settings.http_port)
            try:
                await asyncio.Event().wait()  # until the worker stops (the task is cancelled)
            finally:
                await stop_api(runner)

    async def _retry(loop: asyncio.AbstractEventLoop, write: Any) -> None:
        delay = 0.5
        while True:  # retry until ClickHouse takes the batch: the batch is acked only after
            try:
                started = time.perf_counter()
                rows = await loop.run_in_executor(executor, write)
                metrics.sink_batch(time.perf_counter() - started, rows or 0)
                return
            except Exception as exc:  # noqa: BLE001 - any failure: back off and retry
                if app.should_stop:
                    # Stopping: leave the batch unacknowledged (it is consumed again after a restart)
                    # rather than hold the shutdown hostage to an unreachable ClickHouse.
                    log.error("ClickHouse insert failed (%s) while stopping: the batch will be redelivered", exc)
                    raise asyncio.CancelledError() from None
                log.error("ClickHouse insert failed (%s); retrying in %.1f s", exc, delay)
                await loop.run_in_executor(executor, writer.reset)
                for _ in range(int(delay * 10)):  # sleep, but notice a shutdown within 0.1 s
                    if app.should_stop:
                        break
                    await asyncio.sleep(0.1)
                delay = min(delay * 2, 30.0)

    # The stateless stages read whole batches outside faust's per-message dispatch (see
    # pipeline.broker.batches); each has its own consumer group and commits after its handler.
    groups = [
        BatchConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=f"{settings.app_id}-ingest",
                      topics=[settings.topic(n) for n in t.INPUTS], max_records=settings.batch_size,
                      max_wait_s=settings.batch_seconds, options=settings.aiokafka_options(),
                      on_batch=metrics.stage_batch_counter("ingest")),
        BatchConsumer(bootstrap_servers=settings.bootstrap_servers, group_id=f"{settings.app_id}-clickhouse",
                      topics=[changes_name, profiles_name, dead_name, folded_name],
                      max_records=settings.sink_batch_size, max_wait_s=settings.sink_batch_seconds, fill=True,
                      options=settings.aiokafka_options(), on_batch=metrics.stage_batch_counter("clickhouse")),
    ]
    stage_lags.extend(group.lag for group in groups)

    @app.task
    async def ingest_stage() -> None:
        await groups[0].run(ingest)

    @app.task
    async def clickhouse_stage() -> None:
        await groups[1].run(clickhouse_sink)

    @app.on_before_shutdown.connect  # type: ignore[arg-type]  # mode's stub misses async receivers
    async def drain_stages(sender: Any, **kwargs: Any) -> None:
        """On stop (faust has drained the profile stage by now): finish the batches in hand,
        write what is fetched, commit, leave the groups — while the producer still runs."""
        for group in groups:
            await group.stop()

    return app


# Profiles a definition scan (a new segment's backfill, a new assignment) checks per hold of the
# state lock: while events wait for the profile stage, and while none do.
SCAN_CHUNK = 1000
SCAN_CHUNK_IDLE = 5000


def _headers(message: Any) -> dict[str, bytes]:
    """A consumed message's headers as a dict (faust gives a list of pairs or a mapping)."""
    return dict(message.headers.items() if isinstance(message.headers, dict) else message.headers or ())


def _dead_letter_row(message: Any) -> dict[str, Any]:
    headers = _headers(message)

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
            "received_at": message.timestamp if message.timestamp else int(time.time() * 1000)}  # ms
