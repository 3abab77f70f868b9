"""Live segment definitions: applied to a running pipeline through a compacted topic, no restart.

``pipeline segments apply FILE_OR_DIR`` validates the definitions, then publishes one record per
segment to ``segment-definitions`` (key: segment id, value: its definition as JSON), a tombstone
for each segment of the previous set that is gone, and last a manifest (key ``__manifest__``)
naming every id of the new set with a fingerprint of each definition. A worker adopts a set only
when it has read a manifest and the very definitions it names, so a half-read apply is never
used. Every profile remembers the fingerprint of the set it was last evaluated under; after a
change (or a restart that finds profiles evaluated under another set) the worker re-evaluates
them — a new segment is evaluated over every existing profile, an edited one again, a removed
one exits all its members — with cause ``definition_changed``.

Reading "to the end" of the topic is never decided from end offsets (the embedded broker
under-reports them, DESIGN §3): a worker that starts writes a sentinel record with a key of its
own and reads until it sees it.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from functools import lru_cache
from typing import Any

from pipeline.errors import DefinitionError
from pipeline.processor import Config, StepResult, advance, reevaluate, schedule, to_datetime
from pipeline.profile import DAY_MS, WINDOWS_DAYS, ProfileState, _ms_to_dt, affinities, columns
from pipeline.profile_encoding import decode, decode_fields
from pipeline.segments.columns import PROFILE_COLUMNS
from pipeline.segments.compiler import Compiled, compile_where
from pipeline.segments.deadlines import TIME_COLUMNS, next_check_at, plan_of
from pipeline.segments.definitions import Segment, parse_segments
from pipeline.segments.membership import diff, evaluate

MANIFEST_KEY = "__manifest__"
SENTINEL_PREFIX = "__sentinel__"

log = logging.getLogger(__name__)


def definition_record(segment: Segment) -> dict[str, Any]:
    return {"id": segment.id, "description": segment.description, "where": segment.where,
            "requires_consent": segment.requires_consent}


def definition_fingerprint(record: dict[str, Any]) -> str:
    text = json.dumps({k: record.get(k) for k in ("id", "where", "requires_consent")}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def set_fingerprint(segments: Sequence[Segment]) -> str:
    """One fingerprint for a set of definitions (order-independent): what a profile was evaluated under."""
    parts = sorted(definition_fingerprint(definition_record(s)) for s in segments)
    return hashlib.sha256(",".join(parts).encode()).hexdigest()[:16]


def compile_records(records: Sequence[dict[str, Any]]) -> list[Segment]:
    """Segments from published records, validated exactly as a YAML file is."""
    text = json.dumps({"segments": [
        {k: v for k, v in r.items() if k in ("id", "description", "where", "requires_consent") and v is not None}
        for r in records]})
    return parse_segments(text, source="<segment-definitions topic>")  # JSON is YAML


@dataclass
class DefinitionLog:
    """Folds the records of the definitions topic; yields a complete set when a manifest is whole."""

    records: dict[str, dict[str, Any]] = field(default_factory=dict)
    manifest: dict[str, str] | None = None  # id -> fingerprint
    adopted: str | None = None  # fingerprint of the set last returned

    def feed(self, key: str, value: bytes | None) -> list[Segment] | None:
        """Take one record; return the new complete set when this record completes one."""
        if key.startswith(SENTINEL_PREFIX):
            return None
        if key == MANIFEST_KEY:
            self.manifest = json.loads(value)["segments"] if value else None
        elif value is None:
            self.records.pop(key, None)
        else:
            self.records[key] = json.loads(value)
        return self._complete()

    def _complete(self) -> list[Segment] | None:
        if self.manifest is None:
            return None
        chosen = []
        for seg_id, fingerprint in sorted(self.manifest.items()):
            record = self.records.get(seg_id)
            if record is None or definition_fingerprint(record) != fingerprint:
                return None  # the manifest is ahead of the definitions read so far
            chosen.append(record)
        segments = compile_records(chosen)
        fingerprint = set_fingerprint(segments)
        if fingerprint == self.adopted:
            return None
        self.adopted = fingerprint
        return segments


def apply_records(segments: Sequence[Segment], current_ids: Sequence[str]) -> list[tuple[str, bytes | None]]:
    """The records that apply ``segments`` over a topic holding ``current_ids``: definitions,
    tombstones for removed ids, then the manifest (always last)."""
    if not segments:
        raise DefinitionError("refusing to apply an empty set of segments (it would exit every member)")
    out: list[tuple[str, bytes | None]] = []
    manifest = {}
    for segment in segments:
        record = definition_record(segment)
        manifest[segment.id] = definition_fingerprint(record)
        out.append((segment.id, json.dumps(record).encode()))
    for gone in sorted(set(current_ids) - set(manifest)):
        out.append((gone, None))
    out.append((MANIFEST_KEY, json.dumps({"segments": manifest}).encode()))
    return out


def publish_definitions(bootstrap: Sequence[str], topic: str, segments: Sequence[Segment], *,
                        timeout: float = 60.0, options: dict[str, Any] | None = None,
                        ) -> tuple[list[str], list[str], list[str]]:
    """Apply ``segments`` on the definitions topic; returns (added, changed, removed) ids."""
    import time
    import uuid

    from kafka import KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.errors import KafkaError

    from pipeline.errors import BrokerError

    try:
        producer = KafkaProducer(bootstrap_servers=list(bootstrap), acks="all", **(options or {}))
        consumer = KafkaConsumer(bootstrap_servers=list(bootstrap), consumer_timeout_ms=500, **(options or {}))
    except KafkaError as exc:
        raise BrokerError(f"cannot reach the broker at {','.join(bootstrap)}: {exc}") from None
    try:
        sentinel = f"{SENTINEL_PREFIX}apply-{uuid.uuid4().hex}"
        producer.send(topic, key=sentinel.encode(), value=b"1", partition=0).get(timeout)
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        consumer.seek_to_beginning(partition)
        log = DefinitionLog()
        deadline = time.monotonic() + timeout
        seen_sentinel = False
        while not seen_sentinel:
            if time.monotonic() > deadline:
                raise BrokerError(f"could not read topic {topic} to its end within {timeout:.0f} s")
            for message in consumer:
                key = message.key.decode() if message.key else ""
                if key == sentinel:
                    seen_sentinel = True
                    break
                log.feed(key, message.value)
        before = {k: definition_fingerprint(r) for k, r in log.records.items()}
        records = apply_records(segments, sorted(before))
        for key, value in records:
            producer.send(topic, key=key.encode(), value=value, partition=0)
        producer.send(topic, key=sentinel.encode(), value=None, partition=0)  # compaction forgets it
        producer.flush(timeout)
    finally:
        producer.close()
        consumer.close()
    after = {s.id: definition_fingerprint(definition_record(s)) for s in segments}
    added = sorted(set(after) - set(before))
    changed = sorted(k for k in set(after) & set(before) if after[k] != before[k])
    removed = sorted(set(before) - set(after))
    return added, changed, removed


# Columns that evaluation itself writes: a segment reading one may change whenever another
# segment's membership does, so a backfill always evaluates it again.
SELF_COLUMNS = frozenset({"segments", "version", "updated_at"})


@dataclass(frozen=True)
class SetChange:
    """What a profile evaluated under an older set needs to be exact under the set in force."""

    evaluate: list[Segment]  # added or edited (or reading SELF_COLUMNS): evaluated afresh
    reads: frozenset[str]  # the columns they read (and consent, which gates membership)
    ids: frozenset[str]  # their ids
    defined: frozenset[str]  # every id of the set in force (a member of any other id exits)
    removed: frozenset[str]  # ids of the older set that are gone or edited
    fields: frozenset[str] | None = None  # the ProfileState fields the fast path reads (None: all of them)
    # Per evaluated segment, its top-level AND terms that read nothing time moves (compiled alone):
    # one false (or NULL) rules the segment out until an event, whatever the time (see open_segments).
    gates: tuple[tuple[Compiled, ...], ...] = ()
    gate_reads: frozenset[str] = frozenset()  # the columns the gates read (and consent)
    gate_fields: frozenset[str] | None = None  # the fields those columns read (None: all of them)
    _open: dict[int, list[Segment]] = field(default_factory=dict, compare=False, repr=False)

    @property
    def additions_only(self) -> bool:
        return not self.removed

    def open_segments(self, row: dict[str, Any], at: datetime) -> list[Segment]:
        """The evaluated segments the profile (``row`` holding ``gate_reads``) may belong to, now or
        later without an event: not those whose consent is missing or one of whose gates is not true
        (a constant false AND term; next_check_at has no instant for them either). One list object
        per outcome (next_check_at's planner caches per list)."""
        consent = row.get("consent_marketing") is True
        outcome = 0  # bit i: segment i stays open (a plain loop: this runs for every profile scanned)
        for i, (segment, gates) in enumerate(zip(self.evaluate, self.gates, strict=True)):
            if not consent and segment.requires_consent == "marketing":
                continue
            for gate in gates:
                if not gate.fn(row, at):  # the predicate's own truth (NULL, false, an error: not true)
                    break
            else:
                outcome |= 1 << i
        chosen = self._open.get(outcome)
        if chosen is None:
            chosen = self._open[outcome] = [s for i, s in enumerate(self.evaluate) if outcome >> i & 1]
        return chosen


def set_change(old: Sequence[Segment], new: Sequence[Segment]) -> SetChange:
    """From ``old`` to ``new``: the segments to evaluate again; the others (same id, same
    definition) keep their memberships and their next time-driven check."""
    before = {s.id: definition_fingerprint(definition_record(s)) for s in old}
    chosen = [s for s in new if before.get(s.id) != definition_fingerprint(definition_record(s))
              or s.predicate.columns & SELF_COLUMNS]
    now = {s.id: definition_fingerprint(definition_record(s)) for s in new}
    removed = frozenset(sid for sid, fp in before.items() if now.get(sid) != fp)
    reads = frozenset({"consent_marketing"}.union(*(s.predicate.columns for s in chosen)))
    gates = tuple(_gates(s.where) for s in chosen)
    gate_reads = frozenset({"consent_marketing"}.union(*(g.columns for terms in gates for g in terms)))
    return SetChange(chosen, reads, frozenset(s.id for s in chosen), frozenset(now), removed,
                     _fields_read(reads, chosen), gates, gate_reads, _fields_read(gate_reads, ()))


@lru_cache(maxsize=1024)
def _gates(where: str) -> tuple[Compiled, ...]:
    """The top-level AND terms of ``where`` that read no input moving with time (now(), windows,
    affinities, top_category) nor one evaluation writes (SELF_COLUMNS), each compiled on its own.
    Such a term keeps its value until an event; when it is not true, the whole predicate is not
    (an AND with a false or NULL term, or one that raises, which the predicate takes as false)."""
    out = []
    for term in compile_where(where).terms:
        try:
            compiled = compile_where(term.sql)
        except DefinitionError:  # not a condition on its own (e.g. a bare string): no gate from it
            continue
        if not compiled.uses_now and not compiled.columns & (TIME_COLUMNS | SELF_COLUMNS):
            out.append(compiled)
    return tuple(out)


class SetHistory:
    """The definition sets this worker had in force, by fingerprint (the latest ``limit``): a
    profile left under an older set (nothing changed for it, so nothing was written) is brought up
    to date by evaluating only what changed since. A set not kept here means a full evaluation."""

    def __init__(self, limit: int = 16) -> None:
        self.limit = limit
        self._sets: dict[str, list[Segment]] = {}
        self._changes: dict[tuple[str, str], SetChange] = {}
        self._scan: Scan | None = None

    def add(self, segments: Sequence[Segment]) -> str:
        fingerprint = set_fingerprint(segments)
        self._sets.pop(fingerprint, None)
        self._sets[fingerprint] = list(segments)  # latest last
        while len(self._sets) > self.limit:
            del self._sets[next(iter(self._sets))]
        return fingerprint

    def __contains__(self, fingerprint: object) -> bool:
        return fingerprint in self._sets

    def scan(self, segments: Sequence[Segment], fingerprint: str, config: Config) -> Scan:
        """The scan under the set ``fingerprint`` (``segments``), kept across the worker's chunks
        (what it learnt of the fields to read, and how many profiles are written)."""
        if self._scan is None or self._scan.fingerprint != fingerprint or self._scan.segments is not segments:
            self._scan = Scan(segments, fingerprint, self, config)
        return self._scan

    def change(self, old: str | None, new: str) -> SetChange | None:
        """What changed from set ``old`` to set ``new`` (None: either is unknown). Cached, so the
        segments to evaluate are one list object per pair (the deadline planner caches per list)."""
        if old is None or old not in self._sets or new not in self._sets:
            return None
        cached = self._changes.get((old, new))
        if cached is None:
            if len(self._changes) > 4 * self.limit:
                self._changes.clear()
            cached = self._changes[(old, new)] = set_change(self._sets[old], self._sets[new])
        return cached


def _window(state: ProfileState, now_ms: int, days: int) -> tuple[int, float]:
    start = now_ms - days * DAY_MS
    inside = [o for o in state.orders if start < o[0] <= now_ms]
    return sum(int(o[2]) for o in inside), round(sum(o[1] for o in inside), 2)


def _window_column(days: int, which: int) -> Callable[[ProfileState, int, float], Any]:
    return lambda s, t, h: _window(s, t, days)[which]


def _survey_sets(state: ProfileState) -> tuple[list[str], list[str]]:
    interests: set[str] = set()
    motivations: set[str] = set()
    for _, survey_interests, survey_motivations in state.surveys.values():
        interests.update(survey_interests)
        motivations.update(survey_motivations)
    return sorted(interests), sorted(motivations)


# What profile.columns gives for these columns, one at a time (a backfill evaluates one new segment:
# computing all 38 columns was a fifth of the scan). tests/unit/test_live.py checks each against
# profile.columns; a column not listed here means the full row.
_ONE_COLUMN: dict[str, Callable[[ProfileState, int, float], Any]] = {
    "customer_id": lambda s, t, h: s.customer_id,
    "first_seen_at": lambda s, t, h: _ms_to_dt(s.first_seen_at),
    "last_seen_at": lambda s, t, h: _ms_to_dt(s.last_seen_at),
    "events_count": lambda s, t, h: s.events_count,
    "sessions_count": lambda s, t, h: s.sessions_count,
    "page_views_count": lambda s, t, h: s.page_views_count,
    "product_views_count": lambda s, t, h: s.product_views_count,
    "cart_adds_count": lambda s, t, h: s.cart_adds_count,
    "orders_count": lambda s, t, h: s.orders_count,
    "lifetime_value": lambda s, t, h: round(s.lifetime_value, 2),
    "first_purchase_at": lambda s, t, h: _ms_to_dt(s.first_purchase_at),
    "last_purchase_at": lambda s, t, h: _ms_to_dt(s.last_purchase_at),
    **{f"orders_{d}d": _window_column(d, 0) for d in WINDOWS_DAYS},
    **{f"spend_{d}d": _window_column(d, 1) for d in WINDOWS_DAYS},
    "category_affinity": lambda s, t, h: affinities(s, t, h),
    "email_opens_count": lambda s, t, h: s.email_opens_count,
    "email_clicks_count": lambda s, t, h: s.email_clicks_count,
    "unsubscribed": lambda s, t, h: bool(s.unsubscribed[1]),
    "open_tickets_count": lambda s, t, h: len(s.open_tickets),
    "nps": lambda s, t, h: s.nps[1],
    "survey_interests": lambda s, t, h: _survey_sets(s)[0],
    "survey_motivations": lambda s, t, h: _survey_sets(s)[1],
    "surveys_count": lambda s, t, h: s.surveys_count,
    "loyalty_tier": lambda s, t, h: s.loyalty_tier[1],
    "consent_marketing": lambda s, t, h: s.consent_marketing[1],
}


# The ProfileState fields each of those columns reads (the same keys as _ONE_COLUMN).
_COLUMN_FIELDS: dict[str, tuple[str, ...]] = {
    **{name: (name,) for name in _ONE_COLUMN},
    **{f"{kind}_{d}d": ("orders",) for d in WINDOWS_DAYS for kind in ("orders", "spend")},
    "category_affinity": ("affinity",),
    "open_tickets_count": ("open_tickets",),
    "survey_interests": ("surveys",),
    "survey_motivations": ("surveys",),
}
# What the scan reads of every profile: whether it is under the set in force, and its next check.
SCAN_FIELDS = frozenset({"definitions", "next_check_at", "updated_at"})


def _fields_read(reads: frozenset[str], evaluate: Sequence[Segment]) -> frozenset[str] | None:
    """The fields backfill's fast path reads of a profile when it evaluates ``evaluate`` (reading
    the columns ``reads``) and nothing moves; None when a column needs the whole profile."""
    if not reads <= _COLUMN_FIELDS.keys():
        return None
    fields = set(SCAN_FIELDS) | {"segments"}
    for name in reads:
        fields.update(_COLUMN_FIELDS[name])
    if any(not plan_of(s.predicate).static for s in evaluate):
        # next_check_at's search reads the orders whenever a segment moves with time (the affinity
        # is read through the category_affinity column, listed above when it is read at all)
        fields.add("orders")
    return frozenset(fields)


def columns_for(state: ProfileState, now_ms: int, needed: frozenset[str], half_life_days: float) -> dict[str, Any]:
    """profile.columns restricted to ``needed`` (the whole row when one of them is not in _ONE_COLUMN)."""
    if not needed <= _ONE_COLUMN.keys():
        return columns(state, now_ms, half_life_days=half_life_days)
    return {name: _ONE_COLUMN[name](state, now_ms, half_life_days) for name in needed}


@dataclass
class Backfill:
    result: StepResult  # the changes (cause definition_changed, or time) and the profile row if it changed
    write: bool  # the memberships moved (or a full evaluation ran): write the profile back
    due: int | None  # the next time-driven check, for the timer index (may be before the stored one)
    full: bool = False  # every segment was evaluated (the older set unknown, or a check was due)


def backfill(state: ProfileState, now_ms: int, segments: Sequence[Segment], fingerprint: str,
             change: SetChange | None, config: Config, *,
             load: Callable[[frozenset[str] | None], ProfileState] | None = None) -> Backfill:
    """Bring a profile evaluated under another definition set up to ``segments`` (fingerprint
    ``fingerprint``) at ``now_ms``: the same memberships as a full evaluation.

    With ``change`` (the older set is known) and no time-driven check due by ``now_ms``, the
    memberships of the unchanged segments are exact as they are (constant until the stored next
    check), so only the added and edited segments are evaluated and members of removed ones exit.
    The next check is the earlier of the stored one (still sound: it bounds the unchanged
    segments; a removed one can only make it early) and the new segments'.

    When no membership moved, the profile is left as stored, still marked with the older set: no
    write, no changelog message, no output (what most profiles need for a selective new segment).
    Its next check may then be earlier than the stored one (a new segment's): the caller keeps it
    in the timer index, and the timer re-evaluates such a profile in full at that instant
    (pipeline.app fire_timers); a restart scans it again and finds the same.

    Otherwise (older set unknown, or a check due) the full path: time's transitions, then every
    segment again, the next check from scratch, and a write.

    Segments ruled out by a gate (``SetChange.open_segments``: a false AND term that time cannot
    change, or no consent) are not members and have no next check: only the others' columns are
    computed (most profiles, for a selective new segment).

    With ``load``, ``state`` may hold only ``change.gate_fields`` (``profile_encoding.decode_fields``):
    ``load(fields)`` reads the stored profile again with at least ``fields`` (None: all of them, to
    be written). The result's state is then the whole profile when ``write``, else a partial one
    (never to be written or sent)."""
    due = state.next_check_at
    if change is None or (due is not None and due <= now_ms):
        if load is not None:
            state = load(None)
        first = advance(state, now_ms, segments, config)
        second = reevaluate(state, now_ms, segments, config, cause="definition_changed")
        state.definitions = fingerprint
        schedule(state, now_ms, segments, config, row=second.evaluated)
        row = second.row if second.row is not None else first.row
        return Backfill(StepResult(state, first.changes + second.changes, row), True, state.next_check_at, full=True)
    row = columns_for(state, now_ms, change.gate_reads, config.half_life_days)
    at = to_datetime(now_ms)
    chosen = change.open_segments(row, at)
    if chosen:
        if load is not None:
            state = load(change.fields)
        row.update(columns_for(state, now_ms, change.reads - row.keys(), config.half_life_days))
    members = evaluate(row, chosen, at)
    members |= {sid for sid in state.segments if sid not in change.ids and sid in change.defined}
    changes = []
    if members != set(state.segments):
        if load is not None:
            state = load(None)  # to be written: every field (the row's values are the same from either)
        if len(row) < len(PROFILE_COLUMNS):  # the profile row is sent: every column
            row = columns(state, now_ms, half_life_days=config.half_life_days)
        state.version += 1
        state.updated_at = now_ms
        changes = diff(state.segments, members, customer_id=state.customer_id, at=now_ms, version=state.version,
                       cause="definition_changed")
        for c in changes:
            if c.change == "entered":
                state.segments[c.segment_id] = now_ms
            else:
                state.segments.pop(c.segment_id, None)
        row["version"] = state.version
        row["updated_at"] = at
        row["segments"] = sorted(state.segments)
    fresh = next_check_at(state, chosen, now_ms, half_life_days=config.half_life_days,
                          sweep_ms=config.sweep_ms, row=row) if chosen else None
    if fresh is not None and fresh <= now_ms:
        fresh = now_ms + 1  # schedule()'s contract: strictly later
    nxt = fresh if due is None else due if fresh is None else min(due, fresh)
    if not changes:
        return Backfill(StepResult(state), False, nxt)
    state.next_check_at = nxt
    state.definitions = fingerprint
    return Backfill(StepResult(state, changes, row), True, nxt)


@dataclass
class Checked:
    state: ProfileState  # the whole profile when written; else maybe some fields only: never write it then
    due: int | None  # its next time-driven check, for the timer index
    done: Backfill | None  # None: already evaluated under the set in force


class Scan:
    """The worker's scan of its stored profiles under the definition set in force: each value is
    read only as far as needed (``decode_fields``): for most profiles of a selective new segment,
    the fields the changed segments read; in full only when the profile is written or takes the
    full path. What ``backfill`` decides is the same either way (tests/unit/test_live.py)."""

    def __init__(self, segments: Sequence[Segment], fingerprint: str, history: SetHistory, config: Config) -> None:
        self.segments = segments
        self.fingerprint = fingerprint
        self.history = history
        self.config = config
        self.fields: frozenset[str] | None = SCAN_FIELDS  # grows to the fields of the changes met
        self.fallbacks = 0  # fast paths redone from the whole profile (a field read that fields missed)
        self.fast = 0  # profiles that took backfill's fast path
        self.written = 0  # of which written (read twice when read partly first)
        self.whole_above: float | None = 0.5  # written share above which profiles are read whole at once
        self.opened = 0  # profiles past the gates (their segments' time-moving columns computed)
        self.whole_above_gates: float | None = 0.5  # written share of those above which they are read whole

    def check(self, value: bytes, now_ms: int, *, event_clock: bool = False) -> Checked:
        """One stored profile (``value``, non-empty) at ``now_ms``; with the event clock a profile is
        not evaluated before its own last update (as the worker's other paths)."""
        # Most profiles written (a segment most enter): reading them partly first costs more.
        whole = self.fields is None or (self.whole_above is not None and self.fast > 64
                                        and self.written > self.whole_above * self.fast)
        state = decode(value) if whole or self.fields is None else decode_fields(value, self.fields)
        if state.definitions == self.fingerprint:
            return Checked(state, state.next_check_at, None)
        at = max(now_ms, state.updated_at) if event_clock else now_ms
        change = self.history.change(state.definitions, self.fingerprint)
        due = state.next_check_at
        if not (change is None or (due is not None and due <= at)):
            self.fast += 1
        if (whole or change is None or change.fields is None or change.gate_fields is None or self.fields is None
                or (due is not None and due <= at)):  # every field read (or written): the whole profile
            if not whole:
                state = decode(value)
            return self._done(backfill(state, at, self.segments, self.fingerprint, change, self.config))
        if not change.gate_fields <= self.fields:
            self.fields |= change.gate_fields  # profiles under one older set need the same: read them from now on
            state = decode_fields(value, self.fields)

        loaded: list[ProfileState] = []

        def load(fields: frozenset[str] | None) -> ProfileState:
            # Past the gates, a profile read whole at once when most such are written (a selective
            # segment's gate passes mostly its members): one decode instead of a partial one and then
            # the whole one. Either gives the same fields.
            self.opened += fields is not None
            if fields is not None and self.fields is not None and not (
                    self.whole_above_gates is not None and self.opened > 64
                    and self.written > self.whole_above_gates * self.opened):
                return decode_fields(value, fields)
            if not loaded:
                loaded.append(decode(value))
            return loaded[0]

        try:
            done = backfill(state, at, self.segments, self.fingerprint, change, self.config, load=load)
        except AttributeError as exc:
            # A reader of the profile (a column, the deadline search) needs a field not listed in
            # _COLUMN_FIELDS/_fields_read: exact from the whole profile, and from now on read in full.
            if self.fallbacks == 0:
                log.warning("backfill read a field it did not decode (%s): reading whole profiles", exc)
            self.fallbacks += 1
            self.fields = None
            done = backfill(decode(value), at, self.segments, self.fingerprint, change, self.config)
        return self._done(done)

    def _done(self, done: Backfill) -> Checked:
        self.written += done.write and not done.full
        return Checked(done.result.state, done.due, done)
