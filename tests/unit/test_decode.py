import copy
import json
import shutil

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import schemas
from pipeline.decode import Limits, decode, encode_avro, encode_single_object, read_record, schema_id_of
from pipeline.events import DeadLetter, Event
from pipeline.identity import hash_email
from pipeline.registry import LocalSchemas, canonical_fingerprint

NOW = 1_790_000_000_000  # 2026-09-21


def pos(**extra):
    record = {"transaction_id": "t1", "occurred_at": "2026-09-20T10:00:00Z", "customer_id": " c1 ",
              "total": 42.5, "items": [{"sku": "s1", "category": "cookware", "quantity": 2, "unit_price": 21.25}]}
    record.update(extra)
    return record


def click(**extra):
    record = {"event_id": "e1", "occurred_at": NOW - 60_000, "anonymous_id": "a1", "type": "product_view",
              "category": "cookware", "product_id": "p1", "price": 12.5}
    record.update(extra)
    return record


def v2_clickstream():
    """v2 of the clickstream schema: one added optional field with a default, in the middle
    (resolution is by field name, not position)."""
    raw = copy.deepcopy(schemas.raw_schema("clickstream"))
    at = [f["name"] for f in raw["fields"]].index("session_id") + 1
    raw["fields"].insert(at, {"name": "device", "type": "string", "default": "unknown",
                              "doc": "Kind of device (added in v2)."})
    return raw


def v2_dir(tmp_path, keep_v1=False):
    """A schemas directory whose clickstream schema is v2 (optionally keeping v1 as clickstream.v1.avsc)."""
    target = tmp_path / "schemas-v2"
    shutil.copytree(schemas.schemas_dir(), target)
    if keep_v1:
        shutil.copy(target / "clickstream.avsc", target / "clickstream.v1.avsc")
    (target / "clickstream.avsc").write_text(json.dumps(v2_clickstream(), indent=1))
    return target


def test_json_pos_normalized():
    event = decode("pos", json.dumps(pos(email=" Ann@Example.COM ")).encode(), now_ms=NOW)
    assert isinstance(event, Event)
    assert event.event_id == "t1" and event.customer_id == "c1" and event.type == "purchase"
    assert event.email_hash == hash_email("ann@example.com")
    assert "ann@example.com" not in json.dumps(event.to_dict()).lower()
    assert event.items[0].category == "cookware" and event.total == 42.5


def test_avro_round_trip_equals_json():
    record = pos(occurred_at=1_789_999_000_000)
    record.update({"event_id": None, "anonymous_id": None, "email": None, "loyalty_id": None, "store_id": None,
                   "channel": "online", "currency": "EUR", "kind": "refund"})
    record["items"] = [{"sku": "s1", "category": None, "quantity": 1, "unit_price": 3.0}]
    from_avro = decode("pos", encode_avro("pos", record), now_ms=NOW)
    from_json = decode("pos", json.dumps(record).encode(), now_ms=NOW)
    assert isinstance(from_avro, Event) and from_avro == from_json and from_avro.type == "refund"


def test_dead_letter_reasons():
    cases = {
        b"": "empty_message",
        b"{not json": "invalid_json",
        b'{"a": "\xff"}': "invalid_utf8",
        b"hello": "unknown_encoding",
        json.dumps(pos(total="x")).encode(): "wrong_type",
        json.dumps({k: v for k, v in pos().items() if k != "transaction_id"}).encode(): "missing_field",
        json.dumps(pos(occurred_at="1990-01-01T00:00:00Z")).encode(): "implausible_time",
        json.dumps(pos(occurred_at="2027-01-01T00:00:00Z")).encode(): "implausible_time",
        encode_avro("pos", {**pos(occurred_at=NOW), "items": []})[:-3]: "invalid_avro",
    }
    for data, error_class in cases.items():
        result = decode("pos", data, now_ms=NOW)
        assert isinstance(result, DeadLetter), data
        assert result.error_class == error_class, (data, result)
        assert result.payload == data
    click = {"event_id": "e", "occurred_at": NOW, "anonymous_id": "a", "type": "teleport"}
    assert decode("clickstream", json.dumps(click).encode(), now_ms=NOW).error_class == "unknown_event_type"
    big = decode("pos", b"{" + b" " * 100 + b"}", now_ms=NOW, limits=Limits(max_message_bytes=50))
    assert big.error_class == "message_too_large"


@settings(max_examples=300, deadline=None)
@given(source=st.sampled_from(["clickstream", "pos", "crm", "surveys"]), data=st.binary(max_size=200))
def test_arbitrary_bytes_never_raise(source, data):
    assert isinstance(decode(source, data, now_ms=NOW), (Event, DeadLetter))


json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3),
                           max_leaves=10)


@settings(max_examples=300, deadline=None)
@given(source=st.sampled_from(["clickstream", "pos", "crm", "surveys"]),
       record=st.dictionaries(st.sampled_from(["event_id", "occurred_at", "customer_id", "type", "total", "items",
                                               "nps", "interests", "transaction_id", "response_id", "survey_id"]),
                              json_values))
def test_arbitrary_json_never_raises(source, record):
    assert isinstance(decode(source, json.dumps(record).encode(), now_ms=NOW), (Event, DeadLetter))


# Encodings without a registry ------------------------------------------------------------


def test_three_encodings_give_the_same_event():
    as_json = decode("clickstream", json.dumps(click()).encode(), now_ms=NOW)
    confluent = encode_avro("clickstream", click())
    single = encode_single_object("clickstream", click())
    assert confluent[:5] == b"\x00\x00\x00\x00\x00" and schema_id_of(confluent) == 0
    assert single[:2] == b"\xc3\x01" and single[2:10] == canonical_fingerprint(schemas.raw_schema("clickstream"))
    assert schema_id_of(single) is None and schema_id_of(b"{}") is None
    assert isinstance(as_json, Event)
    assert decode("clickstream", confluent, now_ms=NOW) == as_json == decode("clickstream", single, now_ms=NOW)


def test_fingerprint_is_the_avro_crc64_of_the_canonical_form():
    # Avro spec test vector: CRC-64-AVRO of the canonical form '"int"' is 0x7275d51a3f395c8f
    assert canonical_fingerprint("int") == (0x7275D51A3F395C8F).to_bytes(8, "little")


def test_registry_ids_without_a_registry_are_refused():
    dead = decode("clickstream", encode_avro("clickstream", click(), 17), now_ms=NOW)
    assert isinstance(dead, DeadLetter) and dead.error_class == "unknown_schema_id"
    assert "schema id 17" in dead.error_message and "PIPELINE_SCHEMA_REGISTRY_URL" in dead.error_message
    foreign = encode_single_object("clickstream", click(), schema=v2_clickstream())
    dead = decode("clickstream", foreign, now_ms=NOW)
    assert dead.error_class == "unknown_schema_fingerprint" and foreign[2:10].hex() in dead.error_message
    assert decode("clickstream", b"\xc3\x01\x00", now_ms=NOW).error_class == "invalid_avro"


def test_json_takes_defaults_and_ignores_unknown_fields():
    record = read_record("pos", json.dumps({**pos(), "loyalty_points": 3}).encode())
    assert record["channel"] == "store" and record["currency"] == "EUR" and record["kind"] == "purchase"
    assert "loyalty_points" in record and record["items"][0]["sku"] == "s1"
    assert read_record("pos", json.dumps(pos(channel=None)).encode())["channel"] == "store"
    assert read_record("pos", json.dumps(pos(customer_id=None)).encode())["customer_id"] is None
    line = read_record("pos", json.dumps(pos(items=[{"sku": "x"}])).encode())["items"][0]
    assert line == {"sku": "x", "category": None, "quantity": 1, "unit_price": 0.0}


# Item 6: schema evolution without a registry ----------------------------------------------


def test_v1_data_read_by_a_v2_worker_without_registry(tmp_path):
    v2_worker = LocalSchemas(v2_dir(tmp_path, keep_v1=True))
    old = encode_single_object("clickstream", click())  # v1 producer
    record = read_record("clickstream", old, resolver=v2_worker)
    assert record["device"] == "unknown" and record["event_id"] == "e1"
    assert decode("clickstream", old, now_ms=NOW, resolver=v2_worker) == decode("clickstream", old, now_ms=NOW)
    as_json = read_record("clickstream", json.dumps(click()).encode(), resolver=v2_worker)
    assert as_json["device"] == "unknown"
    # without v1 kept next to v2 the v1 fingerprint is unknown: a clear dead letter, not a misread
    forgetful = LocalSchemas(v2_dir(tmp_path / "b"))
    dead = decode("clickstream", old, now_ms=NOW, resolver=forgetful)
    assert dead.error_class == "unknown_schema_fingerprint"


def test_v2_data_read_by_a_v1_worker_without_registry():
    newer = encode_single_object("clickstream", {**click(), "device": "tablet"}, schema=v2_clickstream())
    # a v1 worker that was given the v2 writer schema reads it with resolution
    v1_worker = LocalSchemas(writers=[v2_clickstream()])
    record = read_record("clickstream", newer, resolver=v1_worker)
    assert "device" not in record and record["event_id"] == "e1"
    assert decode("clickstream", newer, now_ms=NOW, resolver=v1_worker) == \
        decode("clickstream", json.dumps(click()).encode(), now_ms=NOW)
    # JSON needs nothing: the v1 worker ignores the new field
    v2_json = json.dumps({**click(), "device": "tablet"}).encode()
    assert "device" not in [f["name"] for f in schemas.raw_schema("clickstream")["fields"]]
    assert decode("clickstream", v2_json, now_ms=NOW) == decode("clickstream", json.dumps(click()).encode(),
                                                                now_ms=NOW)
