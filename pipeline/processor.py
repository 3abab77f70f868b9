"""The pure step the profile agent runs per event: ``(state, event, now) -> (state, outputs)``.

In the manner of bytewax's ``stateful_map``: no I/O, no clock, no Faust; the agent reads the
state, calls this, writes the state and sends the outputs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.events import Event
from pipeline.profile import LATENESS_DAYS, ProfileState, columns, fold, is_duplicate, new_profile, touched_columns
from pipeline.segments.deadlines import DeadlineCache
from pipeline.segments.definitions import Segment
from pipeline.segments.membership import SegmentChange, diff, evaluate


@dataclass(frozen=True)
class Config:
    half_life_days: float = 30.0
    dedup_window: int = 64
    sweep_ms: int = 60_000  # re-check interval where no transition instant can be derived
    lateness_days: float = LATENESS_DAYS  # PIPELINE_LATENESS_DAYS: how long orders outlive the longest window


@dataclass
class StepResult:
    state: ProfileState
    changes: list[SegmentChange] = field(default_factory=list)
    row: dict[str, Any] | None = None  # the profile's columns, when it changed
    duplicate: bool = False
    # The columns the evaluation computed at its instant, also when nothing changed: what schedule()
    # needs next (pass it as ``row=``) instead of computing them again.
    evaluated: dict[str, Any] | None = None


# One per process (the worker's profile stage runs on one event loop): bounded, checked on every use.
DEADLINES = DeadlineCache()


def to_datetime(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, tz=UTC)


def step(state: ProfileState | None, key: str, event: Event, now_ms: int, segments: Sequence[Segment],
         config: Config = Config(), *, incremental: bool = True) -> StepResult:
    """Fold one event into the customer's state and emit the segment transitions it causes.

    ``incremental``: re-evaluate only the segments that read a column the event can change, or
    require a consent it can change; the others keep their membership. What time alone changes
    (windows, decay, ``now()``) is the timer index's: call ``advance`` up to ``now_ms`` first, as
    the worker does, so memberships are exact as of ``now_ms`` before the event. Pass False when
    the stored memberships may come from another definition set."""
    if state is None:
        state = new_profile(key)
        incremental = False
    if event.event_id and is_duplicate(state, event.event_id):
        return StepResult(state, duplicate=True)
    fold(state, event, now_ms, half_life_days=config.half_life_days, dedup_window=config.dedup_window,
         lateness_days=config.lateness_days)
    only = affected(segments, event) if incremental else None
    return _reevaluate(state, now_ms, segments, config, cause=event.event_id, only=only)


@dataclass(frozen=True)
class Affected:
    segments: list[Segment]  # to evaluate
    ids: frozenset[str]  # their ids
    defined: frozenset[str]  # every id of the set


_affected: dict[tuple[int, str, str], tuple[Sequence[Segment], Affected]] = {}


def affected(segments: Sequence[Segment], event: Event) -> Affected:
    """The segments an event of this kind can change the membership of (cached per set and kind)."""
    key = (id(segments), event.source, event.type)
    cached = _affected.get(key)
    if cached is not None and cached[0] is segments:
        return cached[1]
    touched = touched_columns(event)
    chosen = [s for s in segments
              if s.predicate.columns & touched or (s.requires_consent is not None and "consent_marketing" in touched)]
    result = Affected(chosen, frozenset(s.id for s in chosen), frozenset(s.id for s in segments))
    if len(_affected) > 256:
        _affected.clear()
    _affected[key] = (segments, result)  # holding the list keeps its id from being reused
    return result


def reevaluate(state: ProfileState, now_ms: int, segments: Sequence[Segment], config: Config = Config(),
               *, cause: str = "time") -> StepResult:
    """Evaluate the segments again with no new event (time passed, definitions changed)."""
    return _reevaluate(state, now_ms, segments, config, cause=cause, bump=True)


def schedule(state: ProfileState, now_ms: int, segments: Sequence[Segment], config: Config = Config(), *,
             row: dict[str, Any] | None = None) -> int | None:
    """Set and return the next instant after ``now_ms`` at which the memberships may change with
    no new event (None: never). Call after the profile was evaluated at ``now_ms``.

    ``row``: its columns at ``now_ms``, when the caller has them (``StepResult.evaluated`` of the
    evaluation at ``now_ms``, if nothing changed the state since); otherwise they are computed. The
    answer is ``deadlines.next_check_at``'s, found incrementally (``DEADLINES``: segments whose inputs
    did not change since the profile's last call keep their answer)."""
    due = DEADLINES.next_check_at(state, segments, now_ms, half_life_days=config.half_life_days,
                                  sweep_ms=config.sweep_ms, row=row)
    if due is not None and due <= now_ms:
        due = now_ms + 1  # the contract is "strictly later"; never loop on one instant
    state.next_check_at = due
    return due


def advance(state: ProfileState, until_ms: int, segments: Sequence[Segment], config: Config = Config()) -> StepResult:
    """Apply, in order, the time-driven transitions due up to ``until_ms``, each at its own
    instant (so a replay's exits carry the day they happened, not the day they were noticed)."""
    changes: list[SegmentChange] = []
    row: dict[str, Any] | None = None
    due = state.next_check_at
    while due is not None and due <= until_ms:
        result = reevaluate(state, due, segments, config)
        changes += result.changes
        row = result.row if result.row is not None else row
        due = schedule(state, due, segments, config, row=result.evaluated)
    return StepResult(state, changes, row)


def absorb(state: ProfileState | None, key: str, absorbed: ProfileState, source: str, now_ms: int,
           segments: Sequence[Segment], config: Config = Config()) -> StepResult:
    """Merge the profile that was under ``source`` into ``key``'s and re-evaluate (cause ``merge``).

    Idempotent: a profile remembers the keys it absorbed, so a redelivered merge is a duplicate.
    """
    from pipeline.identity import merge_profiles

    if state is None:
        state = new_profile(key)
    if source == key or source in state.merged_keys:
        return StepResult(state, duplicate=True)
    merged = merge_profiles(state, absorbed, half_life_days=config.half_life_days, dedup_window=config.dedup_window,
                            lateness_days=config.lateness_days)
    merged.merged_keys = sorted({*state.merged_keys, *absorbed.merged_keys, source})
    merged.updated_at = max(merged.updated_at, now_ms)
    return _reevaluate(merged, now_ms, segments, config, cause="merge")


def release(state: ProfileState, now_ms: int, *, cause: str) -> StepResult:
    """The profile goes away (absorbed by a merge, or erased): it exits every segment it is in."""
    state.version += 1
    state.updated_at = max(state.updated_at, now_ms)
    changes = diff(state.segments, (), customer_id=state.customer_id, at=now_ms, version=state.version, cause=cause)
    state.segments = {}
    state.next_check_at = None
    return StepResult(state, changes)


def _reevaluate(state: ProfileState, now_ms: int, segments: Sequence[Segment], config: Config, *,
                cause: str, bump: bool = False, only: Affected | None = None) -> StepResult:
    row = columns(state, now_ms, half_life_days=config.half_life_days)
    if only is None:
        members = evaluate(row, segments, to_datetime(now_ms))
    else:
        members = evaluate(row, only.segments, to_datetime(now_ms))
        members |= {sid for sid in state.segments if sid not in only.ids and sid in only.defined}
    if bump and members == set(state.segments):
        return StepResult(state, evaluated=row)
    if bump:
        state.version += 1
        state.updated_at = now_ms
        row["version"] = state.version
        row["updated_at"] = to_datetime(now_ms)
    changes = diff(state.segments, members, customer_id=state.customer_id, at=now_ms,
                   version=state.version, cause=cause)
    for change in changes:
        if change.change == "entered":
            state.segments[change.segment_id] = now_ms
        else:
            state.segments.pop(change.segment_id, None)
    row["segments"] = sorted(state.segments)
    return StepResult(state, changes, row, evaluated=row)
