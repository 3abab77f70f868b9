"""decode(bytes) -> Event | DeadLetter: never raises, never drops silently.

Encodings, told apart by the first bytes (docs/formats.md):

* ``0x00``: Avro in the Confluent wire format (magic byte 0, 4-byte big-endian schema id,
  then the Avro body). Id 0 means "written with the topic's schema in ``schemas/``"; any other
  id is looked up in the Schema Registry (``RegistrySchemas``; without one it is refused).
* ``0xC3 0x01``: Avro single-object encoding (8-byte little-endian CRC-64-AVRO fingerprint of
  the writer schema, then the body); the writer schema is found by fingerprint in ``schemas/``.
* ``{`` (after optional white space): JSON with the Avro field names; timestamps as ISO-8601
  strings or epoch milliseconds; unknown fields are ignored, missing ones take the defaults.
* anything else is dead-lettered as ``unknown_encoding``.

Avro bodies are read with writer-to-reader schema resolution: the reader schema is the
worker's own (``resolver.reader(source)``), so producers and workers may be on different
compatible versions. Schema lookups come from the injected ``resolver``
(``pipeline.registry.SchemaSource``); lookup failures become dead letters too.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import fastavro
from fastavro.read import SchemaResolutionError

from pipeline import schemas
from pipeline.events import (
    CLICKSTREAM_TYPES,
    CRM_TYPES,
    EMAIL_ACTIONS,
    TICKET_ACTIONS,
    DeadLetter,
    Event,
    Item,
)
from pipeline.identity import clean_id, hash_email
from pipeline.registry import SchemaLookupError, SchemaSource, canonical_fingerprint, default_schemas

MAGIC_CONFLUENT = 0
MAGIC_SINGLE_OBJECT = b"\xc3\x01"
LOCAL_SCHEMA_ID = 0  # Confluent framing: "written with the topic's schema in schemas/"


@dataclass(frozen=True, slots=True)
class Limits:
    """What a valid message may be: size and plausible event times."""

    max_message_bytes: int = 1_000_000
    max_future_skew_ms: int = 3_600_000
    min_occurred_at_ms: int = 946_684_800_000  # 2000-01-01


class Invalid(Exception):
    """Internal: a message failed validation; becomes a dead letter."""

    def __init__(self, error_class: str, message: str) -> None:
        super().__init__(message)
        self.error_class = error_class
        self.message = message


def decode(source: str, data: bytes, *, now_ms: int, limits: Limits = Limits(),
           resolver: SchemaSource | None = None) -> Event | DeadLetter:
    """Decode and normalize one message of input ``source`` (clickstream, pos, crm, surveys).

    ``resolver`` gives the reader and writer schemas (default: ``schemas/``, no registry).
    """
    try:
        if source not in schemas.INPUT_SCHEMAS:
            raise Invalid("unknown_source", f"no input schema for topic kind {source!r}")
        if data is None or len(data) == 0:
            raise Invalid("empty_message", "the message is empty")
        if len(data) > limits.max_message_bytes:
            raise Invalid("message_too_large",
                          f"the message has {len(data)} bytes, over the limit of {limits.max_message_bytes}")
        record = read_record(source, data, resolver=resolver)
        return normalize(source, record, now_ms=now_ms, limits=limits)
    except Invalid as exc:
        return DeadLetter(bytes(data or b""), exc.error_class, exc.message)
    except Exception as exc:  # noqa: BLE001 - the decoder must never raise
        return DeadLetter(bytes(data or b""), "decode_error", f"{type(exc).__name__}: {exc}")


def schema_id_of(data: bytes | None) -> int | None:
    """The Confluent schema id of a message in that framing (0: local schema), else None.

    Lets an agent find the ids of a batch and prefetch them off the event loop.
    """
    if data is None or len(data) < 5 or data[0] != MAGIC_CONFLUENT:
        return None
    (schema_id,) = struct.unpack(">I", data[1:5])
    return int(schema_id)


def read_record(source: str, data: bytes, *, resolver: SchemaSource | None = None) -> dict[str, Any]:
    """The message as a record of the worker's reader schema (before normalization).

    Raises ``Invalid`` (with ``error_class`` and ``message``) when it cannot be read.
    """
    if not data:
        raise Invalid("empty_message", "the message is empty")
    resolver = resolver if resolver is not None else default_schemas()
    try:
        reader = resolver.reader(source)
    except SchemaLookupError as exc:
        raise Invalid(exc.error_class, exc.message) from None
    first = data[0]
    if first == MAGIC_CONFLUENT:
        if len(data) < 5:
            raise Invalid("invalid_avro", "the Avro message is shorter than its 5-byte header")
        (schema_id,) = struct.unpack(">I", data[1:5])
        if schema_id == LOCAL_SCHEMA_ID:
            return _read_avro(data, 5, reader.parsed, reader.parsed, reader.name, "schema id 0")
        try:
            writer = resolver.writer_by_id(schema_id)
        except SchemaLookupError as exc:
            raise Invalid(exc.error_class, exc.message) from None
        return _read_avro(data, 5, writer, reader.parsed, reader.name, f"schema id {schema_id}")
    if data[:2] == MAGIC_SINGLE_OBJECT:
        if len(data) < 10:
            raise Invalid("invalid_avro", "the single-object Avro message is shorter than its 10-byte header")
        try:
            writer = resolver.writer_by_fingerprint(bytes(data[2:10]))
        except SchemaLookupError as exc:
            raise Invalid(exc.error_class, exc.message) from None
        return _read_avro(data, 10, writer, reader.parsed, reader.name, f"fingerprint {bytes(data[2:10]).hex()}")
    stripped = data.lstrip()
    if stripped[:1] == b"{":
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise Invalid("invalid_utf8", f"the message is not valid UTF-8 at byte {exc.start}") from None
        try:
            record = json.loads(text)
        except json.JSONDecodeError as exc:
            raise Invalid("invalid_json", f"invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None
        if not isinstance(record, dict):
            raise Invalid("invalid_json", "the JSON message is not an object")
        _check_fields(reader.fields, record, "")
        return record
    raise Invalid("unknown_encoding",
                  "the message is neither JSON (starts with '{') nor Avro in the Confluent wire format "
                  "(magic byte 0) or the single-object encoding (C3 01)")


def _read_avro(data: bytes, offset: int, writer: Any, reader: Any, reader_name: str, written_as: str
               ) -> dict[str, Any]:
    body = io.BytesIO(data[offset:])
    try:
        record = fastavro.schemaless_reader(body, writer, reader if writer is not reader else None)
    except SchemaResolutionError as exc:
        raise Invalid("incompatible_schema",
                      f"the writer schema ({written_as}) cannot be read as {reader_name}: {str(exc)[:200]}") from None
    except (EOFError, StopIteration, IndexError, struct.error):
        raise Invalid("invalid_avro", "the Avro body is truncated") from None
    except Exception as exc:  # noqa: BLE001 - fastavro raises many kinds
        raise Invalid("invalid_avro", f"the Avro body cannot be read: {type(exc).__name__}: {exc}"[:300]) from None
    if body.tell() != len(data) - offset:
        raise Invalid("invalid_avro", f"{len(data) - offset - body.tell()} bytes left over after the Avro record "
                                      f"({written_as}): was it written with another schema?")
    if not isinstance(record, dict):
        raise Invalid("invalid_avro", "the Avro body is not a record")
    return record


_JSON_CHECKS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "long": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "double": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "float": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "boolean": lambda v: isinstance(v, bool),
    "timestamp": lambda v: (isinstance(v, (int, str)) and not isinstance(v, bool)),
    "map": lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
}


def _check_fields(specs: tuple[schemas.FieldSpec, ...], record: dict[str, Any], where: str) -> None:
    """Check a JSON record against the reader's field specs; fill the defaults of missing fields."""
    for spec in specs:
        value = record.get(spec.name)
        if value is None:
            if spec.required:
                raise Invalid("missing_field", f"required field {where}{spec.name!r} is missing")
            if spec.has_default and not (spec.nullable and spec.name in record):
                record[spec.name] = copy.copy(spec.default)
            continue
        if spec.kind == "enum":
            if value not in spec.symbols:
                raise Invalid("invalid_value",
                              f"field {where}{spec.name!r} must be one of {', '.join(spec.symbols)}, got {value!r}")
        elif spec.kind == "array":
            if not isinstance(value, list):
                raise Invalid("wrong_type", f"field {where}{spec.name!r} must be an array")
            for index, element in enumerate(value):
                if spec.item_kind == "record":
                    if not isinstance(element, dict):
                        raise Invalid("wrong_type", f"{where}{spec.name}[{index}] must be an object")
                    _check_fields(spec.item_fields, element, f"{where}{spec.name}[{index}].")
                elif spec.item_kind not in _JSON_CHECKS or not _JSON_CHECKS[spec.item_kind](element):
                    raise Invalid("wrong_type", f"{where}{spec.name}[{index}] must be a {spec.item_kind}")
        elif spec.kind not in _JSON_CHECKS or not _JSON_CHECKS[spec.kind](value):
            raise Invalid("wrong_type", f"field {where}{spec.name!r} must be a {spec.kind}, got {type(value).__name__}")


def parse_time_ms(value: Any) -> int:
    """Epoch milliseconds (UTC) from epoch ms, an ISO-8601 string or a datetime."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return int(value.timestamp() * 1000)
    if isinstance(value, bool):
        raise Invalid("wrong_type", "occurred_at must be a time, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        text = value.strip()
        if text.endswith(("Z", "z")):
            text = text[:-1] + "+00:00"
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            raise Invalid("invalid_time", f"occurred_at {value!r} is not an ISO-8601 time") from None
        if parsed.tzinfo is None:  # naive times are taken as UTC, the documented convention
            parsed = parsed.replace(tzinfo=UTC)
        return int(parsed.timestamp() * 1000)
    raise Invalid("wrong_type", "occurred_at must be an ISO-8601 string or epoch milliseconds")


def _money(value: Any, name: str) -> float:
    number = float(value)
    if not math.isfinite(number) or number < 0:
        raise Invalid("invalid_value", f"{name} must be a finite, non-negative amount, got {value!r}")
    return number


def normalize(source: str, record: dict[str, Any], *, now_ms: int, limits: Limits = Limits()) -> Event:
    """One internal event from a schema-valid record: ids trimmed, email hashed, times in UTC."""
    occurred_at = parse_time_ms(record.get("occurred_at"))
    if occurred_at < limits.min_occurred_at_ms:
        raise Invalid("implausible_time", f"occurred_at {occurred_at} ms is before the earliest accepted time")
    if occurred_at > now_ms + limits.max_future_skew_ms:
        raise Invalid("implausible_time",
                      f"occurred_at is {(occurred_at - now_ms) / 1000:.0f} s in the future, over the allowed skew")
    email = clean_id(record.get("email"))
    event = Event(
        event_id="",
        source=source,
        type="",
        occurred_at=occurred_at,
        customer_id=clean_id(record.get("customer_id")),
        anonymous_id=clean_id(record.get("anonymous_id")),
        email_hash=hash_email(email) if email else None,
        loyalty_id=clean_id(record.get("loyalty_id")),
    )
    if not (event.customer_id or event.anonymous_id or event.email_hash or event.loyalty_id):
        raise Invalid("missing_identifier",
                      "the event carries no identifier (customer_id, anonymous_id, email or loyalty_id)")
    _NORMALIZERS[source](event, record)
    if not event.event_id:
        raise Invalid("missing_field", "required field 'event_id' is missing or empty")
    return event


def _clickstream(event: Event, record: dict[str, Any]) -> None:
    event.event_id = clean_id(record.get("event_id")) or ""
    kind = str(record.get("type", "")).strip()
    if kind not in CLICKSTREAM_TYPES:
        raise Invalid("unknown_event_type", f"unknown clickstream type {kind!r}")
    event.type = kind
    event.session_id = clean_id(record.get("session_id"))
    event.url = record.get("url")
    event.product_id = clean_id(record.get("product_id"))
    event.category = clean_id(record.get("category"))
    event.search_query = record.get("search_query")
    if record.get("price") is not None:
        event.price = _money(record["price"], "price")


def _pos(event: Event, record: dict[str, Any]) -> None:
    transaction_id = clean_id(record.get("transaction_id"))
    event.event_id = clean_id(record.get("event_id")) or transaction_id or ""
    event.type = record.get("kind") or "purchase"
    event.channel = record.get("channel") or "store"
    event.store_id = clean_id(record.get("store_id"))
    event.total = _money(record.get("total"), "total")
    event.currency = (record.get("currency") or "EUR").strip().upper()
    for raw in record.get("items") or ():
        event.items.append(Item(
            sku=str(raw["sku"]).strip(),
            category=clean_id(raw.get("category")),
            quantity=int(raw.get("quantity", 1)),
            unit_price=_money(raw.get("unit_price", 0.0), "unit_price"),
        ))


def _crm(event: Event, record: dict[str, Any]) -> None:
    event.event_id = clean_id(record.get("event_id")) or ""
    kind = str(record.get("type", "")).strip()
    if kind not in CRM_TYPES:
        raise Invalid("unknown_event_type", f"unknown crm type {kind!r}")
    event.type = kind
    event.traits = {k: v for k, v in (record.get("traits") or {}).items() if k != "email"}
    event.marketing = record.get("marketing")
    event.action = clean_id(record.get("action"))
    event.campaign_id = clean_id(record.get("campaign_id"))
    event.ticket_id = clean_id(record.get("ticket_id"))
    event.topic = clean_id(record.get("topic"))
    if kind == "consent" and event.marketing is None:
        raise Invalid("missing_field", "a consent event needs 'marketing' (true or false)")
    if kind == "email" and event.action not in EMAIL_ACTIONS:
        raise Invalid("invalid_value", f"email action must be one of {', '.join(sorted(EMAIL_ACTIONS))}")
    if kind == "support_ticket" and event.action not in TICKET_ACTIONS:
        raise Invalid("invalid_value", f"support_ticket action must be one of {', '.join(sorted(TICKET_ACTIONS))}")
    if record.get("sentiment") is not None:
        sentiment = float(record["sentiment"])
        if not -1.0 <= sentiment <= 1.0:
            raise Invalid("invalid_value", f"sentiment must be between -1 and 1, got {sentiment}")
        event.sentiment = sentiment


def _surveys(event: Event, record: dict[str, Any]) -> None:
    response_id = clean_id(record.get("response_id"))
    event.event_id = clean_id(record.get("event_id")) or response_id or ""
    event.type = "survey"
    event.survey_id = clean_id(record.get("survey_id"))
    event.survey_source = record.get("source") or "survey"
    nps = record.get("nps")
    if nps is not None:
        if not 0 <= int(nps) <= 10:
            raise Invalid("invalid_value", f"nps must be between 0 and 10, got {nps}")
        event.nps = int(nps)
    event.interests = sorted({s.strip().lower() for s in record.get("interests") or () if s.strip()})
    event.motivations = sorted({s.strip().lower() for s in record.get("motivations") or () if s.strip()})
    event.answers = dict(record.get("answers") or {})


_NORMALIZERS: dict[str, Callable[[Event, dict[str, Any]], None]] = {
    "clickstream": _clickstream,
    "pos": _pos,
    "crm": _crm,
    "surveys": _surveys,
}


_PARSED_WRITERS: dict[str, Any] = {}


def _writer_schema(source: str, schema: Mapping[str, Any] | None) -> Any:
    if schema is None:
        return schemas.parsed_schema(schemas.INPUT_SCHEMAS[source])
    key = json.dumps(schema, sort_keys=True)
    parsed = _PARSED_WRITERS.get(key)
    if parsed is None:
        parsed = _PARSED_WRITERS[key] = fastavro.parse_schema(dict(schema))
    return parsed


def _as_dict(record: Any) -> dict[str, Any]:
    if dataclasses.is_dataclass(record) and not isinstance(record, type):
        return dataclasses.asdict(record)
    return dict(record)


def encode_avro(source: str, record: Any, schema_id: int = LOCAL_SCHEMA_ID, *,
                schema: Mapping[str, Any] | None = None) -> bytes:
    """Avro in the Confluent wire format: ``00``, ``schema_id`` (4 bytes, big-endian), body.

    ``record`` is a dict or a typed record of ``pipeline.schemas``; ``schema`` the writer
    schema (default: the topic's schema in ``schemas/``, which is what id 0 stands for; with a
    registry, pass the id ``RegistrySchemas.register`` returned for that schema).
    """
    out = io.BytesIO()
    out.write(struct.pack(">bI", MAGIC_CONFLUENT, schema_id))
    fastavro.schemaless_writer(out, _writer_schema(source, schema), _as_dict(record))
    return out.getvalue()


def encode_single_object(source: str, record: Any, *, schema: Mapping[str, Any] | None = None) -> bytes:
    """Avro single-object encoding: ``C3 01``, CRC-64-AVRO fingerprint of the writer schema
    (8 bytes, little-endian), body. Needs no registry: readers find the schema by fingerprint."""
    raw = schema if schema is not None else schemas.raw_schema(schemas.INPUT_SCHEMAS[source])
    out = io.BytesIO()
    out.write(MAGIC_SINGLE_OBJECT + canonical_fingerprint(dict(raw)))
    fastavro.schemaless_writer(out, _writer_schema(source, schema), _as_dict(record))
    return out.getvalue()
