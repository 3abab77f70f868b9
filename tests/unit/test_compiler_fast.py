"""The compiler's fast forms give the answers of its general ones: the epoch-ms form (deadlines.py) against
the datetime form, and the one-call comparisons against the general null-safe closure."""

import math
from datetime import UTC, datetime, timedelta

import pytest
import sqlglot
from hypothesis import example, given, settings
from hypothesis import strategies as st

from pipeline.profile import columns, new_profile
from pipeline.segments.compiler import (
    DATEDIFF_UNITS,
    MAX_MS,
    MIN_MS,
    _Compiler,
    _default_locate,
    compile_where,
    date_diff,
    date_diff_ms,
    epoch_ms,
)
from pipeline.segments.deadlines import DT_COLUMNS, _ms_row

DAY_MS = 86_400_000
# ClickHouse's DateTime64 range here (1900-2299), where profile date-times live
LOW_MS, HIGH_MS = epoch_ms(datetime(1900, 1, 1, tzinfo=UTC)), epoch_ms(datetime(2299, 12, 31, tzinfo=UTC))


def _dt(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)  # as profile.columns builds them


# instants on and next to unit boundaries, where an off-by-one would show
instants = st.one_of(
    st.integers(LOW_MS, HIGH_MS),
    st.builds(lambda k, unit, d: k * unit + d, st.integers(LOW_MS // (7 * DAY_MS), HIGH_MS // (7 * DAY_MS)),
              st.sampled_from([1000, 60_000, 3_600_000, DAY_MS, 7 * DAY_MS]), st.integers(-2, 2)),
    st.builds(lambda k, d: k * 7 * DAY_MS - 3 * DAY_MS + d, st.integers(-3000, 17000), st.integers(-2, 2)),
)


def test_epoch_ms_is_exact_for_millisecond_datetimes():
    for ms in (0, 1, -1, 999, 1_700_000_000_123, LOW_MS, HIGH_MS, MIN_MS, MAX_MS):
        value = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(milliseconds=ms)
        assert epoch_ms(value) == ms
    assert epoch_ms(_dt(1_700_000_000_123)) == 1_700_000_000_123


@settings(max_examples=400, deadline=None)
@given(st.sampled_from(DATEDIFF_UNITS), instants, instants)
@example("week", -3 * DAY_MS, -3 * DAY_MS - 1)
@example("day", 0, -1)
def test_date_diff_on_epoch_ms_is_date_diff(unit, start, end):
    assert date_diff_ms(unit, start, end) == date_diff(unit, _dt(start), _dt(end))


EXPRESSIONS = [
    "dateDiff('{unit}', last_seen_at, now())",
    "dateDiff('{unit}', now(), first_purchase_at)",
    "dateDiff('{unit}', nps_at, last_seen_at + INTERVAL 3 HOUR)",
    "dateDiff('{unit}', coalesce(last_purchase_at, first_seen_at), now()) <= 30",
    "last_seen_at > now() - INTERVAL 1 DAY",
    "last_seen_at >= '2026-11-20 10:00:00.250'",
    "'2026-11-20' < first_seen_at",
    "last_seen_at BETWEEN '2026-01-01' AND toDateTime('2026-12-31 23:59:59')",
    "first_seen_at IN ('2026-11-20 10:00:00', '2026-11-21')",
    "greatest(first_seen_at, last_purchase_at) = last_seen_at",
    "least(nps_at, now()) < now()",
    "if(nps IS NULL, first_seen_at, nps_at) <= now() + INTERVAL 2 WEEK",
    "isNull(last_purchase_at) OR last_purchase_at < updated_at - INTERVAL 30 DAY",
    "now() = toDateTime('2026-11-23 12:00:00')",
    "last_seen_at + INTERVAL 3000000 DAY > now()",  # past year 9999: an overflow in both forms
]


def _both(text: str) -> tuple:
    tree = sqlglot.parse_one(text, read="clickhouse")
    return (_Compiler(text, _default_locate(text), None, None).c(tree).fn,
            _Compiler(text, _default_locate(text), None, None, ms=True).c(tree).fn)


def _outcome(fn, row, now):
    try:
        value = fn(row, now)
    except (ZeroDivisionError, OverflowError, ValueError) as exc:
        return type(exc)
    return epoch_ms(value) if isinstance(value, datetime) else value


maybe_instant = st.one_of(st.none(), instants)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(EXPRESSIONS), st.sampled_from(DATEDIFF_UNITS), st.lists(maybe_instant, min_size=5, max_size=5),
       instants, st.one_of(st.none(), st.integers(0, 10)), st.integers(LOW_MS, HIGH_MS))
def test_the_epoch_ms_form_gives_the_datetime_forms_answers(template, unit, times, updated, nps, now_ms):
    text = template.format(unit=unit)
    dt_fn, ms_fn = _both(text)
    row = columns(new_profile("c1"), 0)
    for name, ms in zip(("first_seen_at", "last_seen_at", "first_purchase_at", "last_purchase_at", "nps_at"),
                        times, strict=True):
        row[name] = None if ms is None else _dt(ms)
    row["updated_at"] = _dt(updated)
    row["nps"] = nps
    ms_row = _ms_row(row)
    assert all(ms_row[c] is None or type(ms_row[c]) is int for c in DT_COLUMNS)
    assert _outcome(ms_fn, ms_row, now_ms) == _outcome(dt_fn, row, _dt(now_ms)), text


FAST_AND_GENERAL = [
    # (one-call form, the same comparison through the general closure: the constant made an expression)
    ("nps {op} 6", "nps {op} (6 + 0)"),
    ("6 {op} nps", "(6 + 0) {op} nps"),
    ("support_sentiment {op} 0.0", "support_sentiment {op} (0.0 + 0)"),
    ("orders_count - 1 {op} 0", "orders_count - 1 {op} (0 + 0)"),
    ("unsubscribed {op} 1", "unsubscribed {op} (1 + 0)"),
    ("consent_marketing {op} 0", "consent_marketing {op} (0 + 0)"),
    ("loyalty_tier {op} 'gold'", "loyalty_tier {op} lower('gold')"),
    ("category_affinity['books'] {op} 0.5", "category_affinity['books'] {op} (0.5 + 0)"),
]


@pytest.mark.parametrize("op", ["=", "!=", "<", "<=", ">", ">="])
@pytest.mark.parametrize("fast, general", FAST_AND_GENERAL)
def test_one_call_comparisons_give_the_general_answers(op, fast, general):
    fast_fn, general_fn = (compile_where(t.format(op=op)).fn for t in (fast, general))
    now = datetime(2026, 11, 23, tzinfo=UTC)
    base = columns(new_profile("c1"), 0)
    values = {
        "nps": [None, 0, 6, 7, True], "support_sentiment": [None, -0.0, 0.0, 0.5, math.nan, -math.inf],
        "orders_count": [0, 1, 2], "unsubscribed": [False, True], "consent_marketing": [None, False, True],
        "loyalty_tier": [None, "gold", "silver", ""], "category_affinity": [{}, {"books": 0.5}, {"books": 0.7}],
    }
    for name, options in values.items():
        for value in options:
            row = dict(base, **{name: value})
            assert fast_fn(row, now) == general_fn(row, now), (fast, name, value)


def _raw(text: str):
    return _Compiler(text, _default_locate(text), None, None).c(sqlglot.parse_one(text, read="clickhouse")).fn


def _and3(a, b):
    return False if a is False or b is False else None if a is None or b is None else True


def _or3(a, b):
    return True if a is True or b is True else None if a is None or b is None else False


def _cmp(value, test):
    return None if value is None else test(value)


@pytest.mark.parametrize("text, reference", [
    ("nps BETWEEN 7 AND 8", lambda n, s: _and3(_cmp(n, lambda v: v >= 7), _cmp(n, lambda v: v <= 8))),
    ("support_sentiment BETWEEN -0.5 AND 0.5",
     lambda n, s: _and3(_cmp(s, lambda v: v >= -0.5), _cmp(s, lambda v: v <= 0.5))),
    ("nps > 3 AND support_sentiment < 0", lambda n, s: _and3(_cmp(n, lambda v: v > 3), _cmp(s, lambda v: v < 0))),
    ("nps > 3 OR support_sentiment < 0", lambda n, s: _or3(_cmp(n, lambda v: v > 3), _cmp(s, lambda v: v < 0))),
    ("support_sentiment OR nps", lambda n, s: _or3(_cmp(s, bool), _cmp(n, bool))),
    ("support_sentiment AND nps", lambda n, s: _and3(_cmp(s, bool), _cmp(n, bool))),
])
def test_between_and_three_valued_logic_with_nulls(text, reference):
    """BETWEEN of constants and AND/OR with the truth test inlined: ClickHouse's three-valued logic
    (NULL, and a number as a condition: non-zero, NaN included, is true)."""
    fn = _raw(text)
    now = datetime(2026, 11, 23, tzinfo=UTC)
    base = columns(new_profile("c1"), 0)
    for nps in (None, 0, 2, 7, 8, 9):
        for sentiment in (None, -1.0, -0.5, -0.0, 0.0, 0.5, math.nan):
            row = dict(base, nps=nps, support_sentiment=sentiment)
            assert fn(row, now) == reference(nps, sentiment), (text, nps, sentiment)
