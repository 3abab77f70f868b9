import functools
import json

import pytest

from pipeline.errors import DefinitionError
from pipeline.segments.definitions import parse_segments
from pipeline.segments.live import MANIFEST_KEY, DefinitionLog, apply_records, definition_fingerprint, set_fingerprint

A = parse_segments("segments:\n  - id: a\n    where: orders_count >= 1\n  - id: b\n    where: nps >= 9\n")
B = parse_segments("segments:\n  - id: a\n    where: orders_count >= 2\n")


def test_a_set_is_adopted_only_when_its_manifest_is_whole():
    log = DefinitionLog()
    records = apply_records(A, [])
    assert records[-1][0] == MANIFEST_KEY
    manifest = records[-1]
    assert log.feed(*manifest) is None  # the manifest read before the definitions it names
    adopted = None
    for key, value in records[:-1]:
        adopted = log.feed(key, value) or adopted
    assert [s.id for s in adopted] == ["a", "b"] and set_fingerprint(adopted) == set_fingerprint(A)
    assert log.feed(*manifest) is None  # the same set again: nothing new


def test_an_edit_and_a_removal_make_a_new_set():
    log = DefinitionLog()
    for key, value in apply_records(A, []):
        log.feed(key, value)
    records = apply_records(B, ["a", "b"])
    assert ("b", None) in records
    new = None
    for key, value in records:
        new = log.feed(key, value) or new
    assert [(s.id, s.where) for s in new] == [("a", "orders_count >= 2")]
    assert set_fingerprint(new) != set_fingerprint(A)


def test_a_stale_definition_does_not_complete_a_newer_manifest():
    log = DefinitionLog()
    records = dict(apply_records(B, []))
    log.feed(MANIFEST_KEY, records[MANIFEST_KEY])
    assert log.feed("a", json.dumps({"id": "a", "where": "orders_count >= 1"}).encode()) is None
    assert [s.where for s in log.feed("a", records["a"])] == ["orders_count >= 2"]


def test_bad_definitions_on_the_topic_are_refused_with_a_position():
    log = DefinitionLog()
    bad = {"id": "a", "where": "orders_count >= 'x' AND"}
    log.feed("a", json.dumps(bad).encode())
    with pytest.raises(DefinitionError):
        log.feed(MANIFEST_KEY, json.dumps({"segments": {"a": definition_fingerprint(bad)}}).encode())


def test_an_empty_set_is_refused():
    with pytest.raises(DefinitionError, match="empty"):
        apply_records([], ["a"])


# The backfill fast path (pipeline.segments.live.backfill) against a full evaluation, on profiles
# folded from generated traffic under the built-in set.

BASE_EXTRA = """
  - id: recent_books
    where: category_affinity['books'] >= 0.2 AND dateDiff('day', last_seen_at, now()) <= 20
  - id: month_buyers
    where: orders_30d >= 1
"""
ADDED = """
  - id: new_lapsing
    where: orders_count >= 1 AND dateDiff('day', last_purchase_at, now()) BETWEEN 10 AND 40
  - id: new_cooks
    where: category_affinity['cookware'] >= 0.1
  - id: new_everyone
    where: events_count >= 0
  - id: new_versioned
    where: version >= 5  # reads what evaluation writes: evaluated again on every backfill
  - id: new_windows
    where: spend_90d >= 100 OR (orders_365d >= 2 AND has(survey_interests, 'cooking_classes'))
  - id: new_gated
    where: has(survey_interests, 'cooking_classes') AND category_affinity['cookware'] >= 0.2 AND nps >= 5
    requires_consent: marketing
"""


def _sets():
    from pipeline.segments.definitions import load_segments

    base = [*load_segments(None), *parse_segments("segments:" + BASE_EXTRA)]
    added = [*base, *parse_segments("segments:" + ADDED)]
    edited = [s for s in added if s.id != "recent_books"] + parse_segments(
        "segments:\n  - id: recent_books\n    where: category_affinity['books'] >= 0.05\n")
    removed = [s for s in added if s.id not in ("month_buyers", "new_cooks")]
    selective = [*base, *(s for s in added if s.id in ("new_lapsing", "new_cooks"))]
    windows = [*base, *(s for s in added if s.id in ("new_windows", "new_gated"))]
    return base, {"added": added, "selective": selective, "edited": edited, "removed": removed,
                  "windows": windows}


@functools.lru_cache(maxsize=1)
def _profiles(customers=120, events=4000):
    """Profiles as the worker keeps them under the base set (built once: the folding is the slow part)."""
    from pipeline.decode import decode
    from pipeline.events import DeadLetter
    from pipeline.generate import traffic
    from pipeline.identity import routing_key
    from pipeline.processor import advance, schedule, step
    from pipeline.profile import DAY_MS

    segments, _ = _sets()
    now = 1_780_000_000_000
    start = now - 120 * DAY_MS
    states = {}
    for message in traffic(customers=customers, seed=3, start_ms=start, step_ms=120 * DAY_MS // events,
                           extended=True):
        event = decode(message.topic, message.value, now_ms=now)
        if isinstance(event, DeadLetter):
            continue
        key = routing_key(customer_id=event.customer_id, loyalty_id=event.loyalty_id, email_hash=event.email_hash,
                          anonymous_id=event.anonymous_id)
        if not key:
            continue
        state = states.get(key)
        if state is not None:  # as the worker: what time changed first, then the event, then the next check
            advance(state, event.occurred_at, segments)
        states[key] = step(state, key, event, event.occurred_at, segments).state
        schedule(states[key], event.occurred_at, segments)
        if event.occurred_at >= now - 60_000:
            break
    return tuple(states.values()), now


@pytest.mark.parametrize("kind", ["added", "selective", "edited", "removed", "windows"])
def test_a_backfill_gives_the_memberships_of_a_full_evaluation(kind):
    from pipeline.processor import Config, advance, reevaluate, schedule
    from pipeline.profile import DAY_MS, ProfileState
    from pipeline.profile_encoding import encode
    from pipeline.segments.deadlines import next_check_at
    from pipeline.segments.live import Scan, SetHistory, backfill

    base, sets = _sets()
    new = sets[kind]
    history = SetHistory()
    old_fp, new_fp = history.add(base), history.add(new)
    change = history.change(old_fp, new_fp)
    assert change is not None and change.additions_only == (kind in ("added", "selective", "windows"))
    config = Config()
    profiles, now = _profiles()
    assert len(profiles) > 100
    fast_path = written = checks = partial = 0
    scan = Scan(new, new_fp, history, config)  # the worker's path: from the stored bytes, read partly
    partly = Scan(new, new_fp, history, config)
    partly.whole_above = partly.whole_above_gates = None  # never read whole first (these profiles are mostly
    # written: scan reads them whole)
    for template in profiles:
        template = ProfileState.from_dict({**template.to_dict(), "definitions": old_fp})
        value = encode(template)
        for at in (now, now + 3 * DAY_MS, now + 25 * DAY_MS):  # a backfill some time after the last event
            fast = ProfileState.from_dict(template.to_dict())
            full = ProfileState.from_dict(template.to_dict())
            fast_path += fast.next_check_at is None or fast.next_check_at > at
            done = backfill(fast, at, new, new_fp, change, config)
            # the reference: what the worker did before, time's transitions then every segment again
            changes = advance(full, at, new, config).changes
            changes += reevaluate(full, at, new, config, cause="definition_changed").changes
            schedule(full, at, new, config)
            assert fast.segments == full.segments, (kind, template.customer_id, at)
            assert fast.version == full.version
            assert [c.to_dict() for c in done.result.changes] == [c.to_dict() for c in changes]
            assert (done.result.row is not None) == bool(done.result.changes)
            if not done.write:  # left as stored, under the older set
                assert fast.to_dict() == template.to_dict() and not done.result.changes
            else:
                assert fast.definitions == new_fp and fast.next_check_at == done.due
            for via in (scan.check(value, at), partly.check(value, at)):
                assert via.done is not None and via.due == done.due
                assert (via.done.write, via.done.full) == (done.write, done.full)
                assert [c.to_dict() for c in via.done.result.changes] == [c.to_dict() for c in done.result.changes]
                assert via.done.result.row == done.result.row
                if done.write:
                    assert via.state == fast  # the whole profile, as written
            partial += not done.write and not hasattr(via.state, "traits")  # a field no segment reads: not decoded
            written += done.write
            checks += 1
            exact = next_check_at(fast, new, at, half_life_days=config.half_life_days, sweep_ms=config.sweep_ms)
            if done.due is not None:  # sound: never later than the full schedule
                assert exact is None or done.due <= exact
            else:
                assert exact is None
            # and stays exact as time passes: both follow their own next checks for 60 days (the
            # fast one from the timer index's instant, as the worker's timer does)
            fast.next_check_at = done.due
            advance(fast, at + 60 * DAY_MS, new, config)
            advance(full, at + 60 * DAY_MS, new, config)
            assert fast.segments.keys() == full.segments.keys()
    assert fast_path > len(profiles)  # most profiles took the fast path
    assert scan.fallbacks == partly.fallbacks == 0  # decode_fields read every field the fast path needed
    if kind in ("selective", "windows"):  # no segment of theirs needs the whole row
        assert partial >= (checks - written) // 2
    if kind == "selective":
        assert checks - written >= checks // 10  # left as stored: no write, no output


def test_an_unknown_older_set_means_a_full_evaluation():
    from pipeline.segments.live import SetHistory

    history = SetHistory(limit=2)
    first = history.add(A)
    history.add(B)
    history.add(parse_segments("segments:\n  - id: c\n    where: nps >= 1\n"))
    assert first not in history
    assert history.change(first, set_fingerprint(B)) is None
    assert history.change(None, set_fingerprint(B)) is None


def test_the_columns_a_backfill_computes_are_those_of_profile_columns():
    from pipeline.profile import DAY_MS, columns
    from pipeline.profile_encoding import decode_fields, encode
    from pipeline.segments.columns import PROFILE_COLUMNS
    from pipeline.segments.live import _COLUMN_FIELDS, columns_for

    profiles, now = _profiles()
    for state in profiles[:60]:
        value = encode(state)
        for at in (now, now + 40 * DAY_MS):
            full = columns(state, at, half_life_days=30.0)
            for name in PROFILE_COLUMNS:
                assert columns_for(state, at, frozenset({name}), 30.0)[name] == full[name], name
                if name in _COLUMN_FIELDS:  # from only the fields listed for it (another raises AttributeError)
                    partial = decode_fields(value, frozenset(_COLUMN_FIELDS[name]))
                    assert columns_for(partial, at, frozenset({name}), 30.0)[name] == full[name], name
            assert columns_for(state, at, frozenset(PROFILE_COLUMNS), 30.0) == full


def test_gates_are_the_and_terms_time_cannot_change():
    from pipeline.segments.live import _gates

    where = ("has(survey_interests, 'cooking_classes') AND category_affinity['cookware'] >= 0.2 AND nps >= 5 "
             "AND dateDiff('day', last_seen_at, now()) <= 30 AND (orders_30d >= 1 OR orders_count >= 3) "
             "AND version >= 2")
    assert [g.sql for g in _gates(where)] == ["has(survey_interests, 'cooking_classes')", "nps >= 5"]
    assert _gates("orders_count >= 1 OR nps >= 5")[0].columns == {"orders_count", "nps"}
    assert _gates("orders_30d >= 1") == ()
