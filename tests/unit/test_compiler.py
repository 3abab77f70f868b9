from datetime import UTC, datetime

import pytest

from pipeline.errors import DefinitionError
from pipeline.profile import columns, new_profile
from pipeline.segments.compiler import compile_where, date_diff
from pipeline.segments.definitions import load_segments, parse_segments

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)


def row(**values):
    base = columns(new_profile("c1"), int(NOW.timestamp() * 1000))
    base.update(values)
    return base


@pytest.mark.parametrize("text, values, expected", [
    ("orders_count >= 1", {"orders_count": 1}, True),
    ("orders_count >= 1", {"orders_count": 0}, False),
    ("nps <= 6", {"nps": None}, False),
    ("NOT (nps <= 6)", {"nps": None}, False),
    ("nps IS NULL", {"nps": None}, True),
    ("nps IN (9, 10)", {"nps": 9}, True),
    ("NOT (nps IN (9, 10))", {"nps": None}, False),
    ("has(survey_interests, 'cooking')", {"survey_interests": ["cooking"]}, True),
    ("category_affinity['cookware'] >= 0.3", {"category_affinity": {}}, False),
    ("category_affinity['cookware'] >= 0.3", {"category_affinity": {"cookware": 0.5}}, True),
    ("dateDiff('day', last_seen_at, now()) <= 30",
     {"last_seen_at": datetime(2026, 10, 24, 23, 0, tzinfo=UTC)}, True),
    ("dateDiff('day', last_seen_at, now()) <= 30",
     {"last_seen_at": datetime(2026, 10, 23, 23, 0, tzinfo=UTC)}, False),
    ("last_seen_at > now() - INTERVAL 1 DAY", {"last_seen_at": NOW}, True),
    ("spend_30d / orders_30d > 10", {"spend_30d": 50.0, "orders_30d": 0}, True),  # inf, like ClickHouse
    ("if(nps IS NULL, 0, nps) = 0 OR coalesce(nps, 5) = 5", {"nps": None}, True),
    ("loyalty_tier LIKE 'go%'", {"loyalty_tier": "gold"}, True),
    ("orders_count BETWEEN 1 AND 3", {"orders_count": 4}, False),
    ("hasAny(survey_motivations, ['price', 'health'])", {"survey_motivations": ["health"]}, True),
    ("greatest(nps, 3) = 3", {"nps": None}, True),
    ("first_seen_at < '2026-01-01 00:00:00'", {"first_seen_at": datetime(2025, 5, 1, tzinfo=UTC)}, True),
])
def test_semantics(text, values, expected):
    assert compile_where(text)(row(**values), NOW) is expected


def test_date_diff_counts_boundaries():
    a = datetime(2026, 1, 1, 23, 59, tzinfo=UTC)
    b = datetime(2026, 1, 2, 0, 1, tzinfo=UTC)
    assert date_diff("day", a, b) == 1
    assert date_diff("week", datetime(2026, 1, 3, tzinfo=UTC), datetime(2026, 1, 5, tzinfo=UTC)) == 1
    assert date_diff("month", datetime(2026, 1, 31, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC)) == 1


def test_reads_columns_and_now():
    compiled = compile_where("orders_30d >= 1 AND dateDiff('day', last_seen_at, now()) < 3")
    assert compiled.columns == {"orders_30d", "last_seen_at"} and compiled.uses_now


@pytest.mark.parametrize("text, message", [
    ("ordres_count >= 1", "unknown column 'ordres_count'"),
    ("foo(orders_count) = 1", "unknown function foo()"),
    ("customer_id > 3", "cannot compare a string"),
    ("orders_count >= ", "syntax error"),
    ("survey_interests = 'x'", "cannot be compared"),
    ("orders_count IN (SELECT 1)", "not a query"),
])
def test_rejections(text, message):
    with pytest.raises(DefinitionError) as info:
        compile_where(text)
    assert message in str(info.value)


def test_yaml_positions_point_into_the_file():
    text = """segments:
  - id: ok
    where: orders_count >= 1
  - id: bad
    where: >
      orders_count >= 1
      AND nope > 2
"""
    with pytest.raises(DefinitionError) as info:
        parse_segments(text, source="s.yaml")
    error = info.value
    assert (error.segment_id, error.line, error.column) == ("bad", 7, 11)
    assert "s.yaml line 7, column 11 segment 'bad': unknown column 'nope'" in str(error)


def test_yaml_structure_errors():
    with pytest.raises(DefinitionError, match="'id' must be"):
        parse_segments("segments:\n  - id: Bad-Id\n    where: orders_count > 0\n")
    with pytest.raises(DefinitionError, match="duplicate segment id"):
        parse_segments("segments:\n  - {id: a, where: 'orders_count > 0'}\n  - {id: a, where: 'nps > 1'}\n")


def test_builtin_segments_compile():
    ids = [s.id for s in load_segments(None)]
    assert "buyers" in ids and "cooking_class_prospects" in ids
