"""Live segment definitions: applied to a running pipeline through a compacted topic, no restart.

``pipeline segments apply FILE_OR_DIR`` validates the definitions, then publishes one record per
segment to ``segment-definitions`` (key: segment id, value: its definition as JSON), a tombstone
for each segment of the previous set that is gone, and last a manifest (key ``__manifest__``)
naming every id of the new set with a fingerprint of each definition. A worker adopts a set only
when it has read a manifest and the very definitions it names, so a half-read apply is never
used. Every profile remembers the fingerprint of the set it was last evaluated under; after a
change (or a restart that finds profiles evaluated under another set) the worker re-evaluates
them — a new segment is evaluated over every existing profile, an edited one again, a removed
one exits all its members — with cause ``definition_changed``.

Reading "to the end" of the topic is never decided from end offsets (the embedded broker
under-reports them, DESIGN §3): a worker that starts writes a sentinel record with a key of its
own and reads until it sees it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.errors import DefinitionError
from pipeline.segments.definitions import Segment, parse_segments

MANIFEST_KEY = "__manifest__"
SENTINEL_PREFIX = "__sentinel__"


def definition_record(segment: Segment) -> dict[str, Any]:
    return {"id": segment.id, "description": segment.description, "where": segment.where,
            "requires_consent": segment.requires_consent}


def definition_fingerprint(record: dict[str, Any]) -> str:
    text = json.dumps({k: record.get(k) for k in ("id", "where", "requires_consent")}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def set_fingerprint(segments: Sequence[Segment]) -> str:
    """One fingerprint for a set of definitions (order-independent): what a profile was evaluated under."""
    parts = sorted(definition_fingerprint(definition_record(s)) for s in segments)
    return hashlib.sha256(",".join(parts).encode()).hexdigest()[:16]


def compile_records(records: Sequence[dict[str, Any]]) -> list[Segment]:
    """Segments from published records, validated exactly as a YAML file is."""
    text = json.dumps({"segments": [
        {k: v for k, v in r.items() if k in ("id", "description", "where", "requires_consent") and v is not None}
        for r in records]})
    return parse_segments(text, source="<segment-definitions topic>")  # JSON is YAML


@dataclass
class DefinitionLog:
    """Folds the records of the definitions topic; yields a complete set when a manifest is whole."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    manifest: dict[str, str] | None = None  # id -> fingerprint
    adopted: str | None = None  # fingerprint of the set last returned

    def feed(self, key: str, value: bytes | None) -> list[Segment] | None:
        """Take one record; return the new complete set when this record completes one."""
        if key.startswith(SENTINEL_PREFIX):
            return None
        if key == MANIFEST_KEY:
            self.manifest = json.loads(value)["segments"] if value else None
        elif value is None:
            self.records.pop(key, None)
        else:
            self.records[key] = json.loads(value)
        return self._complete()

    def _complete(self) -> list[Segment] | None:
        if self.manifest is None:
            return None
        chosen = []
        for seg_id, fingerprint in sorted(self.manifest.items()):
            record = self.records.get(seg_id)
            if record is None or definition_fingerprint(record) != fingerprint:
                return None  # the manifest is ahead of the definitions read so far
            chosen.append(record)
        segments = compile_records(chosen)
        fingerprint = set_fingerprint(segments)
        if fingerprint == self.adopted:
            return None
        self.adopted = fingerprint
        return segments


def apply_records(segments: Sequence[Segment], current_ids: Sequence[str]) -> list[tuple[str, bytes | None]]:
    """The records that apply ``segments`` over a topic holding ``current_ids``: definitions,
    tombstones for removed ids, then the manifest (always last)."""
    if not segments:
        raise DefinitionError("refusing to apply an empty set of segments (it would exit every member)")
    out: list[tuple[str, bytes | None]] = []
    manifest = {}
    for segment in segments:
        record = definition_record(segment)
        manifest[segment.id] = definition_fingerprint(record)
        out.append((segment.id, json.dumps(record).encode()))
    for gone in sorted(set(current_ids) - set(manifest)):
        out.append((gone, None))
    out.append((MANIFEST_KEY, json.dumps({"segments": manifest}).encode()))
    return out


def publish_definitions(bootstrap: Sequence[str], topic: str, segments: Sequence[Segment], *,
                        timeout: float = 60.0, options: dict[str, Any] | None = None,
                        ) -> tuple[list[str], list[str], list[str]]:
    """Apply ``segments`` on the definitions topic; returns (added, changed, removed) ids."""
    import time
    import uuid

    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.errors import KafkaError

    from pipeline.errors import BrokerError

    try:
        producer = KafkaProducer(bootstrap_servers=list(bootstrap), acks="all", **(options or {}))
        consumer = KafkaConsumer(bootstrap_servers=list(bootstrap), consumer_timeout_ms=500, **(options or {}))
    except KafkaError as exc:
        raise BrokerError(f"cannot reach the broker at {','.join(bootstrap)}: {exc}") from None
    try:
        sentinel = f"{SENTINEL_PREFIX}apply-{uuid.uuid4().hex}"
        producer.send(topic, key=sentinel.encode(), value=b"1", partition=0).get(timeout)
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        consumer.seek_to_beginning(partition)
        log = DefinitionLog()
        deadline = time.monotonic() + timeout
        seen_sentinel = False
        while not seen_sentinel:
            if time.monotonic() > deadline:
                raise BrokerError(f"could not read topic {topic} to its end within {timeout:.0f} s")
            for message in consumer:
                key = message.key.decode() if message.key else ""
                if key == sentinel:
                    seen_sentinel = True
                    break
                log.feed(key, message.value)
        before = {k: definition_fingerprint(r) for k, r in log.records.items()}
        records = apply_records(segments, sorted(before))
        for key, value in records:
            producer.send(topic, key=key.encode(), value=value, partition=0)
        producer.send(topic, key=sentinel.encode(), value=None, partition=0)  # compaction forgets it
        producer.flush(timeout)
    finally:
        producer.close()
        consumer.close()
    after = {s.id: definition_fingerprint(definition_record(s)) for s in segments}
    added = sorted(set(after) - set(before))
    changed = sorted(k for k in set(after) & set(before) if after[k] != before[k])
    removed = sorted(set(before) - set(after))
    return added, changed, removed
