"""Output encodings: segment changes and profile updates in Avro (wire format, schema id 0
unless a registry assigns one), and the internal customer-event JSON."""

from __future__ import annotations

import io
import struct
from datetime import datetime
from typing import Any

import fastavro
import orjson

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


# orjson (C) rather than the json module: these run once or twice per event and per changed profile
# (stdlib encode/decode was ~7 % of the worker's samples). Date-times go through _json_default as
# epoch milliseconds, as before, rather than orjson's ISO strings; non-string map keys as strings.
_OPTIONS = orjson.OPT_PASSTHROUGH_DATETIME | orjson.OPT_NON_STR_KEYS


def encode_profile(row: dict[str, Any]) -> bytes:
    return orjson.dumps(row, default=_json_default, option=_OPTIONS)


def decode_profile(data: bytes) -> dict[str, Any]:
    result: dict[str, Any] = orjson.loads(data)
    return result


def encode_event(event: Event) -> bytes:
    return orjson.dumps(event.to_dict(), option=_OPTIONS)


def decode_event(data: bytes) -> Event:
    return Event.from_dict(orjson.loads(data))


def encode_folded(events: list[dict[str, Any]]) -> bytes:
    """The events a batch folded into one profile (``folded-events``: the ClickHouse events table)."""
    return orjson.dumps(events, default=_json_default, option=_OPTIONS)


def decode_folded(data: bytes) -> list[dict[str, Any]]:
    result: list[dict[str, Any]] = orjson.loads(data)
    return result
