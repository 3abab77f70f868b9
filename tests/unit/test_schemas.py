"""Item 1: the schemas in schemas/ and the typed records that mirror them."""

import dataclasses
import io
import json
import typing
from datetime import datetime
from typing import Literal

import fastavro
import pytest

from pipeline import schemas
from pipeline.decode import decode, encode_avro, encode_single_object
from pipeline.events import Event

NOW = 1_790_000_000_000
EXPECTED = {"clickstream", "pos", "crm", "surveys", "segment_change", "profile_update", "dead_letter"}


def _fields_without_doc(schema, where=""):
    missing = []
    for fld in schema["fields"]:
        if not str(fld.get("doc", "")).strip():
            missing.append(f"{where}{fld['name']}")
        types = fld["type"] if isinstance(fld["type"], list) else [fld["type"]]
        for t in types:
            if isinstance(t, dict) and t.get("type") == "array":
                t = t["items"]
            if isinstance(t, dict) and t.get("type") == "record":
                missing += _fields_without_doc(t, f"{where}{fld['name']}.")
    return missing


def test_every_schema_is_namespaced_documented_and_loadable():
    names = {p.stem for p in schemas.schemas_dir().glob("*.avsc")}
    assert EXPECTED <= names
    for name in sorted(EXPECTED):
        raw = schemas.raw_schema(name)
        assert raw["type"] == "record" and raw.get("namespace", "").startswith("io.segments."), name
        assert raw.get("doc"), name
        assert _fields_without_doc(raw) == [], name
        assert fastavro.schema.load_schema(schemas.schemas_dir() / f"{name}.avsc")
    inputs = {schemas.raw_schema(n)["namespace"] for n in schemas.INPUT_SCHEMAS.values()}
    outputs = {schemas.raw_schema(n)["namespace"] for n in schemas.OUTPUT_SCHEMAS}
    assert inputs == {"io.segments.input"} and outputs == {"io.segments.output"}


def test_every_schema_has_a_typed_record_that_mirrors_it():
    records = schemas.record_types()
    assert set(records) == EXPECTED
    for name, cls in records.items():
        assert schemas.record_mismatches(name, cls) == [], name


def _variant(**changes):
    """PosTransaction with some fields dropped (None) or given another (type, default)."""
    fields = []
    hints = typing.get_type_hints(schemas.PosTransaction)
    for f in dataclasses.fields(schemas.PosTransaction):
        if f.name in changes:
            if changes[f.name] is None:
                continue
            annotation, default = changes[f.name]
            fields.append((f.name, annotation, dataclasses.field(default=default)))
        else:
            kept = dataclasses.field(default=f.default, default_factory=f.default_factory)
            fields.append((f.name, hints[f.name], kept))
    return dataclasses.make_dataclass("PosTransaction", fields, kw_only=True)


def test_mirror_check_catches_drift():
    def problems(**changes):
        return " | ".join(schemas.record_mismatches("pos", _variant(**changes)))

    assert problems() == ""
    assert "store_id: in the schema, missing" in problems(store_id=None)
    assert "total: schema type double" in problems(total=(int, dataclasses.MISSING))
    assert "currency: default 'USD' differs" in problems(currency=(str, "USD"))
    assert "kind: enum" in problems(kind=(Literal["purchase"], "purchase"))
    assert "customer_id: the schema allows null" in problems(customer_id=(str, ""))
    assert "occurred_at: timestamp-millis" in problems(occurred_at=(datetime, dataclasses.MISSING))
    extra = dataclasses.make_dataclass("PosTransaction", [("surprise", int, 0)], bases=(_variant(),), kw_only=True)
    assert "surprise: in PosTransaction, not in the schema" in " | ".join(schemas.record_mismatches("pos", extra))


def _typed_inputs():
    return {
        "clickstream": schemas.ClickstreamEvent(event_id="e1", occurred_at=NOW - 5_000, anonymous_id="a1",
                                                type="product_view", product_id="p1", category="cookware",
                                                price=19.5, properties={"ab": "b"}),
        "pos": schemas.PosTransaction(transaction_id="t1", occurred_at=NOW - 5_000, customer_id="c1", total=30.0,
                                      channel="online", kind="refund",
                                      items=[schemas.PosItem(sku="s1", category="books", quantity=2, unit_price=15.0)]),
        "crm": schemas.CrmEvent(event_id="k1", occurred_at=NOW - 5_000, customer_id="c1", type="support_ticket",
                                action="opened", ticket_id="x", sentiment=-0.5),
        "surveys": schemas.SurveyResponse(response_id="r1", survey_id="s", occurred_at=NOW - 5_000, loyalty_id="L1",
                                          source="nps", nps=9, interests=["Hiking"], answers={"q": "a"}),
    }


@pytest.mark.parametrize("source", sorted(schemas.INPUT_SCHEMAS))
def test_typed_record_round_trips_through_fastavro_and_all_encodings(source):
    record = _typed_inputs()[source]
    as_dict = schemas.to_avro(record)
    out = io.BytesIO()
    fastavro.schemaless_writer(out, schemas.parsed_schema(source), as_dict)
    back = fastavro.schemaless_reader(io.BytesIO(out.getvalue()), schemas.parsed_schema(source))
    back["occurred_at"] = int(back["occurred_at"].timestamp() * 1000) if isinstance(back["occurred_at"], datetime) \
        else back["occurred_at"]
    assert back == as_dict
    events = [decode(source, data, now_ms=NOW) for data in (
        encode_avro(source, record), encode_single_object(source, record), json.dumps(as_dict).encode())]
    assert all(isinstance(e, Event) for e in events), events
    assert events[0] == events[1] == events[2]
