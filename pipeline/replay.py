"""`pipeline replay`: push input files through the real pipeline, embedded and one-shot.

It starts the embedded broker and one worker on the event-time clock, publishes the files,
then one control marker into every input partition, and waits until the ClickHouse writer
announces that the markers came through every stage (``pipeline.control``): every event
processed, every time-driven transition up to the latest ``occurred_at`` applied, every
sink flushed. The embedded broker's end offsets are never trusted (DESIGN §3).

A replay computes the cohorts of its input alone: the data directory's pipeline state and
embedded ClickHouse are reset first.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console

from pipeline.broker import topics as t
from pipeline.broker.embedded import EmbeddedBroker
from pipeline.codecs import decode_change
from pipeline.control import DONE, MARKER, Marker, control_kind
from pipeline.decode import decode
from pipeline.errors import PipelineError
from pipeline.events import DeadLetter
from pipeline.identity import routing_key
from pipeline.processes import stop_process
from pipeline.settings import Settings, environment_for_child


@dataclass
class ReplaySummary:
    produced: Counter[str] = field(default_factory=Counter)  # per source
    dead_letters: Counter[str] = field(default_factory=Counter)  # per "class: message"
    changes: Counter[str] = field(default_factory=Counter)  # entered / exited
    sizes: dict[str, int] = field(default_factory=dict)
    watermark: int = 0
    seconds: float = 0.0


def read_lines(path: Path) -> Iterator[bytes]:
    """The messages of a JSONL file: one JSON object per non-blank line, bytes as they are."""
    if not path.is_file():
        raise PipelineError(f"{path}: no such file")
    if path.suffix.lower() not in (".jsonl", ".json", ".ndjson"):
        raise PipelineError(f"{path}: replay reads JSON Lines files (.jsonl), one event per line")
    with open(path, "rb") as handle:
        for line in handle:
            if line.strip():
                yield line.rstrip(b"\r\n")


def _prepare(sources: Sequence[tuple[str, Path]]) -> tuple[list[tuple[str, bytes | None, bytes]], int]:
    """(source, key, value) per message, keyed by customer so each customer's order is kept, and
    the watermark: the latest occurred_at among the events that decode."""
    messages: list[tuple[str, bytes | None, bytes]] = []
    watermark = 0
    now_ms = int(time.time() * 1000)
    for source, path in sources:
        if source not in t.INPUTS:
            raise PipelineError(f"--source {source}: unknown source; expected one of {', '.join(t.INPUTS)}")
        for value in read_lines(path):
            result = decode(source, value, now_ms=now_ms)
            key = None
            if not isinstance(result, DeadLetter):
                watermark = max(watermark, result.occurred_at)
                ident = routing_key(customer_id=result.customer_id, loyalty_id=result.loyalty_id,
                                    email_hash=result.email_hash, anonymous_id=result.anonymous_id)
                key = ident.encode() if ident else None
            messages.append((source, key, value))
    return messages, watermark


def run_replay(settings: Settings, sources: Sequence[tuple[str, Path]], *, console: Console | None = None,
               timeout: float = 3600.0) -> ReplaySummary:
    from kafka import KafkaProducer

    console = console or Console(stderr=True)
    started = time.monotonic()
    messages, watermark = _prepare(sources)
    data_dir = Path(settings.data_dir)
    for stale in (data_dir / "state", data_dir / "clickhouse"):
        shutil.rmtree(stale, ignore_errors=True)  # a replay's cohorts are those of its input alone
    data_dir.mkdir(parents=True, exist_ok=True)
    summary = ReplaySummary(watermark=watermark)
    run_id = uuid.uuid4().hex
    with EmbeddedBroker(data_dir) as broker:
        worker_settings = settings.model_copy(update={"broker": broker.url, "clock": "event", "clickhouse_url": None,
                                                      "http_port": 0})
        t.ensure_topics([broker.bootstrap], t.product_topics(worker_settings), settings.partitions)
        log_path = data_dir / "worker.log"
        with open(log_path, "ab") as log:
            worker = subprocess.Popen([sys.executable, "-m", "pipeline", "worker"],
                                      env=environment_for_child(worker_settings), stdout=log,
                                      stderr=subprocess.STDOUT, start_new_session=True)
        try:
            producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=20, acks="all")
            stamp = int(time.time() * 1000)
            for source, key, value in messages:
                # Strictly increasing record timestamps: the worker takes each batch across
                # partitions in timestamp order, so the files are handled in the order published.
                stamp = max(stamp + 1, int(time.time() * 1000))
                producer.send(settings.topic(source), key=key, value=value, timestamp_ms=stamp)
                summary.produced[source] += 1
            origins = len(t.INPUTS) * settings.partitions
            marker = Marker(run_id, watermark, origins, settings.partitions)
            for source in t.INPUTS:
                for partition in range(settings.partitions):
                    producer.send(settings.topic(source), value=marker.encode(), partition=partition,
                                  headers=marker.headers())
            producer.flush()
            producer.close()
            console.print(f"replay: {len(messages)} events published; waiting for the pipeline "
                          f"(worker log: {log_path})", highlight=False)
            _wait_done(broker.bootstrap, settings, run_id, worker, log_path, timeout)
            _read_outputs(broker.bootstrap, settings, run_id, origins, summary)
        finally:
            stop_process(worker)
        if worker.returncode not in (0, -15):
            console.print(f"the worker stopped with code {worker.returncode}; see {log_path}", highlight=False)
    summary.sizes = _sizes(settings)
    summary.seconds = time.monotonic() - started
    return summary


def _consumer(bootstrap: str, topic: str, partitions: int) -> object:
    from kafka import KafkaConsumer, TopicPartition

    # Assigned, not subscribed: consumer groups on the embedded broker wait out rebalances (DESIGN §3).
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, consumer_timeout_ms=200)
    consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
    consumer.seek_to_beginning()
    return consumer


def _wait_done(bootstrap: str, settings: Settings, run_id: str, worker: subprocess.Popen[bytes], log_path: Path,
               timeout: float) -> None:
    consumer = _consumer(bootstrap, settings.topic(t.CONTROL), settings.partitions)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for record in consumer:  # type: ignore[attr-defined]
                if control_kind(record.headers) == DONE and Marker.decode(record.value).run_id == run_id:
                    return
            if worker.poll() is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise PipelineError(f"the worker exited with code {worker.returncode} before the replay "
                                    f"finished; end of {log_path}:\n{tail}")
        raise PipelineError(f"the replay did not finish within {timeout:.0f} s; see {log_path}")
    finally:
        consumer.close()  # type: ignore[attr-defined]


def _read_outputs(bootstrap: str, settings: Settings, run_id: str, origins: int, summary: ReplaySummary) -> None:
    """Count the changes and dead letters: read each topic up to this run's markers (all there by now)."""
    partitions = settings.partitions
    for name, expected in ((t.SEGMENT_CHANGES, partitions), (t.DEAD_LETTERS, partitions * origins)):
        consumer = _consumer(bootstrap, settings.topic(name), partitions)
        seen = 0
        deadline = time.monotonic() + 120
        try:
            while seen < expected and time.monotonic() < deadline:
                for record in consumer:  # type: ignore[attr-defined]
                    if control_kind(record.headers) == MARKER:
                        seen += Marker.decode(record.value).run_id == run_id
                    elif name == t.SEGMENT_CHANGES:
                        if record.value is None:
                            continue  # an erased customer's tombstone (its exits came first)
                        summary.changes[decode_change(record.value)["change"]] += 1
                    else:
                        headers = dict(record.headers or ())
                        reason = (headers.get("error_class", b"?").decode(errors="replace") + ": "
                                  + headers.get("error_message", b"").decode(errors="replace"))
                        summary.dead_letters[reason] += 1
        finally:
            consumer.close()  # type: ignore[attr-defined]
        if seen < expected:
            raise PipelineError(f"topic {settings.topic(name)} lacks this replay's end markers ({seen}/{expected})")


def _sizes(settings: Settings) -> dict[str, int]:
    from pipeline.cohorts import segment_sizes
    from pipeline.sinks.clickhouse import connect

    dsn = f"chdb://{(Path(settings.data_dir) / 'clickhouse').resolve()}"
    return segment_sizes(connect(dsn, database=settings.clickhouse_database), settings.clickhouse_database)


def summary_json(summary: ReplaySummary) -> str:
    return json.dumps({"produced": dict(summary.produced), "dead_letters": dict(summary.dead_letters),
                       "changes": dict(summary.changes), "sizes": summary.sizes, "watermark": summary.watermark,
                       "seconds": round(summary.seconds, 2)})
