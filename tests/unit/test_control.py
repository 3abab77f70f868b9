from pipeline.control import DONE, HEADER, MARKER, Completion, Marker, control_kind
from pipeline.identity import hash_email
from pipeline.privacy import redact_emails


def test_marker_round_trip_and_header():
    marker = Marker("run", 123, 8, 2).via("pos:1")
    assert Marker.decode(marker.encode()) == marker
    assert control_kind(marker.headers()) == MARKER
    assert control_kind([("other", b"x"), (HEADER, DONE)]) == DONE
    assert control_kind({HEADER: MARKER}) == MARKER
    assert control_kind(None) is None and control_kind([("source_topic", b"pos")]) is None


def test_completion_counts_distinct_arrivals_once():
    done = Completion()
    assert not done.add("r", 0, "pos:0", 2)
    assert not done.add("r", 0, "pos:0", 2)  # redelivered
    assert done.add("r", 0, "pos:1", 2)
    assert not done.add("r", 0, "pos:2", 2)  # already complete: True only once
    assert not done.add("r", 1, "pos:0", 2)  # scopes are separate
    assert done.add("other", 0, "pos:0", 1)  # one expected: complete at once


def test_dead_letter_payloads_keep_no_raw_email():
    payload = b'{"email": " Ann.Lee+x@Example.COM ", "bad": tru'
    redacted = redact_emails(payload)
    assert b"Example.COM" not in redacted and b"@" not in redacted
    assert ("sha256:" + hash_email("ann.lee+x@example.com")).encode() in redacted
    assert redact_emails(b"no address here") == b"no address here"
