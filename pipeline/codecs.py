"""Output encodings: segment changes and profile updates in Avro (wire format, schema id 0
unless a registry assigns one), and the internal customer-event JSON."""

from __future__ import annotations

import io
import json
import struct
from datetime import datetime
from typing import Any

import fastavro

from pipeline import schemas
from pipeline.events import Event


def encode_change(change: dict[str, Any]) -> bytes:
    out = io.BytesIO()
    out.write(b"\x00" + struct.pack(">I", 0))
    fastavro.schemaless_writer(out, schemas.parsed_schema("segment_change"), change)
    return out.getvalue()


def decode_change(data: bytes) -> dict[str, Any]:
    record = fastavro.schemaless_reader(io.BytesIO(data[5:]), schemas.parsed_schema("segment_change"), None)
    assert isinstance(record, dict)
    changed_at = record["changed_at"]
    if isinstance(changed_at, datetime):
        record["changed_at"] = int(changed_at.timestamp() * 1000)
    return record


def _json_default(value: Any) -> Any:
    if isinstance(value, datetime):
        return int(value.timestamp() * 1000)
    raise TypeError(type(value).__name__)


def encode_profile(row: dict[str, Any]) -> bytes:
    return json.dumps(row, default=_json_default, separators=(",", ":")).encode()


def decode_profile(data: bytes) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(data)
    return result


def encode_event(event: Event) -> bytes:
    return json.dumps(event.to_dict(), separators=(",", ":")).encode()


def decode_event(data: bytes) -> Event:
    return Event.from_dict(json.loads(data))
