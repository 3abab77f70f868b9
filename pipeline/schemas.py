"""The Avro schemas in ``schemas/``: loading, and the field specs JSON input is checked against.

The ``.avsc`` files are the one source of truth: the JSON validator is derived from them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import fastavro

SCHEMAS_DIR = Path(__file__).resolve().parent.parent / "schemas"

INPUT_SCHEMAS = {"clickstream": "clickstream", "pos": "pos", "crm": "crm", "surveys": "surveys"}
OUTPUT_SCHEMAS = ("segment_change", "profile_update", "dead_letter")


def schemas_dir() -> Path:
    return SCHEMAS_DIR


@cache
def raw_schema(name: str) -> dict[str, Any]:
    with open(schemas_dir() / f"{name}.avsc", encoding="utf-8") as handle:
        data: dict[str, Any] = json.load(handle)
    return data


@cache
def parsed_schema(name: str) -> Any:
    return fastavro.parse_schema(raw_schema(name))


@dataclass(frozen=True, slots=True)
class FieldSpec:
    """What JSON input must look like for one field of an input schema."""

    name: str
    kind: str  # string, int, long, double, boolean, timestamp, enum, map, array, items
    required: bool
    symbols: tuple[str, ...] = ()
    item_kind: str = ""


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


@cache
def field_specs(name: str) -> tuple[FieldSpec, ...]:
    specs = []
    for fld in raw_schema(name)["fields"]:
        kind, nullable, symbols, item_kind = _kind(fld["type"])
        required = "default" not in fld and not nullable
        specs.append(FieldSpec(fld["name"], kind, required, symbols, item_kind))
    return tuple(specs)


@cache
def item_specs() -> tuple[FieldSpec, ...]:
    """Fields of a POS line item."""
    items_type = next(f for f in raw_schema("pos")["fields"] if f["name"] == "items")["type"]
    specs = []
    for fld in items_type["items"]["fields"]:
        kind, nullable, symbols, item_kind = _kind(fld["type"])
        specs.append(FieldSpec(fld["name"], kind, "default" not in fld and not nullable, symbols, item_kind))
    return tuple(specs)
