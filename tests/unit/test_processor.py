import random
from dataclasses import replace

from pipeline.events import Event, Item
from pipeline.processor import reevaluate, step
from pipeline.profile import DAY_MS, columns, new_profile
from pipeline.segments.definitions import parse_segments

T0 = 1_790_000_000_000
SEGMENTS = parse_segments("""segments:
  - id: buyers
    where: orders_count >= 1
  - id: recent_buyers
    where: orders_30d >= 1
  - id: cooks
    where: has(survey_interests, 'cooking') AND category_affinity['cookware'] >= 0.3
    requires_consent: marketing
""")


def purchase(event_id, at, total=10.0, kind="purchase"):
    return Event(event_id=event_id, source="pos", type=kind, occurred_at=at, customer_id="c1", total=total,
                 channel="store", items=[Item("s", "cookware", 1, total)])


def test_purchase_enters_buyers_then_time_exits_recent():
    result = step(None, "c1", purchase("e1", T0), T0, SEGMENTS)
    assert [(c.segment_id, c.change, c.cause) for c in result.changes] == [
        ("buyers", "entered", "e1"), ("recent_buyers", "entered", "e1")]
    assert result.state.version == 1
    later = reevaluate(result.state, T0 + 30 * DAY_MS + 1, SEGMENTS)
    assert [(c.segment_id, c.change, c.cause) for c in later.changes] == [("recent_buyers", "exited", "time")]
    assert later.state.version == 2
    assert reevaluate(later.state, T0 + 31 * DAY_MS, SEGMENTS).changes == []


def test_duplicates_are_dropped():
    first = step(None, "c1", purchase("e1", T0), T0, SEGMENTS)
    again = step(first.state, "c1", purchase("e1", T0), T0, SEGMENTS)
    assert again.duplicate and again.changes == [] and again.state.orders_count == 1


def test_window_is_half_open():
    state = step(None, "c1", purchase("e1", T0), T0, SEGMENTS).state
    # (now - 30 days, now]: an order exactly 30 days old is out, one a millisecond younger is in
    assert columns(state, T0 + 30 * DAY_MS - 1)["orders_30d"] == 1
    assert columns(state, T0 + 30 * DAY_MS)["orders_30d"] == 0
    assert columns(state, T0 - 1)["orders_30d"] == 0  # not yet happened


def test_refund_reduces_value():
    state = step(None, "c1", purchase("e1", T0, 30.0), T0, SEGMENTS).state
    state = step(state, "c1", purchase("e2", T0 + 1, 10.0, "refund"), T0 + 1, SEGMENTS).state
    row = columns(state, T0 + 2)
    assert row["lifetime_value"] == 20.0 and row["orders_count"] == 1 and row["spend_30d"] == 20.0


def test_consent_gates_membership_and_revocation_exits():
    survey = Event(event_id="s1", source="surveys", type="survey", occurred_at=T0, customer_id="c1",
                   survey_id="q", interests=["cooking"])
    consent = Event(event_id="k1", source="crm", type="consent", occurred_at=T0, customer_id="c1", marketing=True)
    state = None
    for event in (purchase("e1", T0), survey):
        result = step(state, "c1", event, T0, SEGMENTS)
        state = result.state
    assert "cooks" not in state.segments
    result = step(state, "c1", consent, T0, SEGMENTS)
    assert ("cooks", "entered") in [(c.segment_id, c.change) for c in result.changes]
    revoke = replace(consent, event_id="k2", occurred_at=T0 + 1, marketing=False)
    result = step(result.state, "c1", revoke, T0 + 1, SEGMENTS)
    assert ("cooks", "exited") in [(c.segment_id, c.change) for c in result.changes]


def test_order_of_events_does_not_change_the_profile():
    events = [purchase(f"e{i}", T0 - i * DAY_MS, 5.0 + i) for i in range(10)]
    events.append(Event(event_id="n1", source="surveys", type="survey", occurred_at=T0 - DAY_MS, customer_id="c1",
                        survey_id="nps", nps=3))
    events.append(Event(event_id="n2", source="surveys", type="survey", occurred_at=T0, customer_id="c1",
                        survey_id="nps", nps=9))
    now = T0 + 1000
    reference = None
    for seed in range(5):
        shuffled = events[:]
        random.Random(seed).shuffle(shuffled)
        state = new_profile("c1")
        for event in shuffled:
            state = step(state, "c1", event, now, SEGMENTS).state
        row = columns(state, now)
        row.pop("updated_at")
        if reference is None:
            reference = row
        assert row == reference
    assert reference["nps"] == 9


def test_absorb_is_idempotent_and_moves_memberships():
    from pipeline.processor import absorb, release

    anon = step(None, "anon:A", replace(purchase("e1", T0), customer_id=None, anonymous_id="A"), T0, SEGMENTS).state
    customer = step(None, "c1", replace(purchase("e2", T0 + 1000), total=5.0), T0 + 1000, SEGMENTS).state
    gone = release(anon, T0 + 2000, cause="merge")
    assert {(c.segment_id, c.change, c.cause) for c in gone.changes} == {
        ("buyers", "exited", "merge"), ("recent_buyers", "exited", "merge")}
    merged = absorb(customer, "c1", anon, "anon:A", T0 + 2000, SEGMENTS)
    assert merged.state.orders_count == 2 and merged.state.merged_keys == ["anon:A"]
    assert merged.row is not None and merged.row["lifetime_value"] == 15.0
    again = absorb(merged.state, "c1", anon, "anon:A", T0 + 3000, SEGMENTS)
    assert again.duplicate and again.state.orders_count == 2


def _events():
    from hypothesis import strategies as st

    at = st.integers(T0 - 400 * DAY_MS, T0)
    ident = st.sampled_from([{"customer_id": "c1"}, {"customer_id": "c1", "anonymous_id": "a1"}])
    click = st.builds(lambda i, t, kind, cat, sess, who: Event(event_id=f"k{i}", source="clickstream", type=kind,
                                                               occurred_at=t, category=cat, session_id=sess, **who),
                      st.integers(), at, st.sampled_from(["page_view", "product_view", "add_to_cart", "search"]),
                      st.sampled_from(["cookware", "books", None]), st.sampled_from(["s1", "s2", None]), ident)
    pos = st.builds(lambda i, t, kind, total: Event(event_id=f"p{i}", source="pos", type=kind, occurred_at=t,
                                                    customer_id="c1", total=total, channel="online",
                                                    items=[Item("s", "books", 1, total)]),
                    st.integers(), at, st.sampled_from(["purchase", "refund"]), st.floats(0, 500))
    crm = st.builds(lambda i, t, kind, flag: Event(event_id=f"c{i}", source="crm", type=kind, occurred_at=t,
                                                   customer_id="c1", marketing=flag, action="open" if flag else "click",
                                                   traits={"loyalty_tier": "gold"} if flag else {},
                                                   ticket_id="t1", sentiment=0.5),
                    st.integers(), at, st.sampled_from(["identify", "consent", "email", "support_ticket"]),
                    st.booleans())
    survey = st.builds(lambda i, t, nps: Event(event_id=f"s{i}", source="surveys", type="survey", occurred_at=t,
                                               customer_id="c1", survey_id="q", nps=nps, interests=["cooking"]),
                       st.integers(), at, st.one_of(st.none(), st.integers(0, 10)))
    return st.lists(st.one_of(click, pos, crm, survey), min_size=1, max_size=25)


from hypothesis import given, settings  # noqa: E402


@settings(max_examples=200, deadline=None)
@given(_events())
def test_touched_columns_cover_every_change(events):
    from pipeline.profile import TIME_COLUMNS, fold, touched_columns

    state = new_profile("c1")
    for event in events:
        before = columns(state, T0, half_life_days=30)
        fold(state, event, T0)
        after = columns(state, T0, half_life_days=30)
        changed = {k for k in after if after[k] != before[k]}
        assert changed <= touched_columns(event) | TIME_COLUMNS, (event, changed - touched_columns(event))


def st_offsets():
    from hypothesis import strategies as st

    return st.lists(st.integers(0, 40 * DAY_MS), min_size=1, max_size=5)


@settings(max_examples=100, deadline=None)
@given(_events(), st_offsets())
def test_incremental_evaluation_gives_the_full_memberships(events, offsets):
    from pipeline.processor import advance, schedule

    full = incremental = None
    now = T0
    for event, offset in zip(events, offsets * len(events), strict=False):
        now += offset  # time passes between events: advance() applies what it changed, as the worker does
        event = replace(event, occurred_at=now - (T0 - event.occurred_at) % (10 * DAY_MS))  # recent, as live
        full = step(full.state if full else None, "c1", event, now, SEGMENTS, incremental=False)
        if full.duplicate:  # the reference: everything evaluated as of now, whatever the event
            full = reevaluate(full.state, now, SEGMENTS)
        if incremental is not None:
            advance(incremental.state, now, SEGMENTS)
        incremental = step(incremental.state if incremental else None, "c1", event, now, SEGMENTS)
        schedule(incremental.state, now, SEGMENTS)
        assert full.state.segments.keys() == incremental.state.segments.keys()



def test_consent_gates_membership_and_a_revocation_exits_at_once():
    def consent(event_id, at, value):
        return Event(event_id=event_id, source="crm", type="consent", occurred_at=at, customer_id="c1",
                     marketing=value)

    def survey(event_id, at):
        return Event(event_id=event_id, source="surveys", type="survey", occurred_at=at, customer_id="c1",
                     survey_id="q1", interests=["cooking"])

    state = step(None, "c1", survey("s1", T0), T0, SEGMENTS).state
    for i in range(3):  # enough cookware affinity for the cooks segment
        state = step(state, "c1", replace(purchase(f"e{i}", T0 + i), total=20.0), T0 + i, SEGMENTS).state
    assert "cooks" not in state.segments  # interested and active, but no consent
    granted = step(state, "c1", consent("k1", T0 + 10, True), T0 + 10, SEGMENTS)
    assert [(c.segment_id, c.change, c.cause) for c in granted.changes] == [("cooks", "entered", "k1")]
    revoked = step(granted.state, "c1", consent("k2", T0 + 20, False), T0 + 20, SEGMENTS)
    assert [(c.segment_id, c.change, c.cause) for c in revoked.changes] == [("cooks", "exited", "k2")]
