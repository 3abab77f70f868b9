"""Identifiers: normalization, hashing, the key a customer's events are partitioned by, and the
pure part of identity resolution (which profile survives a link, and merging two profiles).

Keys. A profile is stored under one *key*: the CRM ``customer_id`` as it is (bare), or, while
no customer id is known, the strongest other identifier with a prefix so kinds never collide:
``loyalty:<loyalty_id>``, ``email:<sha-256 of the normalized address>``, ``anon:<anonymous_id>``.
A bare customer id is assumed never to start with one of these prefixes.

Kinds and strength, strongest first: customer > loyalty > email > anonymous.

Conflict rule (``survivor``). When a link says two canonical keys are the same customer, exactly
one of them survives and the other is absorbed into it:

1. The same key on both sides is no merge: that key survives.
2. Otherwise the key of the stronger kind survives.
3. Between two keys of the same kind other than customer, the lexicographically smaller key
   (compared as whole key strings) survives, so the outcome does not depend on which side
   or which event arrived first.
4. Two different CRM customer ids never merge: a CRM customer id is authoritative. The result
   is ``None`` (a conflict); the caller refuses the link, leaves both profiles as they are and
   counts the refusal.

The rule is symmetric (``survivor(a, b) == survivor(b, a)``) and, among keys holding at most one
customer id, associative: applying it link by link in any order ends at the same key, the
strongest key (the customer id if there is one).

Merging (``merge_profiles``) builds the survivor's new state as if every event of both profiles
had been folded into one profile; see its docstring for the exact limits of that equivalence.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Iterable
from typing import Any, TypeVar

from pipeline.events import Event
from pipeline.profile import DAY_MS, LATENESS_DAYS, RECENT_SESSIONS, ProfileState, _decay, history_ms

_H = TypeVar("_H", bound=Hashable)

EMAIL_PREFIX = "email:"
LOYALTY_PREFIX = "loyalty:"
ANONYMOUS_PREFIX = "anon:"

CUSTOMER = "customer"
LOYALTY = "loyalty"
EMAIL = "email"
ANONYMOUS = "anonymous"
KINDS = (CUSTOMER, LOYALTY, EMAIL, ANONYMOUS)  # strongest first
STRENGTH = {CUSTOMER: 3, LOYALTY: 2, EMAIL: 1, ANONYMOUS: 0}
_PREFIXES = ((LOYALTY_PREFIX, LOYALTY), (EMAIL_PREFIX, EMAIL), (ANONYMOUS_PREFIX, ANONYMOUS))


def hash_email(email: str) -> str:
    """SHA-256 of the trimmed, lower-cased address: the only form an email is kept in."""
    return hashlib.sha256(email.strip().lower().encode("utf-8")).hexdigest()


def clean_id(value: object) -> str | None:
    """Trimmed identifier, or None when empty."""
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def routing_key(*, customer_id: str | None, loyalty_id: str | None,
                email_hash: str | None, anonymous_id: str | None) -> str | None:
    """The key a customer's events are partitioned and stored under.

    The CRM customer id once known; otherwise the strongest other identifier, prefixed
    so identifiers of different kinds never collide.
    """
    if customer_id:
        return customer_id
    if loyalty_id:
        return LOYALTY_PREFIX + loyalty_id
    if email_hash:
        return EMAIL_PREFIX + email_hash
    if anonymous_id:
        return ANONYMOUS_PREFIX + anonymous_id
    return None


# --- keys and kinds ---------------------------------------------------------------------------

def identifiers_of(event: Event) -> list[str]:
    """The keys of every identifier ``event`` carries, strongest first.

    The first one, when there is one, is ``routing_key`` of the event.
    """
    keys = []
    if event.customer_id:
        keys.append(event.customer_id)
    if event.loyalty_id:
        keys.append(LOYALTY_PREFIX + event.loyalty_id)
    if event.email_hash:
        keys.append(EMAIL_PREFIX + event.email_hash)
    if event.anonymous_id:
        keys.append(ANONYMOUS_PREFIX + event.anonymous_id)
    return keys


def kind_of(key: str) -> str:
    """``"customer"`` (a bare key), ``"loyalty"``, ``"email"`` or ``"anonymous"`` (by prefix)."""
    for prefix, kind in _PREFIXES:
        if key.startswith(prefix):
            return kind
    return CUSTOMER


def strength(key: str) -> int:
    """How strong the kind of ``key`` is: customer 3 > loyalty 2 > email 1 > anonymous 0."""
    return STRENGTH[kind_of(key)]


def identifier_of(key: str) -> str:
    """The identifier value of ``key`` without its prefix (a customer id is its own key)."""
    for prefix, _ in _PREFIXES:
        if key.startswith(prefix):
            return key[len(prefix):]
    return key


def survivor(a: str, b: str) -> str | None:
    """Which of two canonical keys survives a link between them (None: a refused conflict).

    The stronger kind survives; between two keys of the same non-customer kind the
    lexicographically smaller; two different customer ids never merge (None).
    """
    if a == b:
        return a
    strength_a, strength_b = strength(a), strength(b)
    if strength_a != strength_b:
        return a if strength_a > strength_b else b
    if strength_a == STRENGTH[CUSTOMER]:
        return None
    return min(a, b)


def survivor_of(keys: Iterable[str]) -> str | None:
    """The key that survives linking all of ``keys`` together (None: no keys, or two different
    customer ids among them, a conflict). Same as applying ``survivor`` pairwise in any order."""
    distinct = set(keys)
    if not distinct:
        return None
    if len({key for key in distinct if kind_of(key) == CUSTOMER}) > 1:
        return None
    return min(distinct, key=lambda key: (-strength(key), key))


def alias_keys(state: ProfileState) -> list[str]:
    """Every identifier key known for the profile (prefixed), except its own ``customer_id``;
    strongest kind first, sorted within a kind. The keys that should point to this profile."""
    keys = ([LOYALTY_PREFIX + value for value in sorted(set(state.loyalty_ids))]
            + [EMAIL_PREFIX + value for value in sorted(set(state.email_hashes))]
            + [ANONYMOUS_PREFIX + value for value in sorted(set(state.anonymous_ids))])
    return [key for key in keys if key != state.customer_id]


# --- merging ----------------------------------------------------------------------------------

def _min(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def _later(a: list[Any], b: list[Any]) -> list[Any]:
    """Of two ``[at, ...]`` slots the one with the later ``at``; on a tie the one whose payload
    has the greater ``repr`` (deterministic, so the merge is commutative). A copy."""
    if a[0] != b[0]:
        chosen = a if a[0] > b[0] else b
    else:
        chosen = a if repr(a[1:]) >= repr(b[1:]) else b
    return [chosen[0], *(list(v) if isinstance(v, list) else v for v in chosen[1:])]


def _merge_latest(a: dict[str, list[Any]], b: dict[str, list[Any]]) -> dict[str, list[Any]]:
    """Per name, the later ``[at, ...]`` slot of the two maps (copies)."""
    merged = {}
    for name in sorted(set(a) | set(b)):
        if name in a and name in b:
            merged[name] = _later(a[name], b[name])
        else:
            slot = a[name] if name in a else b[name]
            merged[name] = _later(slot, slot)
    return merged


def _union_sorted(*lists: Iterable[str]) -> list[str]:
    return sorted({value for values in lists for value in values})


def _union_ordered(first: list[_H], second: list[_H], keep: int) -> list[_H]:
    """``first`` then the values of ``second`` not in it, keeping the last ``keep`` (0: all)."""
    seen = set(first)
    merged = list(first) + [value for value in second if value not in seen]
    return merged[-keep:] if keep > 0 else merged


def merge_profiles(survivor: ProfileState, absorbed: ProfileState, *, half_life_days: float,
                   dedup_window: int = 64, lateness_days: float = LATENESS_DAYS) -> ProfileState:
    """A new state for ``survivor.customer_id`` holding both histories, as if every event of both
    profiles had been folded into one (neither input is modified).

    - counts, ``lifetime_value``, ``channels`` and the sentiment sums add; ``first_*`` take the
      minimum and ``last_*`` the maximum;
    - ``orders`` are concatenated, sorted by (time, amount, kind) and trimmed to the longest
      window plus ``lateness_days`` (``profile.history_ms``) before the latest of both
      ``updated_at`` and the newest order (as ``fold`` trims relative to max(now, event time));
    - ``affinity``: per category both scores are decayed to the later ``as_of`` and added, as
      ``profile._add_affinity`` does (same half-life as the fold);
    - ``[at, value]`` slots (unsubscribed, nps, loyalty tier, consent), each trait and each
      survey id: the later ``at`` wins; on equal ``at`` the greater ``repr`` of the payload wins;
    - identifier lists and ``open_tickets``: sorted union; the identifier of each of the two keys
      is added (``anon:X`` -> ``anonymous_ids``, ``email:H`` -> ``email_hashes``, ``loyalty:L``
      -> ``loyalty_ids``), so ``alias_keys`` of the result lists the absorbed key;
    - ``recent_sessions``: the survivor's then the absorbed's others, last ``RECENT_SESSIONS``
      kept; ``sessions_count`` adds minus the sessions in both ``recent_sessions`` lists;
    - ``recent_event_ids`` (digests, as ``fold`` keeps them): likewise, the last ``dedup_window``
      kept (all when 0);
      ``events_count`` adds minus the event ids in both lists (an event folded into both);
    - ``segments``: the survivor's (the caller re-evaluates and emits changes with cause
      ``merge``); ``version`` = survivor's + 1; ``updated_at`` the later; ``next_check_at`` None
      (the caller reschedules).

    Limits of the equivalence, from what the state keeps:
    - An event folded into both profiles is recognized by its id only while it is in both
      dedup windows, and only ``events_count`` (and, through ``recent_sessions``, the session
      count) is corrected: its other contributions (type counts, orders, value, affinity,
      channel, survey count, sentiment) are not kept per event and are counted twice. The
      caller should not fold one event into two profiles (check ``is_duplicate`` on the
      survivor key first). Events that count nothing but ``events_count`` merge exactly even
      when folded into both: identify (traits, loyalty tier), consent, email ``sent`` and
      ``unsubscribe``, a ticket opening without sentiment, a click that counts nothing (e.g.
      ``remove_from_cart``, with or without a session).
    - A session shared by both is counted once only while it is in both ``recent_sessions``.
    - ``open_tickets`` keeps open tickets only: a ticket opened under one key and resolved
      under the other (before the merge) stays open.
    - A tie on the event time of a slot is broken by the value here, by arrival in ``fold``.

    Raises ValueError when both states have the same ``customer_id`` or two different CRM
    customer ids (the conflict rule refuses those links).
    """
    a, b = survivor, absorbed
    if a.customer_id == b.customer_id:
        raise ValueError(f"cannot merge profile {a.customer_id!r} into itself")
    if kind_of(a.customer_id) == CUSTOMER and kind_of(b.customer_id) == CUSTOMER:
        raise ValueError(f"two CRM customer ids never merge: {a.customer_id!r}, {b.customer_id!r}")
    half_life_ms = half_life_days * DAY_MS

    anonymous_ids = _union_sorted(a.anonymous_ids, b.anonymous_ids)
    email_hashes = _union_sorted(a.email_hashes, b.email_hashes)
    loyalty_ids = _union_sorted(a.loyalty_ids, b.loyalty_ids)
    for key in (a.customer_id, b.customer_id):
        kind, value = kind_of(key), identifier_of(key)
        target = {ANONYMOUS: anonymous_ids, EMAIL: email_hashes, LOYALTY: loyalty_ids}.get(kind)
        if target is not None and value and value not in target:
            target.append(value)
            target.sort()

    orders = sorted((list(o) for o in a.orders + b.orders), key=lambda o: (o[0], o[1], o[2]))
    latest = max([a.updated_at, b.updated_at] + [int(o[0]) for o in orders[-1:]])
    horizon = latest - history_ms(lateness_days)
    orders = [o for o in orders if o[0] > horizon]

    affinity: dict[str, list[float]] = {}
    for category in sorted(set(a.affinity) | set(b.affinity)):
        if category not in b.affinity:
            affinity[category] = list(a.affinity[category])
        elif category not in a.affinity:
            affinity[category] = list(b.affinity[category])
        else:
            raw_a, as_of_a = a.affinity[category]
            raw_b, as_of_b = b.affinity[category]
            common = max(int(as_of_a), int(as_of_b))
            affinity[category] = [_decay(raw_a, common - int(as_of_a), half_life_ms)
                                  + _decay(raw_b, common - int(as_of_b), half_life_ms), common]

    channels = dict(a.channels)
    for channel, count in b.channels.items():
        channels[channel] = channels.get(channel, 0) + count

    traits = _merge_latest(a.traits, b.traits)
    surveys = _merge_latest(a.surveys, b.surveys)

    shared_sessions = set(a.recent_sessions) & set(b.recent_sessions)
    shared_events = set(a.recent_event_ids) & set(b.recent_event_ids)

    return ProfileState(
        customer_id=a.customer_id,
        anonymous_ids=anonymous_ids,
        email_hashes=email_hashes,
        loyalty_ids=loyalty_ids,
        first_seen_at=_min(a.first_seen_at, b.first_seen_at),
        last_seen_at=_max(a.last_seen_at, b.last_seen_at),
        events_count=a.events_count + b.events_count - len(shared_events),
        sessions_count=a.sessions_count + b.sessions_count - len(shared_sessions),
        recent_sessions=_union_ordered(a.recent_sessions, b.recent_sessions, RECENT_SESSIONS),
        page_views_count=a.page_views_count + b.page_views_count,
        product_views_count=a.product_views_count + b.product_views_count,
        cart_adds_count=a.cart_adds_count + b.cart_adds_count,
        orders_count=a.orders_count + b.orders_count,
        lifetime_value=a.lifetime_value + b.lifetime_value,
        first_purchase_at=_min(a.first_purchase_at, b.first_purchase_at),
        last_purchase_at=_max(a.last_purchase_at, b.last_purchase_at),
        orders=orders,
        affinity=affinity,
        channels=channels,
        email_opens_count=a.email_opens_count + b.email_opens_count,
        email_clicks_count=a.email_clicks_count + b.email_clicks_count,
        unsubscribed=_later(a.unsubscribed, b.unsubscribed),
        open_tickets=_union_sorted(a.open_tickets, b.open_tickets),
        sentiment_sum=a.sentiment_sum + b.sentiment_sum,
        sentiment_count=a.sentiment_count + b.sentiment_count,
        nps=_later(a.nps, b.nps),
        surveys=surveys,
        surveys_count=a.surveys_count + b.surveys_count,
        loyalty_tier=_later(a.loyalty_tier, b.loyalty_tier),
        consent_marketing=_later(a.consent_marketing, b.consent_marketing),
        traits=traits,
        segments=dict(a.segments),
        recent_event_ids=_union_ordered(a.recent_event_ids, b.recent_event_ids, dedup_window),
        next_check_at=None,
        version=a.version + 1,
        updated_at=max(a.updated_at, b.updated_at),
    )
