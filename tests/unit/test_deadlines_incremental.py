"""The incremental next check (deadlines.DeadlineCache, processor.schedule): after any sequence of events,
timers and clock moves, it gives the answer next_check_at gives from scratch."""

from datetime import UTC, datetime
from pathlib import Path

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from pipeline import processor
from pipeline.events import Event, Item
from pipeline.processor import Config, advance, schedule, step
from pipeline.profile import DAY_MS, ProfileState, columns
from pipeline.segments import deadlines
from pipeline.segments.deadlines import DeadlineCache, next_check_at
from pipeline.segments.definitions import Segment, load_segments, parse_segments

T0 = 1_790_000_000_000  # 2026-09-21T13:33:20Z
HL = 30.0
DEFAULT = load_segments(None)
BENCH_50 = load_segments(Path(__file__).resolve().parents[2] / "benchmarks" / "segments_50.yaml")
# every kind of input a segment's answer can depend on: held columns, consent, orders, some affinities
# (subscripts, mapContains), the whole map (top_category, notEmpty), now() in dateDiff of several units
# and with INTERVAL, literals on either side
MIXED = parse_segments("""segments:
  - id: books_known
    where: mapContains(category_affinity, 'books') AND category_affinity['books'] >= 0.2
  - id: fortnight
    where: dateDiff('week', last_seen_at, now()) < 2
  - id: first_hours
    where: dateDiff('hour', first_seen_at, now()) >= 30 AND orders_30d = 0
  - id: nps_recent
    where: isNotNull(nps_at) AND 3 >= dateDiff('day', nps_at, now())
  - id: consented_cooks
    where: has(survey_interests, 'cooking_classes') AND category_affinity['cookware'] >= 0.1
    requires_consent: marketing
  - id: any_affinity_buyer
    where: notEmpty(category_affinity) AND orders_90d >= 1
  - id: top_garden_recent
    where: top_category = 'garden' OR last_seen_at >= now() - INTERVAL 36 HOUR
  - id: lapsed_value
    where: lifetime_value > 50 AND spend_90d < 20
""")
SETS = {"default": DEFAULT, "bench": BENCH_50, "mixed": MIXED}
CATEGORIES = ("books", "cookware", "garden")

offsets = st.integers(min_value=-60 * DAY_MS, max_value=2 * DAY_MS)  # event time, from the clock
clock_moves = st.integers(min_value=-DAY_MS, max_value=20 * DAY_MS)  # mostly forward; sometimes back
ops = st.lists(st.one_of(
    st.tuples(st.just("order"), clock_moves, offsets, st.floats(1, 300), st.booleans(), st.sampled_from(CATEGORIES)),
    st.tuples(st.just("click"), clock_moves, offsets, st.sampled_from(("product_view", "add_to_cart", "page_view")),
              st.sampled_from(CATEGORIES)),
    st.tuples(st.just("survey"), clock_moves, offsets, st.booleans(), st.integers(0, 10) | st.none()),
    st.tuples(st.just("consent"), clock_moves, offsets, st.booleans()),
    st.tuples(st.just("timers"), clock_moves),  # no event: time passes, due transitions are applied
), min_size=1, max_size=14)


def event(i: int, op: tuple, now: int) -> Event | None:
    kind, at = op[0], now + op[2] if len(op) > 2 else now
    if kind == "order":
        _, _, _, amount, refund, category = op
        return Event(event_id=f"e{i}", source="pos", type="refund" if refund else "purchase", occurred_at=at,
                     customer_id="c1", total=round(amount, 2), channel="store",
                     items=[Item("sku", category, 1, round(amount, 2))])
    if kind == "click":
        return Event(event_id=f"e{i}", source="clickstream", type=op[3], occurred_at=at, customer_id="c1",
                     session_id=f"s{i % 3}", category=op[4])
    if kind == "survey":
        return Event(event_id=f"e{i}", source="surveys", type="survey", occurred_at=at, customer_id="c1",
                     survey_id="q", interests=["cooking_classes"] if op[3] else [], nps=op[4])
    if kind == "consent":
        return Event(event_id=f"e{i}", source="crm", type="consent", occurred_at=at, customer_id="c1",
                     marketing=op[3])
    return None


def from_scratch(state: ProfileState, segments: list[Segment], now: int) -> int | None:
    due = next_check_at(state, segments, now, half_life_days=HL)
    return now + 1 if due is not None and due <= now else due


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.sampled_from(sorted(SETS)))
# a click moves one category: segments on another keep their answer, top_category's are searched again
@example(ops=[("click", DAY_MS, 0, "add_to_cart", "books"), ("click", DAY_MS, 0, "page_view", "cookware"),
              ("click", 3 * DAY_MS, -DAY_MS, "product_view", "garden")], which="mixed")
# the clock goes back: nothing found at a later instant may be reused
@example(ops=[("order", 0, 0, 100.0, False, "books"), ("timers", 40 * DAY_MS - 1), ("timers", -DAY_MS)],
         which="mixed")
def test_incremental_equals_from_scratch(ops, which):
    """A cache of its own, asked after every event and clock move: the same answer as from scratch,
    also for the inexact forms (a bound or cap reached is searched again when it could be the answer)."""
    segments = SETS[which]
    cache = DeadlineCache()
    state: ProfileState | None = None
    now = T0
    for i, op in enumerate(ops):
        now += op[1]
        e = event(i, op, now)
        if e is not None:
            state = step(state, "c1", e, now, segments).state  # incremental evaluation (Config's half-life is HL)
        if state is None:
            continue
        row = columns(state, now, half_life_days=HL)
        assert cache.next_check_at(state, segments, now, half_life_days=HL, row=row) == \
            next_check_at(state, segments, now, half_life_days=HL), (i, op)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops, st.sampled_from(sorted(SETS)))
def test_schedule_as_the_worker_calls_it_equals_from_scratch(ops, which):
    """Through processor.schedule (its process-wide cache and the row the evaluation left), with the
    worker's order of calls: transitions due before an event applied first (advance, which schedules at
    each instant), the event stepped, the next check scheduled."""
    segments = SETS[which]
    config = Config()
    state: ProfileState | None = None
    now = T0
    for i, op in enumerate(ops):
        now = max(now, now + op[1])  # the worker's clock does not go back
        if state is not None and state.next_check_at is not None and state.next_check_at <= now:
            advance(state, now, segments, config)  # each instant scheduled incrementally, checked below
        e = event(i, op, now)
        if e is not None:
            result = step(state, "c1", e, now, segments, config)
            state = result.state
            if result.duplicate:
                continue
        if state is None:
            continue
        assert schedule(state, now, segments, config) == from_scratch(state, segments, now), (i, op)


def test_a_changed_input_of_one_segment_searches_only_the_segments_that_read_it():
    segments = MIXED
    cache = DeadlineCache()
    state = step(None, "c1", Event(event_id="o", source="pos", type="purchase", occurred_at=T0, customer_id="c1",
                                   total=80.0, channel="store", items=[Item("s", "books", 1, 80.0)]),
                 T0, segments).state
    cache.next_check_at(state, segments, T0, half_life_days=HL)
    searched = cache.searched
    # an NPS answer: only nps_recent reads nps_at (last_seen_at moves too: fortnight, top_garden_recent)
    state = step(state, "c1", Event(event_id="n", source="surveys", type="survey", occurred_at=T0 + 1000,
                                    customer_id="c1", survey_id="q", nps=9), T0 + 1000, segments).state
    reused = cache.reused
    assert cache.next_check_at(state, segments, T0 + 1000, half_life_days=HL) == \
        next_check_at(state, segments, T0 + 1000, half_life_days=HL)
    assert cache.searched - searched <= 4  # nps_recent, fortnight, top_garden_recent, first_hours at most
    assert cache.reused - reused >= 3  # books_known, any_affinity_buyer, lapsed_value kept their answers


def test_entries_are_checked_not_trusted():
    """Another profile under the same customer id, or other definitions: nothing is reused wrongly."""
    cache = DeadlineCache()
    a = step(None, "c1", Event(event_id="o", source="pos", type="purchase", occurred_at=T0 - 10 * DAY_MS,
                               customer_id="c1", total=80.0, channel="store", items=[Item("s", "books", 1, 80.0)]),
             T0, DEFAULT).state
    b = step(None, "c1", Event(event_id="p", source="pos", type="purchase", occurred_at=T0 - 2 * DAY_MS,
                               customer_id="c1", total=80.0, channel="store", items=[Item("s", "books", 1, 80.0)]),
             T0, DEFAULT).state
    for state in (a, b, a):
        assert cache.next_check_at(state, DEFAULT, T0, half_life_days=HL) == \
            next_check_at(state, DEFAULT, T0, half_life_days=HL)
    for segments in (MIXED, DEFAULT):
        assert cache.next_check_at(a, segments, T0, half_life_days=HL) == \
            next_check_at(a, segments, T0, half_life_days=HL)
    assert cache.next_check_at(a, DEFAULT, T0, half_life_days=15.0) == \
        next_check_at(a, DEFAULT, T0, half_life_days=15.0)


def test_the_cache_is_bounded():
    cache = DeadlineCache(max_profiles=3)
    for i in range(10):
        state = step(None, f"c{i}", Event(event_id="o", source="pos", type="purchase", occurred_at=T0,
                                          customer_id=f"c{i}", total=10.0, channel="store"), T0, DEFAULT).state
        cache.next_check_at(state, DEFAULT, T0, half_life_days=HL)
    assert len(cache) == 3


def test_a_step_hands_schedule_the_columns_it_evaluated():
    """``StepResult.evaluated`` is the row at the step's instant (also when nothing changed), and
    schedule() given it answers as schedule() computing the row itself."""
    config = Config()
    state = step(None, "c1", Event(event_id="o", source="pos", type="purchase", occurred_at=T0, customer_id="c1",
                                   total=10.0, channel="store"), T0, DEFAULT, config).state
    result = step(state, "c1", Event(event_id="c", source="clickstream", type="page_view", occurred_at=T0,
                                     customer_id="c1", category="books"), T0, DEFAULT, config)
    assert result.evaluated == columns(result.state, T0, half_life_days=config.half_life_days)
    later = T0 + 3 * DAY_MS
    unchanged = processor.reevaluate(result.state, later, DEFAULT, config)
    assert unchanged.row is None or unchanged.changes
    assert unchanged.evaluated == columns(result.state, later, half_life_days=config.half_life_days)
    copy = ProfileState.from_dict(result.state.to_dict())
    given = schedule(result.state, later, DEFAULT, config, row=unchanged.evaluated)
    assert given == schedule(copy, later, DEFAULT, config)


def test_dateDiff_guess_lands_on_the_flip():
    """The closed form for dateDiff(unit, x, now()) OP n is where the search finds the flip."""
    for where, unit_ms in (("dateDiff('day', last_seen_at, now()) <= 7", DAY_MS),
                           ("dateDiff('hour', last_seen_at, now()) > 5", 3_600_000),
                           ("30 >= dateDiff('day', last_seen_at, now())", DAY_MS)):
        segments = parse_segments(f"segments:\n  - id: s\n    where: \"{where}\"\n")
        plan = deadlines.plan_of(segments[0].predicate)
        (probe,) = plan.probes
        assert probe.guess is not None
        state = step(None, "c1", Event(event_id="c", source="clickstream", type="page_view",
                                       occurred_at=T0 - 3_600_000, customer_id="c1"), T0, segments).state
        row = deadlines._ms_row(columns(state, T0, half_life_days=HL))  # probes read date-times as epoch ms
        due = next_check_at(state, segments, T0, half_life_days=HL)
        assert due == probe.guess(row) and due % unit_ms == 0, where
        at = datetime.fromtimestamp(due / 1000, tz=UTC)
        assert at.minute == 0 and at.second == 0
