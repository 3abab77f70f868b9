"""Identity resolution, the pure part: keys and kinds, the conflict rule, and merging two profiles
(the merge must equal folding every event of both into one profile)."""

import copy
import json
from functools import reduce

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.decode import decode
from pipeline.events import Event
from pipeline.identity import (
    alias_keys,
    hash_email,
    identifiers_of,
    kind_of,
    merge_profiles,
    routing_key,
    strength,
    survivor,
    survivor_of,
)
from pipeline.profile import DAY_MS, HISTORY_MS, ProfileState, columns, fold, id_digest, is_duplicate, new_profile

NOW = 1_790_000_000_000
HALF_LIFE = 30.0
WINDOW = 64
PROPERTY = settings(max_examples=120, deadline=None)

EMAILS = ("ann@example.com", "Bob.Smith@Example.org", "c+tag@shop.test")
CATEGORIES = ("cookware", "Cookware", "books", "garden")
SESSIONS = ("s1", "s2", "s3", "s4")
CLICK_TYPES = ("page_view", "product_view", "search", "add_to_cart", "remove_from_cart", "checkout_started")


# --- building profiles the real way -------------------------------------------------------------

def fold_all(key, events, now=NOW):
    """Fold events into one profile as the processor does: duplicates (by event id) are dropped."""
    state = new_profile(key)
    for event in events:
        if not is_duplicate(state, event.event_id):
            fold(state, event, now, half_life_days=HALF_LIFE, dedup_window=WINDOW)
    return state


def to_event(source, record, now=NOW):
    event = decode(source, json.dumps(record).encode(), now_ms=now)
    assert isinstance(event, Event), event
    return event


def identity_fields(kind, value):
    """JSON identifier fields of a key's kind, and the key they route to."""
    if kind == "customer":
        return {"customer_id": value}, value
    if kind == "loyalty":
        return {"loyalty_id": value}, "loyalty:" + value
    if kind == "email":
        return {"email": value}, "email:" + hash_email(value)
    return {"anonymous_id": value}, "anon:" + value


key_specs = st.one_of(
    st.tuples(st.just("customer"), st.sampled_from(("c1", "c2"))),
    st.tuples(st.just("loyalty"), st.sampled_from(("L1", "L2"))),
    st.tuples(st.just("email"), st.sampled_from(EMAILS)),
    st.tuples(st.just("anonymous"), st.sampled_from(("a1", "a2"))),
)


@st.composite
def bodies(draw, idempotent=False):
    """(source, record body) of one event. ``idempotent``: only events whose effect, beyond
    events_count, is the same when folded twice (what a merge can de-duplicate exactly)."""
    if idempotent:
        choice = draw(st.sampled_from(("click", "identify", "consent", "email", "ticket")))
    else:
        choice = draw(st.sampled_from(("click", "pos", "identify", "consent", "email", "ticket", "survey")))
    if choice == "click":
        kind = "remove_from_cart" if idempotent else draw(st.sampled_from(CLICK_TYPES))
        return "clickstream", {"type": kind, "session_id": draw(st.none() | st.sampled_from(SESSIONS)),
                               "category": draw(st.none() | st.sampled_from(CATEGORIES))}
    if choice == "pos":
        items = draw(st.lists(st.fixed_dictionaries({
            "sku": st.sampled_from(("k1", "k2")), "category": st.none() | st.sampled_from(CATEGORIES),
            "quantity": st.integers(1, 3), "unit_price": st.integers(0, 5000).map(lambda c: c / 100)}), max_size=2))
        return "pos", {"kind": draw(st.sampled_from(("purchase", "refund"))),
                       "channel": draw(st.sampled_from(("store", "online"))),
                       "total": draw(st.integers(0, 50_000)) / 100, "items": items}
    if choice == "identify":
        traits = draw(st.dictionaries(st.sampled_from(("name", "city", "loyalty_tier", "email")),
                                      st.sampled_from(("x", "y", "gold", "silver")), max_size=3))
        return "crm", {"type": "identify", "traits": traits}
    if choice == "consent":
        return "crm", {"type": "consent", "marketing": draw(st.booleans())}
    if choice == "email":
        actions = ("sent", "unsubscribe") if idempotent else ("sent", "open", "click", "unsubscribe")
        return "crm", {"type": "email", "action": draw(st.sampled_from(actions)), "campaign_id": "m1"}
    if choice == "ticket":
        # ticket ids are unique per event (see events()): fold itself depends on the arrival order of
        # an open and a resolve of one ticket, so no ticket is both opened and resolved here
        action = "opened" if idempotent else draw(st.sampled_from(("opened", "resolved")))
        sentiment = None if idempotent else draw(st.none() | st.integers(-10, 10).map(lambda s: s / 10))
        return "crm", {"type": "support_ticket", "action": action, "topic": "t", "sentiment": sentiment}
    return "surveys", {"survey_id": draw(st.sampled_from(("q1", "q2", "nps"))), "source": "survey",
                       "nps": draw(st.none() | st.integers(0, 10)),
                       "interests": draw(st.lists(st.sampled_from(("cooking", "Travel", "books")), max_size=2)),
                       "motivations": draw(st.lists(st.sampled_from(("price", "quality")), max_size=2))}


def make_event(source, body, event_id, at, idents):
    record = {"event_id": event_id, "occurred_at": at, **idents, **body}
    if source == "pos":
        record["transaction_id"] = "t-" + event_id
    elif source == "surveys":
        record["response_id"] = "r-" + event_id
    if body.get("type") == "support_ticket":
        record["ticket_id"] = "tk-" + event_id
    return to_event(source, record)


@st.composite
def events(draw, spec, prefix, times, *, idempotent=False, max_size=12):
    """Events routed to the key of ``spec`` (they may also carry a weaker anonymous id)."""
    kind, value = spec
    idents, key = identity_fields(kind, value)
    result = []
    for i, body in enumerate(draw(st.lists(bodies(idempotent), max_size=max_size))):
        extra = dict(idents)
        if kind != "anonymous" and draw(st.booleans()):
            extra["anonymous_id"] = draw(st.sampled_from(("a1", "a3")))
        if kind == "email":
            extra["email"] = draw(st.sampled_from((value, value.upper(), f"  {value} ")))
        event = make_event(*body, event_id=f"{prefix}{i}", at=draw(times), idents=extra)
        assert routing_key(customer_id=event.customer_id, loyalty_id=event.loyalty_id,
                           email_hash=event.email_hash, anonymous_id=event.anonymous_id) == key
        result.append(event)
    return result


def unique_times(draw, count):
    """``count`` distinct event times over 400 days before NOW (so old orders leave the history)."""
    minutes = draw(st.lists(st.integers(0, 400 * 24 * 60), min_size=count, max_size=count, unique=True))
    return iter([NOW - m * 60_000 for m in minutes])


@st.composite
def linked_histories(draw, distinct_times=True):
    """Two keys that may merge, events under each, and events folded into both (duplicates)."""
    spec_a = draw(key_specs)
    spec_b = draw(key_specs.filter(lambda s: s[0] != "customer" or spec_a[0] != "customer"))
    key_a, key_b = identity_fields(*spec_a)[1], identity_fields(*spec_b)[1]
    if key_a == key_b:
        spec_b = ("anonymous", "a9")
        key_b = "anon:a9"
    if distinct_times:
        pool = unique_times(draw, 40)
        times = st.builds(lambda: next(pool))
    else:  # few instants: slots tie across the two profiles
        times = st.sampled_from([NOW - d * DAY_MS for d in (0, 1, 2, 40)])
    e1 = draw(events(spec_a, "a-", times))
    e2 = draw(events(spec_b, "b-", times))
    shared = draw(events(spec_a, "both-", times, idempotent=True, max_size=5))
    return key_a, e1, key_b, e2, shared


# --- comparing ----------------------------------------------------------------------------------

IGNORED = ("customer_id", "version", "updated_at", "segments")
ROUNDED = {"lifetime_value": 0.0101, "avg_order_value": 0.0101, "support_sentiment": 1.1e-4,
           **{f"spend_{d}d": 0.0101 for d in (30, 90, 365)}}


def assert_same_columns(left, right, now):
    x, y = columns(left, now, half_life_days=HALF_LIFE), columns(right, now, half_life_days=HALF_LIFE)
    for name in IGNORED:
        x.pop(name)
        y.pop(name)
    assert sorted(x.pop("anonymous_ids")) == sorted(y.pop("anonymous_ids"))
    ax, ay = x.pop("category_affinity"), y.pop("category_affinity")
    assert ax.keys() == ay.keys()
    for category in ax:
        assert ax[category] == pytest.approx(ay[category], abs=2e-6), category
    top_x, top_y = x.pop("top_category"), y.pop("top_category")
    if top_x != top_y:  # only a float-rounding tie may pick another category
        assert ax[top_x] == pytest.approx(ax[top_y], abs=2e-6)
    for name, tolerance in ROUNDED.items():
        vx, vy = x.pop(name), y.pop(name)
        assert (vx is None) == (vy is None), name
        if vx is not None:
            assert vx == pytest.approx(vy, abs=tolerance), name
    assert x == y


def assert_same_state(merged, single):
    """Fields not in the columns, where the merge must also agree with the single fold."""
    for name in ("email_hashes", "loyalty_ids", "open_tickets", "recent_sessions", "recent_event_ids"):
        assert set(getattr(merged, name)) == set(getattr(single, name)), name
    # fold trims relative to each pos event's instant, the merge to the latest of both profiles
    horizon = max(merged.updated_at, single.updated_at) - HISTORY_MS
    assert merged.orders == [o for o in single.orders if o[0] > horizon]
    assert merged.channels == single.channels
    assert merged.traits == single.traits
    assert merged.surveys == single.surveys
    for name in ("unsubscribed", "nps", "loyalty_tier", "consent_marketing"):
        assert getattr(merged, name) == getattr(single, name), name
    assert merged.sentiment_sum == pytest.approx(single.sentiment_sum)
    assert merged.affinity.keys() == single.affinity.keys()
    for category, (raw, as_of) in merged.affinity.items():
        assert as_of == single.affinity[category][1]
        assert raw == pytest.approx(single.affinity[category][0], rel=1e-9)


def know_key(state, key):
    """Record the identifier of ``key`` in the state's lists, as the events under the key would."""
    for prefix, name in (("anon:", "anonymous_ids"), ("email:", "email_hashes"), ("loyalty:", "loyalty_ids")):
        values = getattr(state, name)
        if key.startswith(prefix) and key[len(prefix):] not in values:
            values.append(key[len(prefix):])


def merge(a, b):
    """Merge per the conflict rule: the survivor's profile absorbs the other."""
    kept = survivor(a.customer_id, b.customer_id)
    assert kept is not None
    first, second = (a, b) if kept == a.customer_id else (b, a)
    return merge_profiles(first, second, half_life_days=HALF_LIFE, dedup_window=WINDOW)


def shuffled(items, rnd):
    items = list(items)
    rnd.shuffle(items)
    return items


# --- merge == one fold of everything -------------------------------------------------------------

@PROPERTY
@given(linked_histories(), st.randoms(use_true_random=False))
def test_merge_equals_folding_everything_into_one_profile(histories, rnd):
    key_a, e1, key_b, e2, shared = histories
    profile_a = fold_all(key_a, shuffled(e1 + shared, rnd))
    profile_b = fold_all(key_b, shuffled(e2 + shared, rnd))
    kept = survivor(key_a, key_b)
    single = fold_all(kept, shuffled(e1 + e2 + shared + shared, rnd))
    for key in (key_a, key_b):  # what the events under each key carry, even when a key has no events
        know_key(single, key)

    merged = merge(profile_a, profile_b)

    assert merged.customer_id == kept
    for now in (NOW, NOW + 45 * DAY_MS, NOW + 300 * DAY_MS):
        assert_same_columns(merged, single, now)
    assert_same_state(merged, single)
    assert merged.events_count == len({e.event_id for e in e1 + e2 + shared})


@PROPERTY
@given(linked_histories(distinct_times=False), st.randoms(use_true_random=False))
def test_merge_is_commutative(histories, rnd):
    key_a, e1, key_b, e2, shared = histories
    profile_a = fold_all(key_a, shuffled(e1 + shared, rnd))
    profile_b = fold_all(key_b, shuffled(e2 + shared, rnd))
    a_into_b = merge_profiles(profile_b, profile_a, half_life_days=HALF_LIFE)
    b_into_a = merge_profiles(profile_a, profile_b, half_life_days=HALF_LIFE)
    for now in (NOW, NOW + 100 * DAY_MS):
        assert columns(a_into_b, now) | {n: None for n in IGNORED} == columns(b_into_a, now) | {
            n: None for n in IGNORED}
    for name in ("anonymous_ids", "email_hashes", "loyalty_ids", "open_tickets", "orders", "affinity", "traits",
                 "surveys", "nps", "unsubscribed", "loyalty_tier", "consent_marketing", "channels"):
        assert getattr(a_into_b, name) == getattr(b_into_a, name), name


@PROPERTY
@given(linked_histories())
def test_merge_leaves_its_inputs_alone(histories):
    key_a, e1, key_b, e2, shared = histories
    profile_a, profile_b = fold_all(key_a, e1 + shared), fold_all(key_b, e2 + shared)
    before = copy.deepcopy((profile_a.to_dict(), profile_b.to_dict()))
    merged = merge(profile_a, profile_b)
    assert (profile_a.to_dict(), profile_b.to_dict()) == before
    # no list or dict of the result is shared with an input
    merged_fields = merged.to_dict()
    for name, value in merged_fields.items():
        if isinstance(value, list | dict):
            assert getattr(merged, name) is not getattr(profile_a, name)
            assert getattr(merged, name) is not getattr(profile_b, name)


@PROPERTY
@given(st.lists(st.tuples(st.sampled_from(("clickstream", "crm", "surveys")), st.sampled_from(EMAILS),
                          st.sampled_from(("", " ", "\t")), st.booleans()), min_size=1, max_size=8),
       st.emails())
def test_merged_profile_holds_no_raw_email(uses, other_email):
    """A loyalty member's events carry several addresses, written loosely; another profile is
    known by one address only. Decoded from JSON (the real hashing path), folded, merged."""
    bodies_by_source = {"clickstream": {"type": "page_view", "session_id": "s1"},
                        "crm": {"type": "identify", "traits": {"name": "x", "email": other_email}},
                        "surveys": {"survey_id": "q1", "interests": ["cooking"]}}
    member_events, email_events, raw = [], [], {other_email}
    for i, (source, address, pad, upper) in enumerate(uses):
        written = pad + (address.upper() if upper else address) + pad
        raw |= {written, address}
        member_events.append(make_event(source, bodies_by_source[source], f"m{i}", NOW - i * 1000,
                                        {"loyalty_id": "L1", "email": written}))
        email_events.append(make_event(source, bodies_by_source[source], f"e{i}", NOW - i * 1000 - 7,
                                       {"email": other_email}))
    member = fold_all("loyalty:L1", member_events)
    by_email = fold_all("email:" + hash_email(other_email), email_events)
    merged = merge(member, by_email)
    assert merged.customer_id == "loyalty:L1"

    stored = (json.dumps(merged.to_dict()) + json.dumps(columns(merged, NOW), default=str)
              + json.dumps(alias_keys(merged))).lower()
    for address in raw:
        assert address.strip().lower() not in stored
    assert set(merged.email_hashes) == {hash_email(a) for a in raw}
    assert alias_keys(merged) == sorted("email:" + h for h in merged.email_hashes)  # not its own key


# --- merge details -------------------------------------------------------------------------------

def click(event_id, at, key_fields, session="s1", kind="page_view", category=None):
    return Event(event_id=event_id, source="clickstream", type=kind, occurred_at=at, session_id=session,
                 category=category, **key_fields)


def test_merge_records_the_absorbed_key_and_starts_over_for_segments():
    anon = fold_all("anon:a1", [click("e1", NOW - 10, {"anonymous_id": "a1"})])
    customer = fold_all("c1", [click("e2", NOW - 5, {"customer_id": "c1"})])
    customer.segments = {"buyers": NOW - 5}
    customer.next_check_at = NOW + 1
    anon.segments = {"browsers": NOW - 10}
    merged = merge(anon, customer)
    assert merged.customer_id == "c1"
    assert "anon:a1" in alias_keys(merged) and "c1" not in alias_keys(merged)
    assert merged.segments == {"buyers": NOW - 5}
    assert merged.segments is not customer.segments
    assert merged.next_check_at is None
    assert merged.version == customer.version + 1
    assert merged.updated_at == NOW
    # one session seen under both keys (browsing, then logging in) is one session
    assert merged.sessions_count == 1 and merged.events_count == 2 and merged.page_views_count == 2


def test_absorbed_key_is_recorded_even_without_events_naming_it():
    for key, field, value in (("anon:x", "anonymous_ids", "x"), ("email:h", "email_hashes", "h"),
                              ("loyalty:L9", "loyalty_ids", "L9")):
        merged = merge_profiles(new_profile("c1"), new_profile(key), half_life_days=HALF_LIFE)
        assert getattr(merged, field) == [value]
        assert alias_keys(merged) == [key]


def test_an_event_folded_into_both_counts_once_in_events_count():
    event = click("e1", NOW, {"anonymous_id": "a1"}, kind="remove_from_cart")
    merged = merge(fold_all("anon:a1", [event]), fold_all("anon:a2", [event]))
    assert merged.events_count == 1 and merged.sessions_count == 1 and merged.recent_event_ids == [id_digest("e1")]


def test_recent_ids_are_trimmed_to_the_windows():
    a = fold_all("anon:a1", [click(f"a{i}", NOW - i, {"anonymous_id": "a1"}, session=f"sa{i}") for i in range(40)])
    b = fold_all("anon:a2", [click(f"b{i}", NOW - i, {"anonymous_id": "a2"}, session=f"sb{i}") for i in range(40)])
    merged = merge_profiles(a, b, half_life_days=HALF_LIFE, dedup_window=50)
    assert len(merged.recent_event_ids) == 50 and len(set(merged.recent_event_ids)) == 50
    assert len(merged.recent_sessions) == 16
    assert merged.events_count == 80 and merged.sessions_count == 80


def test_affinity_is_decayed_to_a_common_instant():
    a, b = new_profile("anon:a1"), new_profile("anon:a2")
    a.affinity = {"cookware": [4.0, NOW - 30 * DAY_MS]}
    b.affinity = {"cookware": [1.0, NOW], "books": [2.0, NOW - DAY_MS]}
    merged = merge(a, b)
    assert merged.affinity == {"cookware": [pytest.approx(3.0), NOW], "books": [2.0, NOW - DAY_MS]}


def test_old_orders_leave_the_history_relative_to_the_latest_time():
    a, b = new_profile("anon:a1"), new_profile("c1")
    a.orders, a.updated_at = [[NOW - 400 * DAY_MS, 5.0, 1]], NOW - 300 * DAY_MS
    b.orders, b.updated_at = [[NOW - 10 * DAY_MS, 7.0, 1], [NOW - DAY_MS, -2.0, 0]], NOW
    merged = merge(a, b)
    assert merged.orders == [[NOW - 10 * DAY_MS, 7.0, 1], [NOW - DAY_MS, -2.0, 0]]


def test_slot_ties_are_broken_by_value_the_same_both_ways():
    a, b = new_profile("anon:a1"), new_profile("anon:a2")
    a.nps, b.nps = [NOW, 3], [NOW, 9]
    a.traits, b.traits = {"city": [NOW, "Lyon"]}, {"city": [NOW, "Oslo"], "name": [NOW - 1, "x"]}
    a.surveys, b.surveys = {"q": [NOW, ["a"], []]}, {"q": [NOW, ["b"], []]}
    one = merge_profiles(a, b, half_life_days=HALF_LIFE)
    other = merge_profiles(b, a, half_life_days=HALF_LIFE)
    for merged in (one, other):
        assert merged.nps == [NOW, 9]
        assert merged.traits == {"city": [NOW, "Oslo"], "name": [NOW - 1, "x"]}
        assert merged.surveys == {"q": [NOW, ["b"], []]}


def test_two_customers_or_one_key_are_refused():
    with pytest.raises(ValueError):
        merge_profiles(new_profile("c1"), new_profile("c2"), half_life_days=HALF_LIFE)
    with pytest.raises(ValueError):
        merge_profiles(new_profile("anon:a1"), new_profile("anon:a1"), half_life_days=HALF_LIFE)


def test_empty_profiles_merge_to_an_empty_profile():
    merged = merge(new_profile("anon:a1"), new_profile("email:h"))
    expected = ProfileState(customer_id="email:h", anonymous_ids=["a1"], email_hashes=["h"], version=1)
    assert merged == expected


# --- keys, kinds and the conflict rule -----------------------------------------------------------

def test_identifiers_of_an_event_strongest_first():
    event = Event(event_id="e", source="crm", type="identify", occurred_at=NOW, customer_id="c1",
                  anonymous_id="a1", email_hash="h", loyalty_id="L1")
    assert identifiers_of(event) == ["c1", "loyalty:L1", "email:h", "anon:a1"]
    assert [kind_of(k) for k in identifiers_of(event)] == ["customer", "loyalty", "email", "anonymous"]
    assert [strength(k) for k in identifiers_of(event)] == [3, 2, 1, 0]
    only_anon = Event(event_id="e", source="crm", type="identify", occurred_at=NOW, anonymous_id="a1")
    assert identifiers_of(only_anon) == ["anon:a1"]


@given(st.fixed_dictionaries({}, optional={"customer_id": st.sampled_from(("c1", "c2")),
                                           "loyalty_id": st.just("L1"), "email_hash": st.just("h"),
                                           "anonymous_id": st.just("a1")}))
def test_first_identifier_is_the_routing_key(ids):
    event = Event(event_id="e", source="crm", type="identify", occurred_at=NOW, **ids)
    keys = identifiers_of(event)
    assert (keys[0] if keys else None) == routing_key(customer_id=event.customer_id, loyalty_id=event.loyalty_id,
                                                      email_hash=event.email_hash,
                                                      anonymous_id=event.anonymous_id)
    assert [strength(k) for k in keys] == sorted((strength(k) for k in keys), reverse=True)


keys = st.one_of(st.sampled_from(("c1", "c2", "c10")), st.sampled_from(("L1", "L2")).map("loyalty:".__add__),
                 st.sampled_from(("aa", "ab", "b")).map("email:".__add__),
                 st.sampled_from(("a1", "a2", "z")).map("anon:".__add__))


@given(keys, keys)
def test_conflict_rule(a, b):
    kept = survivor(a, b)
    assert kept == survivor(b, a)
    if a == b:
        assert kept == a
    elif kind_of(a) == kind_of(b) == "customer":
        assert kept is None
    elif strength(a) != strength(b):
        assert kept == (a if strength(a) > strength(b) else b)
    else:
        assert kept == min(a, b)


@given(st.lists(keys, min_size=1, max_size=6), st.randoms(use_true_random=False))
def test_links_in_any_order_end_at_the_same_key(linked, rnd):
    customers = {k for k in linked if kind_of(k) == "customer"}
    if len(customers) > 1:
        assert survivor_of(linked) is None
        return
    order = shuffled(linked, rnd)
    assert reduce(survivor, order) == survivor_of(linked) == reduce(survivor, linked)
    assert strength(survivor_of(linked)) == max(strength(k) for k in linked)


@given(st.permutations(["anon:a1", "email:h", "loyalty:L1", "c1"]))
def test_a_chain_of_links_ends_at_the_customer(chain):
    assert reduce(survivor, chain) == "c1"
    assert survivor_of(chain) == "c1"
    assert survivor_of([]) is None


def test_survivor_examples():
    assert survivor("anon:b", "anon:a") == "anon:a"
    assert survivor("email:x", "anon:a") == "email:x"
    assert survivor("loyalty:9", "email:0") == "loyalty:9"
    assert survivor("c1", "loyalty:1") == "c1"
    assert survivor("c1", "c2") is None
    assert survivor("c1", "c1") == "c1"
