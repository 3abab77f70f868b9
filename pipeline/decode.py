"""decode(bytes) -> Event | DeadLetter: never raises, never drops silently.

Encodings, told apart by the first byte:

* ``0x00``: Avro in the Confluent wire format (magic byte 0, 4-byte big-endian schema id,
  then the Avro body). With a Schema Registry the writer schema is fetched by id and
  resolved to the reader schema of ``schemas/``; without one the body must be written with
  the topic's schema in ``schemas/`` (the id is then not looked up).
* ``{`` (after optional white space): JSON with the Avro field names; timestamps as ISO-8601
  strings or epoch milliseconds.
* anything else is dead-lettered as ``unknown_encoding``.
"""

from __future__ import annotations

import io
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import fastavro

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


SchemaLookup = Callable[[int], Any]  # schema id -> parsed writer schema


def decode(source: str, data: bytes, *, now_ms: int, limits: Limits = Limits(),
           registry: SchemaLookup | None = None) -> Event | DeadLetter:
    """Decode and normalize one message of input ``source`` (clickstream, pos, crm, surveys)."""
    try:
        if source not in schemas.INPUT_SCHEMAS:
            raise Invalid("unknown_source", f"no input schema for topic kind {source!r}")
        if data is None or len(data) == 0:
            raise Invalid("empty_message", "the message is empty")
        if len(data) > limits.max_message_bytes:
            raise Invalid("message_too_large",
                          f"the message has {len(data)} bytes, over the limit of {limits.max_message_bytes}")
        record = _parse(source, data, registry)
        return normalize(source, record, now_ms=now_ms, limits=limits)
    except Invalid as exc:
        return DeadLetter(bytes(data or b""), exc.error_class, exc.message)
    except Exception as exc:  # noqa: BLE001 - the decoder must never raise
        return DeadLetter(bytes(data or b""), "decode_error", f"{type(exc).__name__}: {exc}")


def _parse(source: str, data: bytes, registry: SchemaLookup | None) -> dict[str, Any]:
    first = data[0]
    if first == 0:
        return _parse_avro(source, data, registry)
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
        return _check_json(source, record)
    raise Invalid("unknown_encoding",
                  "the message is neither JSON (starts with '{') nor Avro in the wire format (magic byte 0)")


def _parse_avro(source: str, data: bytes, registry: SchemaLookup | None) -> dict[str, Any]:
    if len(data) < 5:
        raise Invalid("invalid_avro", "the Avro message is shorter than its 5-byte header")
    (schema_id,) = struct.unpack(">I", data[1:5])
    reader = schemas.parsed_schema(schemas.INPUT_SCHEMAS[source])
    writer = reader
    if registry is not None:
        try:
            writer = registry(schema_id)
        except LookupError:
            raise Invalid("unknown_schema_id", f"schema id {schema_id} is not in the schema registry") from None
    body = io.BytesIO(data[5:])
    try:
        record = fastavro.schemaless_reader(body, writer, reader)
    except (EOFError, StopIteration, IndexError, struct.error):
        raise Invalid("invalid_avro", "the Avro body is truncated") from None
    except Exception as exc:  # noqa: BLE001 - fastavro raises many kinds
        raise Invalid("invalid_avro", f"the Avro body cannot be read: {type(exc).__name__}: {exc}") from None
    if body.tell() != len(data) - 5:
        raise Invalid("invalid_avro", f"{len(data) - 5 - body.tell()} bytes left over after the Avro record")
    if not isinstance(record, dict):
        raise Invalid("invalid_avro", "the Avro body is not a record")
    return record


_JSON_CHECKS: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "int": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "long": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "double": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v),
    "boolean": lambda v: isinstance(v, bool),
    "timestamp": lambda v: (isinstance(v, (int, str)) and not isinstance(v, bool)),
    "map": lambda v: isinstance(v, dict) and all(isinstance(x, str) for x in v.values()),
}


def _check_fields(specs: tuple[schemas.FieldSpec, ...], record: dict[str, Any], where: str) -> None:
    for spec in specs:
        value = record.get(spec.name)
        if value is None:
            if spec.required:
                raise Invalid("missing_field", f"required field {where}{spec.name!r} is missing")
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
                    _check_fields(schemas.item_specs(), element, f"{spec.name}[{index}].")
                elif not _JSON_CHECKS[spec.item_kind](element):
                    raise Invalid("wrong_type", f"{where}{spec.name}[{index}] must be a {spec.item_kind}")
        elif not _JSON_CHECKS[spec.kind](value):
            raise Invalid("wrong_type", f"field {where}{spec.name!r} must be a {spec.kind}, got {type(value).__name__}")


def _check_json(source: str, record: dict[str, Any]) -> dict[str, Any]:
    _check_fields(schemas.field_specs(schemas.INPUT_SCHEMAS[source]), record, "")
    return record


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


def encode_avro(source: str, record: dict[str, Any], schema_id: int = 0) -> bytes:
    """Encode a record in the wire format read above (used by `produce` and tests)."""
    out = io.BytesIO()
    out.write(b"\x00" + struct.pack(">I", schema_id))
    fastavro.schemaless_writer(out, schemas.parsed_schema(schemas.INPUT_SCHEMAS[source]), record)
    return out.getvalue()
