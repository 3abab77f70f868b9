import json

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.decode import Limits, decode, encode_avro
from pipeline.events import DeadLetter, Event
from pipeline.identity import hash_email

NOW = 1_790_000_000_000  # 2026-09-21


def pos(**extra):
    record = {"transaction_id": "t1", "occurred_at": "2026-09-20T10:00:00Z", "customer_id": " c1 ",
              "total": 42.5, "items": [{"sku": "s1", "category": "cookware", "quantity": 2, "unit_price": 21.25}]}
    record.update(extra)
    return record


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
