import json

import pytest

from pipeline.errors import DefinitionError
from pipeline.segments.definitions import parse_segments
from pipeline.segments.live import MANIFEST_KEY, DefinitionLog, apply_records, definition_fingerprint, set_fingerprint

A = parse_segments("segments:\n  - id: a\n    where: orders_count >= 1\n  - id: b\n    where: nps >= 9\n")
B = parse_segments("segments:\n  - id: a\n    where: orders_count >= 2\n")


def test_a_set_is_adopted_only_when_its_manifest_is_whole():
    log = DefinitionLog()
    records = apply_records(A, [])
    assert records[-1][0] == MANIFEST_KEY
    manifest = records[-1]
    assert log.feed(*manifest) is None  # the manifest read before the definitions it names
    adopted = None
    for key, value in records[:-1]:
        adopted = log.feed(key, value) or adopted
    assert [s.id for s in adopted] == ["a", "b"] and set_fingerprint(adopted) == set_fingerprint(A)
    assert log.feed(*manifest) is None  # the same set again: nothing new


def test_an_edit_and_a_removal_make_a_new_set():
    log = DefinitionLog()
    for key, value in apply_records(A, []):
        log.feed(key, value)
    records = apply_records(B, ["a", "b"])
    assert ("b", None) in records
    new = None
    for key, value in records:
        new = log.feed(key, value) or new
    assert [(s.id, s.where) for s in new] == [("a", "orders_count >= 2")]
    assert set_fingerprint(new) != set_fingerprint(A)


def test_a_stale_definition_does_not_complete_a_newer_manifest():
    log = DefinitionLog()
    records = dict(apply_records(B, []))
    log.feed(MANIFEST_KEY, records[MANIFEST_KEY])
    assert log.feed("a", json.dumps({"id": "a", "where": "orders_count >= 1"}).encode()) is None
    assert [s.where for s in log.feed("a", records["a"])] == ["orders_count >= 2"]


def test_bad_definitions_on_the_topic_are_refused_with_a_position():
    log = DefinitionLog()
    bad = {"id": "a", "where": "orders_count >= 'x' AND"}
    log.feed("a", json.dumps(bad).encode())
    with pytest.raises(DefinitionError):
        log.feed(MANIFEST_KEY, json.dumps({"segments": {"a": definition_fingerprint(bad)}}).encode())


def test_an_empty_set_is_refused():
    with pytest.raises(DefinitionError, match="empty"):
        apply_records([], ["a"])
