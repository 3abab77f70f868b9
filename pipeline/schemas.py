"""The Avro schemas in ``schemas/``: loading, the field specs JSON input is checked against,
and the typed records that mirror them.

The ``.avsc`` files are the one source of truth: the JSON validator is derived from them, and
``record_mismatches`` checks every typed record against its schema (tests/unit/test_schemas.py
runs it for all of ``record_types()``).
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Literal

import fastavro

SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"

INPUT_SCHEMAS = {"clickstream": "clickstream", "pos": "pos", "crm": "crm", "surveys": "surveys"}
OUTPUT_SCHEMAS = ("segment_change", "profile_update", "dead_letter")



class _NoDefault:
    def __repr__(self) -> str:
        return "<no default>"


_NO_DEFAULT: Any = _NoDefault()


def schemas_dir() -> Path:
    return SCHEMAS_DIR


@cache
def raw_schema(name: str) -> dict[str, Any]:
    """The JSON of ``schemas/<name>.avsc``."""
    return load_raw(schemas_dir() / f"{name}.avsc")


def load_raw(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        data: dict[str, Any] = json.load(handle)
    return data


@cache
def parsed_schema(name: str) -> Any:
    return fastavro.parse_schema(raw_schema(name))


# JSON field specs -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """What JSON input must look like for one field of an input schema."""

    name: str
    kind: str  # string, int, long, double, boolean, timestamp, enum, map, array
    required: bool
    symbols: tuple[str, ...] = ()
    item_kind: str = ""  # array: the item kind, "record" for records (see item_fields)
    nullable: bool = False
    default: Any = field(default=_NO_DEFAULT, compare=False, hash=False)
    item_fields: tuple[FieldSpec, ...] = ()  # array of records: the record's fields

    @property
    def has_default(self) -> bool:
        return self.default is not _NO_DEFAULT


def _kind(avro_type: Any) -> tuple[str, bool, tuple[str, ...], str]:
    """(kind, nullable, enum symbols, array item kind) of an Avro field type."""
    nullable = False
    if isinstance(avro_type, list):
        non_null = [t for t in avro_type if t != "null"]
        nullable = len(non_null) < len(avro_type)
        avro_type = non_null[0]
    if isinstance(avro_type, dict):
        kind = avro_type["type"]
        if avro_type.get("logicalType") == "timestamp-millis":
            return "timestamp", nullable, (), ""
        if kind == "enum":
            return "enum", nullable, tuple(avro_type["symbols"]), ""
        if kind == "array":
            items = avro_type["items"]
            if isinstance(items, dict) and items.get("type") == "record":
                return "array", nullable, (), "record"
            return "array", nullable, (), str(items)
        if kind == "map":
            return "map", nullable, (), str(avro_type["values"])
        return str(kind), nullable, (), ""
    return str(avro_type), nullable, (), ""


def specs_of(record_schema: Mapping[str, Any]) -> tuple[FieldSpec, ...]:
    """The field specs of one record schema (raw JSON form), nested record arrays included."""
    specs = []
    for fld in record_schema["fields"]:
        kind, nullable, symbols, item_kind = _kind(fld["type"])
        item_fields: tuple[FieldSpec, ...] = ()
        if item_kind == "record":
            array = next(t for t in (fld["type"] if isinstance(fld["type"], list) else [fld["type"]]) if t != "null")
            item_fields = specs_of(array["items"])
        default = fld["default"] if "default" in fld else _NO_DEFAULT
        required = "default" not in fld and not nullable
        specs.append(FieldSpec(fld["name"], kind, required, symbols, item_kind, nullable, default, item_fields))
    return tuple(specs)


@cache
def field_specs(name: str) -> tuple[FieldSpec, ...]:
    return specs_of(raw_schema(name))


@cache
def item_specs() -> tuple[FieldSpec, ...]:
    """Fields of a POS line item."""
    return next(s for s in field_specs("pos") if s.name == "items").item_fields


# Typed records ----------------------------------------------------------------------
# One dataclass per record schema, same field names, order, types and defaults
# (timestamp-millis is epoch milliseconds as an int; enums are Literal of their symbols).
# ``asdict(record)`` is what fastavro writes; ``record_mismatches`` checks them.

@dataclass(kw_only=True, slots=True)
class ClickstreamEvent:
    """io.segments.input.ClickstreamEvent (topic clickstream)."""

    event_id: str
    occurred_at: int
    customer_id: str | None = None
    anonymous_id: str | None = None
    email: str | None = None
    loyalty_id: str | None = None
    session_id: str | None = None
    type: str
    url: str | None = None
    product_id: str | None = None
    category: str | None = None
    search_query: str | None = None
    price: float | None = None
    properties: dict[str, str] = field(default_factory=dict)


@dataclass(kw_only=True, slots=True)
class PosItem:
    """io.segments.input.PosItem: one line of a POS transaction."""

    sku: str
    category: str | None = None
    quantity: int = 1
    unit_price: float = 0.0


@dataclass(kw_only=True, slots=True)
class PosTransaction:
    """io.segments.input.PosTransaction (topic pos)."""

    event_id: str | None = None
    transaction_id: str
    occurred_at: int
    customer_id: str | None = None
    anonymous_id: str | None = None
    email: str | None = None
    loyalty_id: str | None = None
    store_id: str | None = None
    channel: Literal["store", "online"] = "store"
    items: list[PosItem] = field(default_factory=list)
    total: float
    currency: str = "EUR"
    kind: Literal["purchase", "refund"] = "purchase"


@dataclass(kw_only=True, slots=True)
class CrmEvent:
    """io.segments.input.CrmEvent (topic crm)."""

    event_id: str
    occurred_at: int
    customer_id: str | None = None
    anonymous_id: str | None = None
    email: str | None = None
    loyalty_id: str | None = None
    type: str
    traits: dict[str, str] = field(default_factory=dict)
    marketing: bool | None = None
    action: str | None = None
    campaign_id: str | None = None
    ticket_id: str | None = None
    topic: str | None = None
    sentiment: float | None = None


@dataclass(kw_only=True, slots=True)
class SurveyResponse:
    """io.segments.input.SurveyResponse (topic surveys)."""

    event_id: str | None = None
    response_id: str
    survey_id: str
    occurred_at: int
    customer_id: str | None = None
    anonymous_id: str | None = None
    email: str | None = None
    loyalty_id: str | None = None
    source: Literal["survey", "nps", "focus_group", "community", "diary"] = "survey"
    nps: int | None = None
    interests: list[str] = field(default_factory=list)
    motivations: list[str] = field(default_factory=list)
    answers: dict[str, str] = field(default_factory=dict)


@dataclass(kw_only=True, slots=True)
class ProfileUpdate:
    """io.segments.output.ProfileUpdate (topic profile-updates)."""

    customer_id: str
    version: int
    updated_at: int
    profile_json: str


INPUT_RECORDS: dict[str, type] = {
    "clickstream": ClickstreamEvent, "pos": PosTransaction, "crm": CrmEvent, "surveys": SurveyResponse,
}


def record_types() -> dict[str, type]:
    """Schema name -> the typed record mirroring it, for every schema in ``schemas/``.

    Segment changes and dead letters are the records the pipeline already uses
    (``segments.membership.SegmentChange``, ``events.DeadLetter``); imported here lazily.
    """
    from pipeline.events import DeadLetter
    from pipeline.segments.membership import SegmentChange

    return {**{INPUT_SCHEMAS[k]: v for k, v in INPUT_RECORDS.items()}, "segment_change": SegmentChange,
            "profile_update": ProfileUpdate, "dead_letter": DeadLetter}


_PRIMITIVES: dict[str, Any] = {"string": str, "int": int, "long": int, "double": float, "float": float,
                               "boolean": bool, "bytes": bytes}


def _avro_type_matches(avro_type: Any, hint: Any, where: str, out: list[str]) -> None:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if isinstance(avro_type, list):  # union: only ["null", X] is used
        non_null = [t for t in avro_type if t != "null"]
        if len(non_null) != 1:
            out.append(f"{where}: only unions of null and one type are mirrored, got {avro_type}")
            return
        if "null" in avro_type:
            if origin not in (typing.Union, types.UnionType) or type(None) not in args:
                out.append(f"{where}: the schema allows null, the record type {hint} does not")
                return
            rest = [a for a in args if a is not type(None)]
            hint = rest[0] if len(rest) == 1 else hint
        _avro_type_matches(non_null[0], hint, where, out)
        return
    if origin in (typing.Union, types.UnionType):
        out.append(f"{where}: the record type {hint} allows null, the schema type {avro_type} does not")
        return
    if isinstance(avro_type, str):
        expected = _PRIMITIVES.get(avro_type)
        if expected is None or hint is not expected:
            out.append(f"{where}: schema type {avro_type} is not mirrored by {hint}")
        return
    kind = avro_type["type"]
    if avro_type.get("logicalType") == "timestamp-millis":
        if hint is not int:
            out.append(f"{where}: timestamp-millis must be an int of epoch milliseconds, not {hint}")
    elif kind == "enum":
        if hint is str:
            return
        if origin is not Literal or tuple(args) != tuple(avro_type["symbols"]):
            out.append(f"{where}: enum {avro_type['symbols']} is not mirrored by {hint}")
    elif kind == "array":
        if origin is not list:
            out.append(f"{where}: array is not mirrored by {hint}")
        else:
            _avro_type_matches(avro_type["items"], args[0], f"{where}[]", out)
    elif kind == "map":
        if origin is not dict or args[0] is not str:
            out.append(f"{where}: map is not mirrored by {hint}")
        else:
            _avro_type_matches(avro_type["values"], args[1], f"{where}{{}}", out)
    elif kind == "record":
        if not isinstance(hint, type):
            out.append(f"{where}: record {avro_type['name']} is not mirrored by {hint}")
        else:
            out.extend(_record_mismatches(avro_type, hint, f"{where}."))
    else:
        _avro_type_matches(kind, hint, where, out)


def _record_mismatches(schema: Mapping[str, Any], cls: type, prefix: str) -> list[str]:
    out: list[str] = []
    if not dataclasses.is_dataclass(cls):
        return [f"{prefix}{cls.__name__} is not a dataclass"]
    if cls.__name__ != schema["name"]:
        out.append(f"{prefix}class {cls.__name__} mirrors a record named {schema['name']}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = [f["name"] for f in schema["fields"]]
    for name in sorted(set(names) - set(fields)):
        out.append(f"{prefix}{name}: in the schema, missing from {cls.__name__}")
    for name in sorted(set(fields) - set(names)):
        out.append(f"{prefix}{name}: in {cls.__name__}, not in the schema")
    for fld in schema["fields"]:
        name = fld["name"]
        if name not in fields:
            continue
        where = f"{prefix}{name}"
        _avro_type_matches(fld["type"], hints[name], where, out)
        declared = fields[name]
        if declared.default is not dataclasses.MISSING:
            default: Any = declared.default
        elif declared.default_factory is not dataclasses.MISSING:
            default = declared.default_factory()
        else:
            default = _NO_DEFAULT
        if "default" in fld and default is _NO_DEFAULT:
            out.append(f"{where}: the schema default {fld['default']!r} is missing from {cls.__name__}")
        elif "default" in fld and default != fld["default"]:
            out.append(f"{where}: default {default!r} differs from the schema default {fld['default']!r}")
    return out


def record_mismatches(name: str, cls: type, schema: Mapping[str, Any] | None = None) -> list[str]:
    """How the dataclass ``cls`` differs from schema ``name`` (field names, types, defaults).

    An empty list means the record mirrors the schema. A record may give a default the
    schema does not have (a convenience for building it), never a different one.
    """
    return _record_mismatches(schema if schema is not None else raw_schema(name), cls, "")


def to_avro(record: Any) -> dict[str, Any]:
    """The dict fastavro writes for a typed record."""
    result: dict[str, Any] = dataclasses.asdict(record)
    return result
