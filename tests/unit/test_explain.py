import json
import math
from dataclasses import replace
from datetime import UTC, datetime

from pipeline.events import Event, Item
from pipeline.profile import DAY_MS, columns, fold, new_profile
from pipeline.segments.compiler import Term
from pipeline.segments.definitions import parse_segments
from pipeline.segments.explain import explain_terms, jsonable
from pipeline.segments.membership import evaluate

T0 = 1_790_000_000_000
NOW = datetime.fromtimestamp(T0 / 1000, tz=UTC)
SEGMENTS = {s.id: s for s in parse_segments("""segments:
  - id: cooks
    where: has(survey_interests, 'cooking') AND category_affinity['cookware'] >= 0.3 AND nps >= 9
    requires_consent: marketing
  - id: recent_buyers
    where: orders_30d >= 1 AND dateDiff('day', last_seen_at, now()) <= 30
  - id: lapsed
    where: orders_count >= 1 AND orders_90d = 0
""")}


def survey(at, interests=("cooking",), nps=None):
    return Event(event_id=f"s{at}", source="surveys", type="survey", occurred_at=at, customer_id="c1",
                 survey_id=f"q{at}", interests=list(interests), nps=nps)


def purchase(at, category="cookware", total=40.0):
    return Event(event_id=f"p{at}", source="pos", type="purchase", occurred_at=at, customer_id="c1", total=total,
                 channel="online", items=[Item("sku", category, 3, total)])


def consent(at, given=True):
    return Event(event_id=f"c{at}", source="crm", type="consent", occurred_at=at, customer_id="c1", marketing=given)


def row_of(*events, now=T0):
    state = new_profile("c1")
    for event in events:
        fold(state, event, event.occurred_at)
    return columns(state, now)


def test_a_true_term_a_false_term_and_a_null_term():
    row = row_of(survey(T0 - DAY_MS))  # interested in cooking, no cookware affinity, no NPS
    explained = explain_terms(SEGMENTS["cooks"], row, NOW)
    assert [(t["sql"], t["value"], t["holds"]) for t in explained["terms"]] == [
        ("has(survey_interests, 'cooking')", True, True),
        ("category_affinity['cookware'] >= 0.3", False, False),
        ("nps >= 9", None, False),  # NULL: never holds
    ]
    assert explained["predicate"] is False and explained["result"] is False
    assert explained["consent"] == {"required": "marketing", "given": None, "holds": False}
    assert explained["segment_id"] == "cooks" and explained["now"] == NOW.isoformat()
    json.dumps(explained)  # plain JSON


def test_every_term_holds_but_consent_decides():
    events = [survey(T0 - DAY_MS, nps=10), purchase(T0 - 2 * DAY_MS)]
    without = explain_terms(SEGMENTS["cooks"], row_of(*events), NOW)
    assert all(t["holds"] for t in without["terms"]) and without["predicate"] is True
    assert without["result"] is False and without["consent"]["holds"] is False
    with_consent = explain_terms(SEGMENTS["cooks"], row_of(*events, consent(T0 - DAY_MS)), NOW)
    assert with_consent["result"] is True and with_consent["consent"] == {
        "required": "marketing", "given": True, "holds": True}
    revoked = explain_terms(SEGMENTS["cooks"], row_of(*events, consent(T0 - DAY_MS, given=False)), NOW)
    assert revoked["result"] is False and revoked["consent"]["given"] is False


def test_terms_follow_time_and_agree_with_the_stream():
    row = row_of(purchase(T0 - 40 * DAY_MS), now=T0)
    explained = explain_terms(SEGMENTS["recent_buyers"], row, NOW)
    assert [(t["value"], t["holds"]) for t in explained["terms"]] == [(False, False), (False, False)]
    lapsed = explain_terms(SEGMENTS["lapsed"], row, NOW)
    assert [t["holds"] for t in lapsed["terms"]] == [True, False]  # bought, and within 90 days
    no_consent = SEGMENTS["recent_buyers"].requires_consent is None
    assert no_consent and explained["consent"] == {"required": None, "given": None, "holds": True}


def test_result_is_membership_as_the_stream_evaluates_it():
    histories = [
        [],
        [survey(T0 - DAY_MS)],
        [survey(T0 - DAY_MS, nps=9), purchase(T0 - DAY_MS), consent(T0 - DAY_MS)],
        [purchase(T0 - 100 * DAY_MS)],
        [purchase(T0 - 3 * DAY_MS), consent(T0, given=False)],
    ]
    for history in histories:
        row = row_of(*history)
        members = evaluate(row, SEGMENTS.values(), NOW)
        explained = {s: explain_terms(seg, row, NOW)["result"] for s, seg in SEGMENTS.items()}
        assert {s for s, result in explained.items() if result} == members, history


def test_a_term_that_cannot_be_evaluated_is_reported_not_raised():
    segment = SEGMENTS["lapsed"]

    def fails(row, now):
        raise ZeroDivisionError("division by zero")

    broken = replace(segment, compiled=replace(segment.predicate, terms=(Term("1 / 0 > 1", fails),)))
    explained = explain_terms(broken, row_of(), NOW)
    assert explained["terms"] == [{"sql": "1 / 0 > 1", "value": None, "holds": False,
                                   "error": "ZeroDivisionError: division by zero"}]


def test_jsonable():
    at = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert jsonable({"a": at, "b": {1, 2}, "c": (math.nan, math.inf), "d": [{"e": None}]}) == {
        "a": "2026-01-02T03:04:05+00:00", "b": [1, 2], "c": ["nan", "inf"], "d": [{"e": None}]}
