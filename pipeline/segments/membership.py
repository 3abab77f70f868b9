"""evaluate(columns, now) -> memberships, and diff(old, new) -> changes (DESIGN §4.3–§4.4)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pipeline.segments.compiler import Fn
from pipeline.segments.definitions import Segment

ENTERED = "entered"
EXITED = "exited"


@dataclass(frozen=True, slots=True)
class SegmentChange:
    """A customer entered or left a segment (one record of topic segment-changes)."""

    customer_id: str
    segment_id: str
    change: str
    changed_at: int  # epoch ms
    profile_version: int
    cause: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "customer_id": self.customer_id,
            "segment_id": self.segment_id,
            "change": self.change,
            "changed_at": self.changed_at,
            "profile_version": self.profile_version,
            "cause": self.cause,
        }


def evaluate(row: dict[str, Any], segments: Iterable[Segment], now: datetime) -> set[str]:
    """The ids of the segments the profile (as columns at ``now``) belongs to."""
    consented = row.get("consent_marketing") is True
    # the compiled closures themselves (a bool already): one call less than Compiled.__call__
    return {sid for sid, needs_consent, fn in _compiled(segments)
            if (consented or not needs_consent) and fn(row, now)}


_COMPILED: dict[int, tuple[Iterable[Segment], tuple[Segment, ...], list[tuple[str, bool, Fn]]]] = {}


def _compiled(segments: Iterable[Segment]) -> list[tuple[str, bool, Fn]]:
    """(id, requires marketing consent, compiled closure) per segment, kept per list (the worker passes the same
    lists again and again; checked against their current items, so a list changed in place is read again)."""
    items = tuple(segments)
    cached = _COMPILED.get(id(segments))
    if cached is not None and cached[0] is segments and cached[1] == items:
        return cached[2]
    found = [(s.id, s.requires_consent == "marketing", s.predicate.fn) for s in items]
    if len(_COMPILED) > 256:
        _COMPILED.clear()
    _COMPILED[id(segments)] = (segments, items, found)  # holding the list keeps its id from being reused
    return found


def diff(old: Iterable[str], new: Iterable[str], *, customer_id: str, at: int, version: int,
         cause: str) -> list[SegmentChange]:
    """Only the real transitions, exits first, each list sorted for a stable order."""
    old_set, new_set = set(old), set(new)
    changes = [SegmentChange(customer_id, s, EXITED, at, version, cause) for s in sorted(old_set - new_set)]
    changes += [SegmentChange(customer_id, s, ENTERED, at, version, cause) for s in sorted(new_set - old_set)]
    return changes
