"""A segment definition cannot execute code or inject SQL (issue 8 item 7): the `where` text is
parsed and checked against the profile columns and a closed list of functions; anything else is
refused at validation, with its position, before it can reach the stream or ClickHouse."""

import pytest

from pipeline.errors import DefinitionError
from pipeline.segments.definitions import parse_segments

HOSTILE = [
    "orders_count >= 1; DROP TABLE segments.customer_profiles",
    "orders_count >= 1) OR (1 = 1",
    "orders_count IN (SELECT count() FROM system.tables)",
    "(SELECT 1) = 1",
    "__import__('os').system('rm -rf /') = 0",
    "eval('1') = 1",
    "file('/etc/passwd') != ''",
    "url('http://example.com/x', 'CSV', 'a String') != ''",
    "has(survey_interests, (SELECT name FROM system.users LIMIT 1))",
    "orders_count >= 1 -- ' OR 1=1",
    "customer_id = '' OR sleep(3) = 0",
    "lifetime_value > 0 UNION ALL SELECT 1",
    "system.numbers.number > 0",
    "orders_count.__class__ = 1",
    "{{7*7}} = 49",
    "arrayJoin(segments) = 'x'",
    "orders_count >= 1 SETTINGS readonly = 0",
]


@pytest.mark.parametrize("where", HOSTILE)
def test_hostile_where_is_refused_at_validation(where):
    text = "segments:\n  - id: hostile\n    where: " + repr(where).replace("\\'", "''") + "\n"
    with pytest.raises(DefinitionError) as caught:
        parse_segments(text)
    assert caught.value.line is not None or "YAML" in str(caught.value), str(caught.value)


def test_the_refusal_says_where_and_what():
    text = "segments:\n  - id: sneaky\n    where: orders_count >= 1 AND file('/etc/passwd') != ''\n"
    with pytest.raises(DefinitionError) as caught:
        parse_segments(text, source="s.yaml")
    message = str(caught.value)
    assert "s.yaml" in message and "line 3" in message and "sneaky" in message and "file" in message
