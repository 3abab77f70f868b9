"""Why a profile is (or is not) in a segment: each top-level AND term, its value and whether it holds.

``explain_terms(segment, row, now)`` is pure: ``row`` is the profile's §4.2 columns as of
``now`` (``pipeline.profile.columns``), the terms are the compiler's (``Compiled.terms``: the
ClickHouse SQL text of each top-level ``AND`` operand and its compiled function). A term
holds when its value is true (non-zero), as in ClickHouse's ``WHERE``; a NULL value never
holds. The overall ``result`` is the segment's own compiled predicate with the consent rule
of ``pipeline.segments.membership.evaluate``, so an explanation never disagrees with the
stream.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from pipeline.segments.compiler import Term
from pipeline.segments.definitions import Segment

# What evaluating a term may raise where ClickHouse would fail the query (the stream's
# predicate reads these as "not a member").
EVALUATION_ERRORS = (ZeroDivisionError, OverflowError, ValueError)


def jsonable(value: Any) -> Any:
    """A value as plain JSON: date-times as ISO-8601 (UTC), sets and tuples as lists, NaN and
    infinities as strings (JSON has no such numbers)."""
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (set, frozenset)):
        return [jsonable(v) for v in sorted(value, key=str)]
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    return value


def _holds(value: Any) -> bool:
    return value is not None and bool(value)


def _consent(segment: Segment, row: Mapping[str, Any]) -> dict[str, Any]:
    if segment.requires_consent is None:
        return {"required": None, "given": None, "holds": True}
    given = row.get(f"consent_{segment.requires_consent}")
    return {"required": segment.requires_consent, "given": given, "holds": given is True}


def _term(term: Term, row: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    try:
        value = term.fn(dict(row), now)
    except EVALUATION_ERRORS as exc:
        return {"sql": term.sql, "value": None, "holds": False, "error": f"{type(exc).__name__}: {exc}"}
    return {"sql": term.sql, "value": jsonable(value), "holds": _holds(value)}


def explain_terms(segment: Segment, row: Mapping[str, Any], now: datetime) -> dict[str, Any]:
    """Explain ``segment`` for one profile ``row`` at ``now``.

    Returns ``{"segment_id", "where", "sql", "now", "terms": [{"sql", "value", "holds"[, "error"]}],
    "consent": {"required", "given", "holds"}, "predicate", "result"}``: ``predicate`` is the
    ``where`` expression alone, ``result`` also requires consent (membership as evaluated by the
    stream at ``now``).
    """
    compiled = segment.predicate
    terms = compiled.terms or (Term(compiled.sql, compiled.fn),)
    explained = [_term(term, row, now) for term in terms]
    predicate = compiled(dict(row), now)
    consent = _consent(segment, row)
    return {
        "segment_id": segment.id,
        "where": segment.where,
        "sql": compiled.sql,
        "now": now.isoformat(),
        "terms": explained,
        "consent": consent,
        "predicate": predicate,
        "result": predicate and consent["holds"],
    }
