"""Shared helpers of the fault tests (issue 8: crash, ClickHouse down, poison input).

- ``Worker``: a real ``pipeline worker`` child process on the session's embedded broker that
  can be SIGKILLed and restarted with the same settings and data dir;
- ``faulty_traffic``: deterministic input from ``pipeline.generate`` with duplicates (the same
  message sent twice) and out-of-order events mixed in;
- ``expected``: what an uninterrupted run of that input gives, computed by the pure core
  (decode -> routing_key -> step per customer, in per-customer input order, then advance() up
  to the final watermark) — never hard-coded;
- ``Feeder``: a producer that remembers where each message landed (topic, partition, offset),
  and sends the end markers of ``pipeline.control``;
- ``wait_done`` / ``read_topic``: completion from the writer's ``done`` announcement and the
  markers on the output topics, never from end offsets (the embedded broker under-reports them,
  DESIGN §3); topics are read with assign() + seek_to_beginning(), never consumer groups;
- ``sql``: ClickHouse read through the CLI in a subprocess, after the worker stopped (the
  worker process owns its chDB data dir).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from random import Random
from typing import Any

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from pipeline.broker import topics as t
from pipeline.broker.embedded import free_port
from pipeline.codecs import decode_change
from pipeline.control import DONE, MARKER, Marker, control_kind
from pipeline.decode import Limits, decode
from pipeline.events import DeadLetter
from pipeline.generate import traffic
from pipeline.identity import routing_key
from pipeline.processes import stop_process
from pipeline.processor import Config, advance, schedule, step
from pipeline.profile import ProfileState
from pipeline.segments.definitions import Segment, parse_segments
from pipeline.settings import Settings

DAY_MS = 86_400_000

# Predicates chosen so that event-driven and time-driven transitions both happen over input
# spanning months: windows that orders leave (orders_30d, orders_90d), inactivity measured
# against now(), a decaying affinity, consent, NPS.
SEGMENTS = """segments:
  - id: buyers
    where: orders_count >= 1
  - id: repeat_buyers
    where: orders_count >= 3
  - id: recent_buyers
    where: orders_30d >= 1
  - id: lapsed
    where: orders_count >= 1 AND orders_90d = 0
  - id: inactive_fortnight
    where: dateDiff('day', last_seen_at, now()) >= 14
  - id: cookware_fans
    where: category_affinity['cookware'] >= 0.3
  - id: promoters
    where: nps >= 9
    requires_consent: marketing
"""


@dataclass(frozen=True)
class Input:
    source: str  # clickstream, pos, crm, surveys (unprefixed)
    key: bytes | None
    value: bytes


def faulty_traffic(*, events: int, customers: int, seed: int, start_ms: int, step_ms: int) -> list[Input]:
    """``events`` generated messages, then ~4 % moved 20-400 positions later (out of order: their
    occurred_at is older than their neighbours') and ~3 % sent a second time 1-50 positions later."""
    messages = [Input(m.topic, m.key, m.value)
                for m in islice(traffic(customers=customers, seed=seed, start_ms=start_ms, step_ms=step_ms), events)]
    rng = Random(seed)
    for _ in range(events // 25):
        index = rng.randrange(len(messages) - 1)
        moved = messages.pop(index)
        messages.insert(min(len(messages), index + rng.randint(20, 400)), moved)
    for _ in range(events // 30):
        index = rng.randrange(len(messages))
        messages.insert(min(len(messages), index + rng.randint(1, 50)), messages[index])
    return messages


@dataclass
class Expected:
    states: dict[str, ProfileState]  # per customer key, after advance() to the watermark
    members: set[tuple[str, str]]  # (customer_id, segment_id)
    dead: list[tuple[int, DeadLetter]]  # (index in the input, dead letter)
    good: list[int]  # indexes of the messages that decode
    watermark: int
    duplicates: int = 0
    changes: int = 0  # transitions of the uninterrupted run (for the report, not compared)


def expected(messages: Sequence[Input], segments: Sequence[Segment], *, limits: Limits = Limits(),
             config: Config = Config(), now_ms: int | None = None) -> Expected:
    """The uninterrupted run of ``messages`` by the pure core, each event evaluated at its own
    occurred_at (the event clock: never before the profile's last evaluation)."""
    now_ms = now_ms if now_ms is not None else int(time.time() * 1000)
    states: dict[str, ProfileState] = {}
    result = Expected({}, set(), [], [], 0)
    for index, message in enumerate(messages):
        event = decode(message.source, message.value, now_ms=now_ms, limits=limits)
        if isinstance(event, DeadLetter):
            result.dead.append((index, event))
            continue
        result.good.append(index)
        result.watermark = max(result.watermark, event.occurred_at)
        key = routing_key(customer_id=event.customer_id, loyalty_id=event.loyalty_id,
                          email_hash=event.email_hash, anonymous_id=event.anonymous_id)
        assert key is not None
        state = states.get(key)
        at = max(event.occurred_at, state.updated_at) if state is not None else event.occurred_at
        if state is not None and state.next_check_at is not None and state.next_check_at <= at:
            result.changes += len(advance(state, at, segments, config).changes)
        stepped = step(state, key, event, at, segments, config)
        if stepped.duplicate:
            result.duplicates += 1
            continue
        result.changes += len(stepped.changes)
        schedule(stepped.state, at, segments, config)
        states[key] = stepped.state
    for state in states.values():
        result.changes += len(advance(state, result.watermark, segments, config).changes)
    result.states = states
    result.members = {(s.customer_id, segment) for s in states.values() for segment in s.segments}
    return result


def segments_of(text: str = SEGMENTS) -> list[Segment]:
    return parse_segments(text)


class Worker:
    """A ``pipeline worker`` child process with its own topic prefix, app id and data dir, that can
    be killed (SIGKILL) and started again with exactly the same settings and data dir."""

    def __init__(self, broker: Any, tmp_path: Path, unique: str, segments_yaml: str = SEGMENTS, *,
                 partitions: int = 2, store: str = "memory://", **settings: Any) -> None:
        self.broker = broker
        self.prefix = f"t{unique}-"
        self.partitions = partitions
        self.data_dir = tmp_path / "data"
        self.log_path = tmp_path / "worker.log"
        self.http_port = free_port()
        segments = tmp_path / "segments.yaml"
        segments.write_text(segments_yaml)
        self.env = {**os.environ, "PIPELINE_BROKER": broker.url, "PIPELINE_TOPIC_PREFIX": self.prefix,
                    "PIPELINE_APP_ID": f"app-{unique}", "PIPELINE_DATA_DIR": str(self.data_dir),
                    "PIPELINE_STORE": store, "PIPELINE_PARTITIONS": str(partitions),
                    "PIPELINE_SEGMENTS_PATH": str(segments), "PIPELINE_LOG_LEVEL": "warning",
                    "PIPELINE_CLOCK": "event", "PIPELINE_HTTP_PORT": str(self.http_port),
                    **{f"PIPELINE_{k.upper()}": str(v) for k, v in settings.items()}}
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.kills = 0

    def topic(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def create_topics(self) -> None:
        settings = Settings(topic_prefix=self.prefix, partitions=self.partitions)
        t.ensure_topics([self.broker.bootstrap], t.product_topics(settings), self.partitions)

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        self.starts += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== start {self.starts} at {time.strftime('%H:%M:%S')} =====\n".encode())
            log.flush()
            self.process = subprocess.Popen([sys.executable, "-m", "pipeline", "worker"], env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, nothing is flushed or committed."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)
        self.kills += 1
        with open(self.log_path, "ab") as log:
            log.write(f"\n===== SIGKILL {self.kills} at {time.strftime('%H:%M:%S')} =====\n".encode())

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def log(self, tail: int = 4000) -> str:
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path.exists() else ""

    def __enter__(self) -> Worker:
        self.create_topics()
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@dataclass
class Sent:
    index: int
    topic: str
    partition: int
    offset: int


class Feeder:
    """Produces input messages (acks=all) and remembers where each landed."""

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self.producer = KafkaProducer(bootstrap_servers=worker.broker.bootstrap, linger_ms=5, acks="all",
                                      max_request_size=4_000_000)
        self._futures: list[tuple[int, Any]] = []

    def send(self, messages: Iterable[tuple[int, Input]]) -> None:
        for index, message in messages:
            future = self.producer.send(self.worker.topic(message.source), key=message.key, value=message.value)
            self._futures.append((index, future))

    def flush(self) -> list[Sent]:
        self.producer.flush()
        sent = []
        for index, future in self._futures:
            meta = future.get(timeout=60)
            sent.append(Sent(index, meta.topic, meta.partition, meta.offset))
        return sent

    def send_markers(self, watermark: int) -> str:
        """One end marker into every partition of every input topic, after the data."""
        self.producer.flush()
        run_id = uuid.uuid4().hex
        partitions = self.worker.partitions
        marker = Marker(run_id, watermark, len(t.INPUTS) * partitions, partitions)
        for source in t.INPUTS:
            for partition in range(partitions):
                self.producer.send(self.worker.topic(source), value=marker.encode(), partition=partition,
                                   headers=marker.headers())
        self.producer.flush()
        return run_id

    def close(self) -> None:
        self.producer.close()


def consumer_for(worker: Worker, name: str, *, timeout_ms: int = 500) -> KafkaConsumer:
    """Assigned to every partition of a product topic from the beginning (no consumer group)."""
    topic = worker.topic(name)
    consumer = KafkaConsumer(bootstrap_servers=worker.broker.bootstrap, consumer_timeout_ms=timeout_ms)
    deadline = time.monotonic() + 60
    while not consumer.partitions_for_topic(topic) and time.monotonic() < deadline:
        time.sleep(0.5)
    consumer.assign([TopicPartition(topic, p) for p in range(worker.partitions)])
    consumer.seek_to_beginning()
    return consumer


def wait_done(worker: Worker, run_id: str, *, timeout: float = 300.0) -> None:
    """Until the ClickHouse writer announces on the control topic that everything before the run's
    markers was processed and flushed (pipeline.control); fails if the worker dies meanwhile."""
    consumer = consumer_for(worker, t.CONTROL)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for record in consumer:
                if control_kind(record.headers) == DONE and Marker.decode(record.value).run_id == run_id:
                    return
            assert worker.alive, f"the worker stopped (code {worker.process.returncode if worker.process else None})" \
                                 f":\n{worker.log()}"
        raise AssertionError(f"run {run_id} not done within {timeout:.0f} s; worker log:\n{worker.log()}")
    finally:
        consumer.close()


@dataclass
class Record:
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes] = field(default_factory=dict)


def read_topic(worker: Worker, name: str, run_id: str, *, markers: int, timeout: float = 120.0) -> list[Record]:
    """Every record of a topic before this run's end markers (``markers`` of them: the run is done,
    so they are all there); markers themselves are left out."""
    consumer = consumer_for(worker, name)
    records: list[Record] = []
    seen = 0
    deadline = time.monotonic() + timeout
    try:
        while seen < markers and time.monotonic() < deadline:
            for message in consumer:
                if control_kind(message.headers) == MARKER:
                    seen += Marker.decode(message.value).run_id == run_id
                    continue
                records.append(Record(message.partition, message.offset, message.key, message.value,
                                      dict(message.headers or ())))
    finally:
        consumer.close()
    assert seen >= markers, f"{worker.topic(name)}: {seen} of {markers} end markers"
    return records


def changes_of(records: Sequence[Record]) -> list[dict[str, Any]]:
    return [decode_change(r.value) for r in records if r.value is not None]


def count_records(worker: Worker, name: str) -> int:
    """Records on a topic now (markers excluded), read from the beginning."""
    consumer = consumer_for(worker, name, timeout_ms=300)
    try:
        return sum(control_kind(m.headers) != MARKER for m in consumer)
    finally:
        consumer.close()


def sql(worker: Worker, query: str) -> list[dict[str, Any]]:
    """A read-only query on the worker's embedded ClickHouse, through the CLI (after the worker stopped)."""
    assert not worker.alive, "the worker process owns its chDB data dir: stop it first"
    run = subprocess.run([sys.executable, "-m", "pipeline", "sql", query, "--data-dir", str(worker.data_dir),
                          "--format", "json"], capture_output=True, text=True, timeout=180, env=worker.env)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows: list[dict[str, Any]] = json.loads(run.stdout)
    return rows


def membership(worker: Worker) -> tuple[set[tuple[str, str]], list[dict[str, Any]]]:
    """(members, every change row) from ClickHouse FINAL, in one CLI call each."""
    members = sql(worker, "SELECT customer_id, segment_id, is_member FROM segments.segment_membership FINAL")
    changes = sql(worker, "SELECT customer_id, segment_id, toString(change) AS change, profile_version, "
                          "toUnixTimestamp64Milli(changed_at) AS at, cause FROM segments.segment_changes FINAL")
    return {(r["customer_id"], r["segment_id"]) for r in members if r["is_member"]}, changes


def last_states(changes: Sequence[dict[str, Any]]) -> dict[tuple[str, str], str]:
    """The last change per (customer, segment), in topic order."""
    last: dict[tuple[str, str], str] = {}
    for change in changes:
        last[(change["customer_id"], change["segment_id"])] = change["change"]
    return last


def repeated_states(changes: Sequence[dict[str, Any]]) -> tuple[list[tuple[str, str, list[Any]]], int]:
    """Per (customer, segment), in topic order, after dropping exact redeliveries (a change whose
    (profile_version, change) was already seen): the sequences that show one state twice in a
    row, and how many redeliveries were dropped."""
    by_pair: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for change in changes:
        by_pair.setdefault((change["customer_id"], change["segment_id"]), []).append(
            (change["profile_version"], change["change"]))
    bad, redelivered = [], 0
    for (customer, segment), sequence in by_pair.items():
        seen: set[tuple[int, str]] = set()
        kept: list[tuple[int, str]] = []
        for item in sequence:
            if item in seen:
                redelivered += 1
                continue
            seen.add(item)
            kept.append(item)
        if any(a[1] == b[1] for a, b in zip(kept, kept[1:], strict=False)) or (kept and kept[0][1] != "entered"):
            bad.append((customer, segment, sequence))
    return bad, redelivered
