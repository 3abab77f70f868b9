from datetime import UTC, datetime

from pipeline.profile import columns, new_profile
from pipeline.segments.definitions import parse_segments
from pipeline.segments.membership import evaluate

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)

SEGMENTS = parse_segments("""
segments:
  - id: buyers
    where: orders_count >= 1
  - id: marketable_buyers
    where: orders_count >= 1
    requires_consent: marketing
  - id: no_orders
    where: orders_count = 0
""")


def _row(**values):
    row = columns(new_profile("c1"), int(NOW.timestamp() * 1000))
    row.update(values)
    return row


def test_evaluate_is_each_predicate_and_consent():
    for orders in (0, 2):
        for consent in (None, False, True):
            row = _row(orders_count=orders, consent_marketing=consent)
            expected = {s.id for s in SEGMENTS
                        if (s.requires_consent is None or consent is True) and s.predicate(row, NOW)}
            assert evaluate(row, SEGMENTS, NOW) == expected
    assert evaluate(_row(orders_count=2, consent_marketing=True), SEGMENTS, NOW) == {"buyers", "marketable_buyers"}


def test_a_segment_list_changed_in_place_is_read_again():
    """evaluate keeps the compiled closures per list: a list changed in place must not answer as before."""
    segments = list(SEGMENTS)
    row = _row(orders_count=0)
    assert evaluate(row, segments, NOW) == {"no_orders"}
    segments[2] = parse_segments("segments:\n  - id: no_orders\n    where: orders_count = 5\n")[0]
    assert evaluate(row, segments, NOW) == set()
    segments.append(parse_segments("segments:\n  - id: anyone\n    where: events_count >= 0\n")[0])
    assert evaluate(row, segments, NOW) == {"anyone"}
    assert evaluate(row, iter(segments), NOW) == {"anyone"}  # any iterable
