"""The stored profile encoding: decode(encode(p)) == p for profiles folded from arbitrary events and
for edge values; JSON values written by earlier versions still decode, and dedup still matches
their event ids. Sizes are the benchmark's (benchmarks/bench_profiles.py), not asserted here."""

import json
from dataclasses import fields, replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.events import Event, Item
from pipeline.identity import merge_profiles
from pipeline.processor import Config, absorb, schedule, step
from pipeline.profile import DAY_MS, ProfileState, columns, id_digest, is_duplicate, new_profile
from pipeline.profile_encoding import FORMAT, decode, decode_fields, encode
from pipeline.segments.definitions import load_segments

T0 = 1_790_000_000_000
SEGMENTS = load_segments(None)
PROPERTY = settings(max_examples=150, deadline=None)

# A value written by the code before this encoding (JSON of ProfileState.to_dict, string event and
# session ids), produced by that code from the events of test_legacy_json_value_still_decodes.
LEGACY = (
    b'{"customer_id":"email:abababababababababababababababababababababababababababababababab",'
    b'"anonymous_ids":["dev-1"],"email_hashes":["abababababababababababababababababababababababababababababababab"],'
    b'"loyalty_ids":[],"first_seen_at":1790000000000,"last_seen_at":1790000006000,"events_count":7,'
    b'"sessions_count":1,"recent_sessions":["sess-1"],"page_views_count":0,"product_views_count":1,'
    b'"cart_adds_count":0,"orders_count":1,"lifetime_value":32.5,"first_purchase_at":1790000001000,'
    b'"last_purchase_at":1790000001000,"orders":[[1790000001000,42.5,1],[1790000002000,-10.0,0]],'
    b'"affinity":{"cookware":[1.0,1790000000000],"books":[10.0,1790000001000]},"channels":{"online":1},'
    b'"email_opens_count":0,"email_clicks_count":0,"unsubscribed":[0,false],"open_tickets":["tk1"],'
    b'"sentiment_sum":-0.5,"sentiment_count":1,"nps":[1790000003000,9],'
    b'"surveys":{"q1":[1790000003000,["cooking"],["price"]]},"surveys_count":1,'
    b'"loyalty_tier":[1790000004000,"gold"],"consent_marketing":[1790000005000,true],'
    b'"traits":{"loyalty_tier":[1790000004000,"gold"],"city":[1790000004000,"Lyon"]},'
    b'"segments":{"buyers":1790000001000},"recent_event_ids":["3f2b8c1e-0000-4000-8000-000000000001",'
    b'"3f2b8c1e-0000-4000-8000-000000000002","t-9","s-1","c-1","c-2","c-3"],"next_check_at":1792592000000,'
    b'"merged_keys":[],"definitions":"0123456789abcdef","version":7,"updated_at":1790000006000}'
)
HASH = "ab" * 32


def legacy_events():
    ident = {"email_hash": HASH}
    return [
        Event(event_id="3f2b8c1e-0000-4000-8000-000000000001", source="clickstream", type="product_view",
              occurred_at=T0, anonymous_id="dev-1", session_id="sess-1", category="Cookware", **ident),
        Event(event_id="3f2b8c1e-0000-4000-8000-000000000002", source="pos", type="purchase", occurred_at=T0 + 1000,
              total=42.5, channel="online", items=[Item("k", "books", 2, 21.25)], **ident),
        Event(event_id="t-9", source="pos", type="refund", occurred_at=T0 + 2000, total=10.0, **ident),
        Event(event_id="s-1", source="surveys", type="survey", occurred_at=T0 + 3000, survey_id="q1", nps=9,
              interests=["cooking"], motivations=["price"], **ident),
        Event(event_id="c-1", source="crm", type="identify", occurred_at=T0 + 4000,
              traits={"loyalty_tier": "gold", "city": "Lyon"}, **ident),
        Event(event_id="c-2", source="crm", type="consent", occurred_at=T0 + 5000, marketing=True, **ident),
        Event(event_id="c-3", source="crm", type="support_ticket", occurred_at=T0 + 6000, action="opened",
              ticket_id="tk1", sentiment=-0.5, **ident),
    ]


def test_legacy_json_value_still_decodes():
    from pipeline.profile import fold

    state = decode(LEGACY)
    # the same events folded by this code give the same state (ids as digests), so nothing was lost
    expected = new_profile("email:" + HASH)
    for event in legacy_events():
        fold(expected, event, event.occurred_at)
    expected.segments = {"buyers": T0 + 1000}
    expected.next_check_at = T0 + 30 * DAY_MS
    expected.definitions = "0123456789abcdef"
    assert state == expected
    assert state.recent_sessions == [id_digest("sess-1")]
    # dedup matches the ids it was written with; a new id is not a duplicate
    for event in legacy_events():
        assert is_duplicate(state, event.event_id)
    assert not is_duplicate(state, "3f2b8c1e-0000-4000-8000-000000000003")
    # and it is written back in the compact format, which reads back the same
    again = encode(state)
    assert again[0] == FORMAT and decode(again) == state
    assert columns(decode(again), T0 + DAY_MS) == columns(decode(LEGACY), T0 + DAY_MS)


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="unknown profile encoding"):
        decode(b"\x07abc")


def test_values_the_compact_format_cannot_hold_fall_back_to_json():
    state = replace(new_profile("c1"), updated_at=T0, orders=[[T0 + 0.5, 1.0, 1]])  # a float time
    value = encode(state)
    assert value[:1] == b"{" and decode(value) == state


# --- profiles folded from arbitrary events ------------------------------------------------------

texts = st.text(max_size=12)
ids = st.one_of(st.uuids().map(str), st.text(min_size=1, max_size=40))
times = st.integers(T0 - 500 * DAY_MS, T0 + DAY_MS)
money = st.one_of(st.integers(0, 10**7).map(lambda c: c / 100), st.floats(0, 1e9, allow_nan=False))
keys = st.one_of(st.just("c1"), st.just("anon:dev-1"), st.just("email:" + HASH), st.just("loyalty:L7"), texts)


@st.composite
def events(draw):
    common = {"event_id": draw(ids), "occurred_at": draw(times),
              "customer_id": draw(st.none() | st.just("c1")), "anonymous_id": draw(st.none() | st.just("dev-1")),
              "email_hash": draw(st.none() | st.just(HASH) | st.text(min_size=1, max_size=8)),
              "loyalty_id": draw(st.none() | st.just("L7"))}
    kind = draw(st.sampled_from(("click", "pos", "crm", "survey")))
    if kind == "click":
        return Event(source="clickstream", type=draw(st.sampled_from(
            ("page_view", "product_view", "search", "add_to_cart", "checkout_started", "remove_from_cart"))),
            session_id=draw(st.none() | ids), category=draw(st.none() | texts), **common)
    if kind == "pos":
        items = draw(st.lists(st.builds(Item, texts, st.none() | texts, st.integers(0, 5), money), max_size=3))
        return Event(source="pos", type=draw(st.sampled_from(("purchase", "refund"))), total=draw(st.none() | money),
                     channel=draw(st.none() | st.sampled_from(("store", "online"))), items=items, **common)
    if kind == "crm":
        crm_type = draw(st.sampled_from(("identify", "consent", "email", "support_ticket")))
        return Event(source="crm", type=crm_type, traits=draw(st.dictionaries(texts, texts, max_size=3)),
                     marketing=draw(st.none() | st.booleans()),
                     action=draw(st.sampled_from(("open", "click", "unsubscribe", "sent", "opened", "resolved"))),
                     ticket_id=draw(st.none() | st.sampled_from(("t1", "t2"))),
                     sentiment=draw(st.none() | st.floats(-1, 1)), **common)
    return Event(source="surveys", type="survey", survey_id=draw(st.none() | st.sampled_from(("q1", "nps", "q2"))),
                 nps=draw(st.none() | st.integers(0, 10)), interests=draw(st.lists(texts, max_size=3)),
                 motivations=draw(st.lists(texts, max_size=3)), **common)


@st.composite
def folded(draw):
    """A profile as the worker holds it: events stepped in (segments, dedup), scheduled, sometimes
    after absorbing another folded profile."""
    key = draw(keys)
    config = Config(dedup_window=draw(st.sampled_from((64, 3, 0))))
    state = None
    for event in draw(st.lists(events(), max_size=30)):
        now = max(event.occurred_at, state.updated_at if state else 0)
        state = step(state, key, event, now, SEGMENTS, config).state
        schedule(state, now, SEGMENTS, config)
    if state is None:
        state = new_profile(key)
    if draw(st.booleans()):
        other = new_profile("anon:other")
        for event in draw(st.lists(events(), max_size=8)):
            other = step(other, "anon:other", event, event.occurred_at, SEGMENTS, config).state
        if state.customer_id != "anon:other":
            state = absorb(state, key, other, "anon:other", max(state.updated_at, other.updated_at), SEGMENTS,
                           config).state
    state.definitions = draw(st.sampled_from(("", "0123456789abcdef", "not-hex")))
    return state


@PROPERTY
@given(folded())
def test_decode_encode_is_identity_for_folded_profiles(state):
    value = encode(state)
    assert value[0] == FORMAT  # everything folding produces fits the compact format
    assert decode(value) == state


# --- edge values ------------------------------------------------------------------------------

ints = st.integers(-(2**62), 2**62)
maybe_times = st.none() | ints
floats = st.floats(allow_nan=False)  # NaN never equals itself; inf, -0.0, subnormals included
any_value = st.none() | st.booleans() | ints | floats | texts | st.lists(texts, max_size=2)
digests = st.lists(st.integers(0, 2**64 - 1), max_size=70)


@st.composite
def edge_profiles(draw):
    key = draw(keys | st.just("email:") | st.just("email:ABCD") | st.just("anon:"))
    own = key.split(":", 1)[1] if ":" in key else key
    names = st.lists(st.one_of(texts, st.just(own), st.just(HASH), st.just("0a1B")), max_size=4, unique=True)
    slot = st.tuples(ints, any_value).map(list)
    return ProfileState(
        customer_id=key, anonymous_ids=draw(names), email_hashes=draw(names), loyalty_ids=draw(names),
        first_seen_at=draw(maybe_times), last_seen_at=draw(maybe_times), events_count=draw(ints),
        sessions_count=draw(ints), recent_sessions=draw(digests), page_views_count=draw(ints),
        product_views_count=draw(ints), cart_adds_count=draw(ints), orders_count=draw(ints),
        lifetime_value=draw(floats), first_purchase_at=draw(maybe_times), last_purchase_at=draw(maybe_times),
        orders=draw(st.lists(st.tuples(ints, floats | ints, st.sampled_from((1, 0, -1))).map(list), max_size=5)),
        affinity=draw(st.dictionaries(texts, st.tuples(floats, ints).map(list), max_size=4)),
        channels=draw(st.dictionaries(texts, ints, max_size=3)),
        email_opens_count=draw(ints), email_clicks_count=draw(ints),
        unsubscribed=draw(st.just([0, False]) | st.just([0, 0]) | slot),
        open_tickets=draw(st.lists(texts, max_size=3)), sentiment_sum=draw(floats), sentiment_count=draw(ints),
        nps=draw(st.just([0, None]) | slot),
        surveys=draw(st.dictionaries(texts, st.tuples(ints, st.lists(texts, max_size=2),
                                                      st.lists(texts, max_size=2)).map(list), max_size=3)),
        surveys_count=draw(ints), loyalty_tier=draw(st.just([0, None]) | slot),
        consent_marketing=draw(st.just([0, None]) | slot),
        traits=draw(st.dictionaries(texts, slot, max_size=3)),
        segments=draw(st.dictionaries(texts, ints, max_size=4)), recent_event_ids=draw(digests),
        next_check_at=draw(maybe_times), merged_keys=draw(st.lists(texts, max_size=2)),
        definitions=draw(texts | st.just("0123456789abcdef") | st.just("ABCDEF")), version=draw(ints),
        updated_at=draw(ints),
    )


@PROPERTY
@given(edge_profiles())
def test_decode_encode_is_identity_for_edge_values(state):
    assert decode(encode(state)) == state


def test_float_fields_keep_their_type_and_sign():
    state = replace(new_profile("c1"), lifetime_value=-0.0, sentiment_sum=0.1 + 0.2, updated_at=T0,
                    orders=[[T0, 19.99, 1], [T0, 7, 1], [T0 + 1, -0.0, 0], [T0 + 2, float("inf"), 1]],
                    affinity={"a": [0.5, T0], "b": [5e-324, T0]})
    back = decode(encode(state))
    assert back == state
    assert [type(o[1]) for o in back.orders] == [float, int, float, float]
    assert str(back.lifetime_value) == "-0.0" and str(back.orders[2][1]) == "-0.0"


def test_merge_command_state_round_trips_through_json():
    """The worker sends an absorbed profile to the survivor's partition as JSON (to_dict); with
    digests as ints that must read back the same."""
    state = new_profile("anon:a")
    for event in legacy_events():
        state = step(state, "anon:a", replace(event, customer_id=None, email_hash=None, anonymous_id="a"),
                     event.occurred_at, SEGMENTS).state
    assert ProfileState.from_dict(json.loads(json.dumps(state.to_dict()))) == state
    merged = merge_profiles(new_profile("c1"), decode(encode(state)), half_life_days=30.0)
    assert is_duplicate(merged, "t-9")


# --- some fields only (decode_fields: what a backfill scan reads) -----------------------------------

FIELDS = tuple(f.name for f in fields(ProfileState))


def _same_fields(state, subset):
    value = encode(state)
    partial = decode_fields(value, frozenset(subset))
    full = decode(value)
    for name in subset:
        assert getattr(partial, name) == getattr(full, name) == getattr(state, name), name
    if value[0] == FORMAT:
        for name in set(FIELDS) - set(subset):  # never a default in place of the stored value
            with pytest.raises(AttributeError):
                getattr(partial, name)


@PROPERTY
@given(folded(), st.sets(st.sampled_from(FIELDS)))
def test_decode_fields_reads_each_field_as_decode_does_folded(state, subset):
    _same_fields(state, FIELDS)
    _same_fields(state, subset)


@PROPERTY
@given(edge_profiles(), st.sets(st.sampled_from(FIELDS)))
def test_decode_fields_reads_each_field_as_decode_does_edge_values(state, subset):
    _same_fields(state, FIELDS)
    _same_fields(state, subset)


def test_decode_fields_of_a_json_value_is_the_whole_profile():
    assert decode_fields(LEGACY, frozenset({"definitions"})) == decode(LEGACY)
