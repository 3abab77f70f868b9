"""The customer profile: the state folded from events, and its columns as of a moment.

``fold(state, event, now)`` is pure and order-insensitive within the kept history:
counts add up, "latest" fields keep the time they were set and only a later event replaces
them, decayed scores are merged at a common instant. ``columns(state, now)`` materializes
the DESIGN §4.2 columns as of ``now``: windows are the half-open interval (now - N days, now].

Lateness (``lateness_days``, setting ``PIPELINE_LATENESS_DAYS``): orders are kept for the longest
window plus the lateness, counted back from the instant each purchase or refund is folded at
(max of the clock and its own time). So the columns are exact as of any instant no earlier than
``lateness_days`` before the latest such instant, whatever the arrival order of the events; an
evaluation further in the past may miss orders already dropped. See docs/segments.md.

Event and session ids are kept as 8-byte BLAKE2b digests (``id_digest``), not as strings: the
dedup window and the session list are the largest part of a profile, and membership tests and
merges only need equality (collision odds: docs/segments.md, "Kept history").
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

from pipeline.events import Event

DAY_MS = 86_400_000
WINDOWS_DAYS = (30, 90, 365)
LATENESS_DAYS = 1.0  # default of PIPELINE_LATENESS_DAYS
HISTORY_MS = (max(WINDOWS_DAYS) + 1) * DAY_MS  # orders kept with the default lateness: 366 days
AFFINITY_WEIGHTS = {"page_view": 0.5, "product_view": 1.0, "search": 0.5, "add_to_cart": 3.0,
                    "checkout_started": 2.0, "purchase": 5.0}
AFFINITY_SCALE = 4.0  # raw weight at which affinity reaches 1 - 1/2
RECENT_SESSIONS = 16


@dataclass(slots=True)
class ProfileState:
    """What is stored per customer (table value, changelog, profile-updates)."""

    customer_id: str
    anonymous_ids: list[str] = field(default_factory=list)
    email_hashes: list[str] = field(default_factory=list)
    loyalty_ids: list[str] = field(default_factory=list)
    first_seen_at: int | None = None
    last_seen_at: int | None = None
    events_count: int = 0
    sessions_count: int = 0
    recent_sessions: list[int] = field(default_factory=list)  # id_digest of the last RECENT_SESSIONS
    page_views_count: int = 0
    product_views_count: int = 0
    cart_adds_count: int = 0
    orders_count: int = 0
    lifetime_value: float = 0.0
    first_purchase_at: int | None = None
    last_purchase_at: int | None = None
    orders: list[list[float]] = field(default_factory=list)  # [occurred_at ms, signed amount, +1/-1/0]
    affinity: dict[str, list[float]] = field(default_factory=dict)  # category -> [raw, as_of ms]
    channels: dict[str, int] = field(default_factory=dict)
    email_opens_count: int = 0
    email_clicks_count: int = 0
    unsubscribed: list[Any] = field(default_factory=lambda: [0, False])  # [at, value]
    open_tickets: list[str] = field(default_factory=list)
    sentiment_sum: float = 0.0
    sentiment_count: int = 0
    nps: list[Any] = field(default_factory=lambda: [0, None])  # [at, value]
    surveys: dict[str, list[Any]] = field(default_factory=dict)  # survey_id -> [at, interests, motivations]
    surveys_count: int = 0
    loyalty_tier: list[Any] = field(default_factory=lambda: [0, None])
    consent_marketing: list[Any] = field(default_factory=lambda: [0, None])
    traits: dict[str, list[Any]] = field(default_factory=dict)  # name -> [at, value]
    segments: dict[str, int] = field(default_factory=dict)  # segment id -> member since (ms)
    recent_event_ids: list[int] = field(default_factory=list)  # id_digest of the last dedup_window ids
    next_check_at: int | None = None  # when memberships may next change with no event (timer index)
    merged_keys: list[str] = field(default_factory=list)  # keys of the profiles absorbed into this one
    definitions: str = ""  # fingerprint of the segment definitions it was last evaluated under
    version: int = 0
    updated_at: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ProfileState:
        """From ``to_dict`` output, or from a profile written before ids became digests (whose
        event and session ids are strings: they are digested here, so dedup still matches them)."""
        for name in ("recent_event_ids", "recent_sessions"):
            ids = data.get(name)
            if ids and any(isinstance(value, str) for value in ids):
                data = {**data, name: [id_digest(v) if isinstance(v, str) else v for v in ids]}
        return cls(**data)


def id_digest(value: str) -> int:
    """An event or session id as the unsigned 64-bit BLAKE2b digest the profile keeps."""
    return int.from_bytes(hashlib.blake2b(value.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")


def history_ms(lateness_days: float = LATENESS_DAYS) -> int:
    """How far back orders are kept from the instant they are trimmed at: the longest window plus the lateness."""
    return int((max(WINDOWS_DAYS) + lateness_days) * DAY_MS)


def new_profile(customer_id: str) -> ProfileState:
    return ProfileState(customer_id=customer_id)


def _add_unique(values: list[str], value: str | None) -> None:
    if value and value not in values:
        values.append(value)


def _set_latest(slot: list[Any], at: int, value: Any) -> None:
    """Last-writer-wins by event time: an older event never overwrites a newer one."""
    if at >= slot[0]:
        slot[0] = at
        slot[1] = value


def _decay(raw: float, elapsed_ms: float, half_life_ms: float) -> float:
    return raw * math.pow(2.0, -elapsed_ms / half_life_ms) if elapsed_ms > 0 else raw


def _add_affinity(state: ProfileState, category: str | None, weight: float, at: int, half_life_ms: float) -> None:
    if not category or weight <= 0:
        return
    category = category.lower()
    raw, as_of = state.affinity.get(category, (0.0, at))
    as_of = int(as_of)
    common = max(as_of, at)
    state.affinity[category] = [
        _decay(raw, common - as_of, half_life_ms) + _decay(weight, common - at, half_life_ms), common
    ]


def is_duplicate(state: ProfileState, event_id: str) -> bool:
    return id_digest(event_id) in state.recent_event_ids


def fold(state: ProfileState, event: Event, now_ms: int, *, half_life_days: float = 30.0,
         dedup_window: int = 64, lateness_days: float = LATENESS_DAYS) -> ProfileState:
    """Fold one event into the profile (mutates and returns ``state``; version + 1).

    ``lateness_days``: orders older than the longest window plus this, before max(now, event
    time), are dropped (module docstring)."""
    at = event.occurred_at
    half_life_ms = half_life_days * DAY_MS
    state.events_count += 1
    state.first_seen_at = at if state.first_seen_at is None else min(state.first_seen_at, at)
    state.last_seen_at = at if state.last_seen_at is None else max(state.last_seen_at, at)
    _add_unique(state.anonymous_ids, event.anonymous_id)
    _add_unique(state.email_hashes, event.email_hash)
    _add_unique(state.loyalty_ids, event.loyalty_id)
    if dedup_window:
        state.recent_event_ids.append(id_digest(event.event_id))
        del state.recent_event_ids[:-dedup_window]

    if event.source == "clickstream":
        _fold_click(state, event, half_life_ms)
    elif event.source == "pos":
        _fold_pos(state, event, now_ms, half_life_ms, history_ms(lateness_days))
    elif event.source == "crm":
        _fold_crm(state, event)
    elif event.source == "surveys":
        _fold_survey(state, event)

    state.version += 1
    state.updated_at = now_ms
    return state


def _fold_click(state: ProfileState, event: Event, half_life_ms: float) -> None:
    session = id_digest(event.session_id) if event.session_id else None
    if session is not None and session not in state.recent_sessions:
        state.sessions_count += 1
        state.recent_sessions.append(session)
        del state.recent_sessions[:-RECENT_SESSIONS]
    if event.type == "page_view":
        state.page_views_count += 1
    elif event.type == "product_view":
        state.product_views_count += 1
    elif event.type == "add_to_cart":
        state.cart_adds_count += 1
    _add_affinity(state, event.category, AFFINITY_WEIGHTS.get(event.type, 0.0), event.occurred_at, half_life_ms)


def _fold_pos(state: ProfileState, event: Event, now_ms: int, half_life_ms: float, kept_ms: int) -> None:
    at = event.occurred_at
    amount = event.total or 0.0
    channel = event.channel or "store"
    if event.type == "refund":
        state.lifetime_value -= amount
        state.orders.append([at, -amount, 0])
    else:
        state.orders_count += 1
        state.lifetime_value += amount
        state.orders.append([at, amount, 1])
        state.first_purchase_at = at if state.first_purchase_at is None else min(state.first_purchase_at, at)
        state.last_purchase_at = at if state.last_purchase_at is None else max(state.last_purchase_at, at)
        state.channels[channel] = state.channels.get(channel, 0) + 1
        for item in event.items:
            _add_affinity(state, item.category, AFFINITY_WEIGHTS["purchase"] * max(item.quantity, 1), at,
                          half_life_ms)
    # sorted first, so a late order older than the horizon is dropped now, not at the next one
    state.orders.sort(key=lambda o: o[0])
    horizon = max(now_ms, at) - kept_ms
    if state.orders[0][0] <= horizon:
        state.orders = [o for o in state.orders if o[0] > horizon]


def _fold_crm(state: ProfileState, event: Event) -> None:
    at = event.occurred_at
    if event.type == "identify":
        for name, value in event.traits.items():
            slot = state.traits.setdefault(name, [0, None])
            _set_latest(slot, at, value)
        if "loyalty_tier" in event.traits:
            _set_latest(state.loyalty_tier, at, event.traits["loyalty_tier"])
    elif event.type == "consent":
        _set_latest(state.consent_marketing, at, bool(event.marketing))
    elif event.type == "email":
        if event.action == "open":
            state.email_opens_count += 1
        elif event.action == "click":
            state.email_clicks_count += 1
        elif event.action == "unsubscribe":
            _set_latest(state.unsubscribed, at, True)
    elif event.type == "support_ticket":
        ticket = event.ticket_id or event.event_id
        if event.action == "opened":
            _add_unique(state.open_tickets, ticket)
        elif ticket in state.open_tickets:
            state.open_tickets.remove(ticket)
        if event.sentiment is not None:
            state.sentiment_sum += event.sentiment
            state.sentiment_count += 1


def _fold_survey(state: ProfileState, event: Event) -> None:
    at = event.occurred_at
    state.surveys_count += 1
    if event.nps is not None:
        _set_latest(state.nps, at, event.nps)
    key = event.survey_id or event.event_id
    previous = state.surveys.get(key)
    # A later answer to the same survey replaces the earlier stance; an older one is ignored.
    if previous is None or at >= previous[0]:
        state.surveys[key] = [at, list(event.interests), list(event.motivations)]


def _ms_to_dt(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC)


def affinities(state: ProfileState, now_ms: int, half_life_days: float) -> dict[str, float]:
    half_life_ms = half_life_days * DAY_MS
    result = {}
    for category, (raw, as_of) in state.affinity.items():
        decayed = _decay(raw, now_ms - as_of, half_life_ms)
        result[category] = round(1.0 - math.pow(2.0, -decayed / AFFINITY_SCALE), 6)
    return result


def columns(state: ProfileState, now_ms: int, *, half_life_days: float = 30.0) -> dict[str, Any]:
    """The profile's §4.2 columns as of ``now_ms`` (what segments and ClickHouse see)."""
    window: dict[str, Any] = {}
    for days in WINDOWS_DAYS:
        start = now_ms - days * DAY_MS
        inside = [o for o in state.orders if start < o[0] <= now_ms]
        window[f"orders_{days}d"] = sum(int(o[2]) for o in inside)
        window[f"spend_{days}d"] = round(sum(o[1] for o in inside), 2)
    affinity = affinities(state, now_ms, half_life_days)
    top_category = max(sorted(affinity), key=lambda c: affinity[c]) if affinity else None
    preferred_channel = max(sorted(state.channels), key=lambda c: state.channels[c]) if state.channels else None
    interests: set[str] = set()
    motivations: set[str] = set()
    for _, survey_interests, survey_motivations in state.surveys.values():
        interests.update(survey_interests)
        motivations.update(survey_motivations)
    return {
        "customer_id": state.customer_id,
        "anonymous_ids": list(state.anonymous_ids),
        "first_seen_at": _ms_to_dt(state.first_seen_at),
        "last_seen_at": _ms_to_dt(state.last_seen_at),
        "events_count": state.events_count,
        "sessions_count": state.sessions_count,
        "page_views_count": state.page_views_count,
        "product_views_count": state.product_views_count,
        "cart_adds_count": state.cart_adds_count,
        "orders_count": state.orders_count,
        "lifetime_value": round(state.lifetime_value, 2),
        "avg_order_value": round(state.lifetime_value / state.orders_count, 2) if state.orders_count else 0.0,
        "first_purchase_at": _ms_to_dt(state.first_purchase_at),
        "last_purchase_at": _ms_to_dt(state.last_purchase_at),
        **window,
        "category_affinity": affinity,
        "top_category": top_category,
        "preferred_channel": preferred_channel,
        "email_opens_count": state.email_opens_count,
        "email_clicks_count": state.email_clicks_count,
        "unsubscribed": bool(state.unsubscribed[1]),
        "open_tickets_count": len(state.open_tickets),
        "support_sentiment": round(state.sentiment_sum / state.sentiment_count, 4) if state.sentiment_count else None,
        "nps": state.nps[1],
        "nps_at": _ms_to_dt(state.nps[0]) if state.nps[1] is not None else None,
        "survey_interests": sorted(interests),
        "survey_motivations": sorted(motivations),
        "surveys_count": state.surveys_count,
        "loyalty_tier": state.loyalty_tier[1],
        "consent_marketing": state.consent_marketing[1],
        "segments": sorted(state.segments),
        "version": state.version,
        "updated_at": _ms_to_dt(state.updated_at),
    }


# Columns that move with the evaluation time alone (windows and decay): always re-evaluated.
TIME_COLUMNS = frozenset({"orders_30d", "orders_90d", "orders_365d", "spend_30d", "spend_90d", "spend_365d",
                          "category_affinity", "top_category"})
_ALWAYS = frozenset({"events_count", "first_seen_at", "last_seen_at", "anonymous_ids", "version", "updated_at",
                     "segments"})
_CLICK = frozenset({"sessions_count", "page_views_count", "product_views_count", "cart_adds_count",
                    "category_affinity", "top_category"})
_POS = frozenset({"orders_count", "lifetime_value", "avg_order_value", "first_purchase_at", "last_purchase_at",
                  "preferred_channel", "category_affinity", "top_category"}) | TIME_COLUMNS
_CRM = {"identify": frozenset({"loyalty_tier"}), "consent": frozenset({"consent_marketing"}),
        "email": frozenset({"email_opens_count", "email_clicks_count", "unsubscribed"}),
        "support_ticket": frozenset({"open_tickets_count", "support_sentiment"})}
_SURVEYS = frozenset({"nps", "nps_at", "survey_interests", "survey_motivations", "surveys_count"})


def touched_columns(event: Event) -> frozenset[str]:
    """The §4.2 columns that folding ``event`` can change (a superset; property-tested against
    ``columns`` before and after ``fold``). Segments reading none of them need no re-evaluation."""
    if event.source == "clickstream":
        return _ALWAYS | _CLICK
    if event.source == "pos":
        return _ALWAYS | _POS
    if event.source == "crm":
        return _ALWAYS | _CRM.get(event.type, frozenset())
    if event.source == "surveys":
        return _ALWAYS | _SURVEYS
    return frozenset(columns_of_profile())


def columns_of_profile() -> tuple[str, ...]:
    from pipeline.segments.columns import PROFILE_COLUMNS

    return tuple(PROFILE_COLUMNS)
