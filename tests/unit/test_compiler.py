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


# Fixes found by the differential test against ClickHouse (tests/integration/test_differential.py).

@pytest.mark.parametrize("text, values, now, expected", [
    # NOT LIKE / NOT ILIKE: sqlglot parses them as Like(negate=True); the negation was dropped
    ("loyalty_tier NOT LIKE '%ld'", {"loyalty_tier": "a_b"}, NOW, True),
    ("loyalty_tier NOT ILIKE 'GO%'", {"loyalty_tier": "gold"}, NOW, False),
    # a NaN condition is true in ClickHouse's WHERE (non-zero)
    ("spend_30d / orders_30d", {"spend_30d": 0.0, "orders_30d": 0}, NOW, True),
    # now() is a DateTime in ClickHouse: whole seconds
    ("last_seen_at <= now()", {"last_seen_at": datetime(2026, 1, 1, 0, 0, 0, 400000, tzinfo=UTC)},
     datetime(2026, 1, 1, 0, 0, 0, 900000, tzinfo=UTC), False),
    ("updated_at = now()", {"updated_at": datetime(2026, 1, 1, tzinfo=UTC)},
     datetime(2026, 1, 1, 0, 0, 0, 999000, tzinfo=UTC), True),
    # m[NULL] is NULL (a missing key is 0)
    ("category_affinity[top_category] = 0", {"top_category": None, "category_affinity": {}}, NOW, False),
    ("category_affinity[top_category] = 0", {"top_category": "x", "category_affinity": {}}, NOW, True),
    # has()/mapContains() compare a NULL coming from a column as '' ; a literal NULL matches nothing
    ("has(anonymous_ids, top_category)", {"top_category": None, "anonymous_ids": [""]}, NOW, True),
    ("has(anonymous_ids, top_category)", {"top_category": None, "anonymous_ids": ["a"]}, NOW, False),
    ("has(anonymous_ids, NULL)", {"anonymous_ids": [""]}, NOW, False),
    ("mapContains(category_affinity, top_category)", {"top_category": None, "category_affinity": {"": 1.0}},
     NOW, True),
    # lower()/upper() are ASCII-only in ClickHouse
    ("upper(top_category) = 'É'", {"top_category": "é"}, NOW, False),
    ("lower(top_category) = 'éa'", {"top_category": "éA"}, NOW, True),
    # IN looks floats up by their bits: -0.0 IN (0) is false (while -0.0 = 0 is true)
    ("lifetime_value IN (0, 10.5)", {"lifetime_value": -0.0}, NOW, False),
    ("lifetime_value = 0", {"lifetime_value": -0.0}, NOW, True),
    ("lifetime_value IN (-0.0)", {"lifetime_value": -0.0}, NOW, True),
    # integer modulo keeps the dividend's sign, exactly
    ("orders_30d % 4 = -1", {"orders_30d": -5}, NOW, True),
    ("orders_count % -4 = 1", {"orders_count": 5}, NOW, True),
    # toDateTime('…') is a DateTime: the fraction is dropped
    ("toDateTime('2026-11-23 11:59:59.999') = updated_at",
     {"updated_at": datetime(2026, 11, 23, 11, 59, 59, tzinfo=UTC)}, NOW, True),
    ("last_seen_at < '2026-11-23 11:59:59.5'",
     {"last_seen_at": datetime(2026, 11, 23, 11, 59, 59, 400000, tzinfo=UTC)}, NOW, True),
])
def test_clickhouse_semantics(text, values, now, expected):
    assert compile_where(text)(row(**values), now) is expected


@pytest.mark.parametrize("text, message", [
    # ClickHouse refuses these, so the stream must not accept them
    ("if(orders_count, 1, 0) = 1", "the condition of if() must be true/false"),
    ("least(nps, support_sentiment) < 0", "least() cannot mix an integer (nps) with a floating-point"),
    ("greatest(orders_count, 0.5) > 1", "greatest() cannot mix an integer"),
    ("orders_count = greatest(orders_count, nps)", "greatest() mixes unsigned and signed integers"),
    ("greatest(if(nps > 5, orders_count, NULL), -1) > 0", "greatest() mixes unsigned and signed integers"),
    ("orders_count % orders_30d = 1", "the divisor of % must be a non-zero number constant"),
    ("orders_count % 0 = 1", "the divisor of % must be a non-zero number constant"),
    # ClickHouse truncates a fractional INTERVAL
    ("last_seen_at > now() - INTERVAL 1.5 DAY", "must be a whole number"),
    # spellings ClickHouse reads differently, or ranges it clamps
    ("first_seen_at < '2026-01-01T00:00:00Z'", "is not a date-time"),
    ("first_seen_at < '2026-01-01 00:00:00+02:00'", "is not a date-time"),
    ("last_seen_at > toDateTime('1960-01-01')", "out of range"),
])
def test_rejections_where_clickhouse_differs(text, message):
    with pytest.raises(DefinitionError) as info:
        compile_where(text)
    assert message in str(info.value)


def test_accepted_forms_that_clickhouse_also_accepts():
    for text in ["greatest(nps * 1.0, support_sentiment) < 0", "greatest(lifetime_value, 0.5, 1) > 1",
                 "lifetime_value % 0 > 0", "if(nps > 5, 1, 0) = 1", "last_seen_at > now() - INTERVAL 36 HOUR",
                 "first_seen_at < '2026-01-01'", "orders_count % 3 = 1", "greatest(orders_count, orders_30d) > 1",
                 "greatest(orders_count - 0, nps) > 1", "greatest(coalesce(nps, 0), orders_count) > 1"]:
        compile_where(text)
