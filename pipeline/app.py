"""The composition root: the one place that creates the faust.App, its topics, table and agents.

Agents only move records: read a batch (``take_events``), call the pure core, write the
store once per changed customer per batch (plus one changelog message), send, and let faust
ack the batch after the body ran — offsets are committed only after the sends completed.
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
from typing import Any

import faust
from faust.streams import _current_event

from pipeline import codecs
from pipeline.broker import topics as t
from pipeline.decode import Limits, decode
from pipeline.events import DeadLetter
from pipeline.identity import routing_key
from pipeline.processor import Config, step
from pipeline.profile import ProfileState
from pipeline.segments.definitions import Segment
from pipeline.settings import Settings
from pipeline.sinks.clickhouse import ClickHouseWriter

log = logging.getLogger(__name__)


class _PartitionOf:
    """Stands for an event of a partition: faust's RocksDB store picks the partition's DB
    from the current event, and in a batch the current event is not the key's."""

    def __init__(self, partition: int) -> None:
        self.message = type("M", (), {"partition": partition})()


class Clock:
    def __init__(self, mode: str) -> None:
        self.mode = mode
        self.watermark = 0

    def observe(self, occurred_at: int) -> None:
        self.watermark = max(self.watermark, occurred_at)

    def now_ms(self) -> int:
        return self.watermark if self.mode == "event" else int(time.time() * 1000)


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
    limits = Limits(settings.max_message_bytes, int(settings.max_future_skew_seconds * 1000))
    config = Config(settings.affinity_half_life_days, settings.dedup_window_events)
    raw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
    inputs = app.topic(*(settings.topic(n) for n in t.INPUTS), **raw)
    source_of = {settings.topic(n): n for n in t.INPUTS}
    customer_events = app.topic(settings.topic(t.CUSTOMER_EVENTS), **raw)
    changes_topic = app.topic(settings.topic(t.SEGMENT_CHANGES), **raw)
    profiles_topic = app.topic(settings.topic(t.PROFILE_UPDATES), **raw)
    dead_topic = app.topic(settings.topic(t.DEAD_LETTERS), **raw)
    profiles = app.Table("profiles", partitions=settings.partitions, key_type=bytes, value_type=bytes)
    writer = ClickHouseWriter(settings.clickhouse_dsn, settings.clickhouse_database)
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="clickhouse")

    @app.agent(inputs)
    async def ingest(stream: Any) -> None:
        async for batch in stream.take_events(settings.batch_size, settings.batch_seconds):
            sends = []
            for event in batch:
                message = event.message
                result = decode(source_of[message.topic], message.value, now_ms=int(time.time() * 1000),
                                limits=limits)
                if isinstance(result, DeadLetter):
                    dead = DeadLetter(result.payload, result.error_class, result.error_message,
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

    @app.agent(customer_events)
    async def fold_profiles(stream: Any) -> None:
        async for batch in stream.take_events(settings.batch_size, settings.batch_seconds):
            dirty: dict[bytes, tuple[int, ProfileState]] = {}
            sends = []
            for event in batch:
                key, partition = event.message.key, event.message.partition
                customer_event = codecs.decode_event(event.message.value)
                clock.observe(customer_event.occurred_at)
                if key in dirty:
                    state: ProfileState | None = dirty[key][1]
                else:
                    _current_event.set(weakref.ref(_PartitionOf(partition)))  # type: ignore[arg-type]
                    stored = profiles.data.get(key)
                    state = ProfileState.from_dict(json.loads(stored)) if stored else None
                result = step(state, key.decode(), customer_event, clock.now_ms(), segments, config)
                if result.duplicate:
                    continue
                dirty[key] = (partition, result.state)
                for change in result.changes:
                    sends.append(await changes_topic.send(key=key, value=codecs.encode_change(change.to_dict())))
                if result.row is not None:
                    sends.append(await profiles_topic.send(key=key, value=codecs.encode_profile(result.row)))
            for key, (partition, state) in dirty.items():
                value = json.dumps(state.to_dict(), separators=(",", ":")).encode()
                marker = _PartitionOf(partition)
                _current_event.set(weakref.ref(marker))  # type: ignore[arg-type]
                profiles.data[key] = value
                sends.append(profiles.send_changelog(partition, key, value))
            await asyncio.gather(*sends)

    @app.agent(app.topic(settings.topic(t.SEGMENT_CHANGES), settings.topic(t.PROFILE_UPDATES), **raw))
    async def clickhouse_sink(stream: Any) -> None:
        changes_name = settings.topic(t.SEGMENT_CHANGES)
        loop = asyncio.get_running_loop()
        async for batch in stream.take_events(settings.sink_batch_size, settings.sink_batch_seconds):
            changes = [codecs.decode_change(e.message.value) for e in batch if e.message.topic == changes_name]
            rows = [codecs.decode_profile(e.message.value) for e in batch if e.message.topic != changes_name]
            delay = 0.5
            while True:  # retry until ClickHouse takes the batch: the batch is acked only after
                try:
                    write = functools.partial(writer.write, changes=changes, profiles=rows)
                    await loop.run_in_executor(executor, write)
                    break
                except Exception as exc:  # noqa: BLE001 - any failure: back off and retry
                    log.error("ClickHouse insert failed (%s); retrying in %.1f s", exc, delay)
                    await loop.run_in_executor(executor, writer.reset)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)

    return app
