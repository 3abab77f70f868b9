"""Pure parts of `pipeline produce`: CSV rows to JSON records, formats, Avro re-encoding, keys, pacing."""

import io
import json
from pathlib import Path

import fastavro
import pytest

from pipeline import schemas
from pipeline.decode import MAGIC_SINGLE_OBJECT, decode
from pipeline.errors import PipelineError
from pipeline.events import DeadLetter
from pipeline.identity import ANONYMOUS_PREFIX, EMAIL_PREFIX, hash_email
from pipeline.produce import Pacer, bootstrap_of, csv_record, format_of, key_of, prepare, read_avro, read_csv

NOW = 1_900_000_000_000


def test_csv_cells_take_the_types_of_the_schema():
    record = csv_record("pos", {
        "transaction_id": "tx-1", "occurred_at": "1767261600000", "customer_id": " c1 ", "channel": "online",
        "items": '[{"sku": "pan", "category": "cookware", "quantity": 2, "unit_price": 12.5}]',
        "total": "25", "currency": "EUR", "kind": "purchase", "store_id": "", "note": "kept",
    })
    assert record == {"transaction_id": "tx-1", "occurred_at": 1767261600000, "customer_id": " c1 ",
                      "channel": "online", "items": [{"sku": "pan", "category": "cookware", "quantity": 2,
                                                      "unit_price": 12.5}],
                      "total": 25.0, "currency": "EUR", "kind": "purchase", "note": "kept"}


def test_csv_arrays_of_strings_as_json_or_semicolons_and_iso_times_stay_text():
    record = csv_record("surveys", {"response_id": "r1", "survey_id": "s", "occurred_at": "2026-01-01T10:00:00Z",
                                    "customer_id": "c1", "source": "nps", "nps": "9",
                                    "interests": "cooking_classes; hiking;", "motivations": '["price"]',
                                    "answers": '{"why": "fast"}'})
    assert record["interests"] == ["cooking_classes", "hiking"]
    assert record["motivations"] == ["price"]
    assert record["answers"] == {"why": "fast"}
    assert record["occurred_at"] == "2026-01-01T10:00:00Z"
    assert record["nps"] == 9


def test_csv_booleans_and_unconvertible_cells():
    assert csv_record("crm", {"marketing": "Yes"})["marketing"] is True
    assert csv_record("crm", {"marketing": "0"})["marketing"] is False
    assert csv_record("crm", {"marketing": "maybe"})["marketing"] == "maybe"  # the decoder dead-letters it
    assert csv_record("pos", {"total": "12,50"})["total"] == "12,50"


def test_csv_file_decodes_to_the_same_events_as_json(tmp_path: Path):
    rows = [
        {"event_id": "e1", "occurred_at": 1767261600000, "customer_id": "c1", "type": "product_view",
         "category": "cookware", "price": 19.9, "properties": {"ab": "b"}},
        {"event_id": "e2", "occurred_at": 1767261660000, "anonymous_id": "a-9", "type": "page_view"},
    ]
    header = ["event_id", "occurred_at", "customer_id", "anonymous_id", "type", "category", "price", "properties"]
    lines = [",".join(header)]
    for row in rows:
        cells = []
        for name in header:
            value = row.get(name)
            cells.append("" if value is None else json.dumps(value).replace('"', '""').join('""')
                         if isinstance(value, dict) else str(value))
        lines.append(",".join(cells))
    path = tmp_path / "clicks.csv"
    path.write_text("\n".join(lines) + "\n")
    values = list(read_csv(path, "clickstream"))
    assert len(values) == 2
    for value, row in zip(values, rows, strict=True):
        from_csv = decode("clickstream", value, now_ms=NOW)
        from_json = decode("clickstream", json.dumps(row).encode(), now_ms=NOW)
        assert not isinstance(from_csv, DeadLetter), from_csv
        assert from_csv == from_json


def test_csv_without_a_known_column_is_refused(tmp_path: Path):
    path = tmp_path / "x.csv"
    path.write_text("foo,bar\n1,2\n")
    with pytest.raises(PipelineError, match="no column of the header"):
        list(read_csv(path, "pos"))


def test_format_from_extension_or_given():
    assert format_of(Path("a.JSONL")) == "jsonl"
    assert format_of(Path("a.csv")) == "csv"
    assert format_of(Path("a.avro")) == "avro"
    assert format_of(Path("a.txt"), "csv") == "csv"
    with pytest.raises(PipelineError, match="--format"):
        format_of(Path("a.txt"))
    with pytest.raises(PipelineError, match="expected one of"):
        format_of(Path("a.csv"), "xml")


def _container(records, schema) -> bytes:
    buffer = io.BytesIO()
    fastavro.writer(buffer, fastavro.parse_schema(schema), records)
    return buffer.getvalue()


def test_avro_container_is_re_encoded_single_object_with_the_topics_schema(tmp_path: Path):
    raw = schemas.raw_schema("crm")
    records = [{"event_id": "k1", "occurred_at": 1767261600000, "customer_id": "c1", "anonymous_id": None,
                "email": None, "loyalty_id": None, "type": "consent", "traits": {}, "marketing": True,
                "action": None, "campaign_id": None, "ticket_id": None, "topic": None, "sentiment": None}]
    path = tmp_path / "crm.avro"
    path.write_bytes(_container(records, raw))
    values = list(read_avro(path, "crm"))
    assert len(values) == 1 and values[0][:2] == MAGIC_SINGLE_OBJECT
    event = decode("crm", values[0], now_ms=NOW)
    assert event == decode("crm", json.dumps(records[0]).encode(), now_ms=NOW)


def test_avro_file_of_another_topic_is_a_clear_error(tmp_path: Path):
    path = tmp_path / "x.avro"
    path.write_bytes(_container([{"a": 1}], {"type": "record", "name": "X", "fields": [{"name": "a", "type": "int"}]}))
    with pytest.raises(PipelineError, match="cannot read it as an Avro container file of pos"):
        list(read_avro(path, "pos"))
    (tmp_path / "junk.avro").write_bytes(b"not avro at all")
    with pytest.raises(PipelineError, match="junk.avro"):
        list(read_avro(tmp_path / "junk.avro", "pos"))


def test_keys_are_the_routing_keys_of_the_decoded_events():
    def key(record):
        return key_of("clickstream", json.dumps({"event_id": "e", "occurred_at": NOW - 1, "type": "page_view",
                                                 **record}).encode(), now_ms=NOW)

    assert key({"customer_id": "c1", "anonymous_id": "a1"}) == (b"c1", None)
    assert key({"anonymous_id": "a1"}) == ((ANONYMOUS_PREFIX + "a1").encode(), None)
    assert key({"email": " Ann@Example.com"}) == ((EMAIL_PREFIX + hash_email("ann@example.com")).encode(), None)
    missing, dead = key({})
    assert missing is None and dead is not None and dead.error_class == "missing_identifier"


def test_prepare_counts_what_will_be_dead_lettered(tmp_path: Path):
    path = tmp_path / "pos.jsonl"
    good = {"transaction_id": "t1", "occurred_at": 1767261600000, "customer_id": "c1", "total": 3.0}
    path.write_text(json.dumps(good) + "\n\n{oops\n")
    prepared = prepare("pos", path)
    assert [k for k, _ in prepared.messages] == [b"c1", None]
    assert prepared.messages[0][1] == json.dumps(good).encode()  # JSONL lines are sent as they are
    assert sum(prepared.dead_letters.values()) == 1
    assert next(iter(prepared.dead_letters)).startswith("invalid_json")


def test_prepare_refuses_unknown_source_and_missing_file(tmp_path: Path):
    with pytest.raises(PipelineError, match="unknown source"):
        prepare("orders", tmp_path / "x.jsonl")
    with pytest.raises(PipelineError, match="no such file"):
        prepare("pos", tmp_path / "missing.jsonl")


def test_pacer_spaces_messages_at_the_rate():
    clock = [0.0]
    sleeps = []

    def sleep(seconds):
        sleeps.append(seconds)
        clock[0] += seconds

    pacer = Pacer(4.0, clock=lambda: clock[0], sleep=sleep)
    for _ in range(9):
        pacer.wait()
    assert clock[0] == pytest.approx(2.0)  # 9 messages at 4/s: the 9th goes at t = 8 / 4
    unlimited = Pacer(0.0, clock=lambda: 0.0, sleep=sleep)
    before = len(sleeps)
    for _ in range(100):
        unlimited.wait()
    assert len(sleeps) == before


def test_broker_urls():
    assert bootstrap_of("kafka://a:1,b:2") == ["a:1", "b:2"]
    for bad in ("embedded", "a:1", "kafka://a", "kafka://"):
        with pytest.raises(PipelineError):
            bootstrap_of(bad)
