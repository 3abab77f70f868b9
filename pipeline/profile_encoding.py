"""The bytes a profile is stored as (table value, changelog message): a compact binary encoding.

Format 1: the byte ``0x01``, then one msgpack array of the ``ProfileState`` fields by position
(``_FIELDS`` order; no field names). To keep it small without losing anything:

- times are ints relative to a base time (the first one in the array: ``first_seen_at``, or
  ``updated_at`` when nothing was seen); the times of ``orders`` are each relative to the
  previous order (they are sorted, so the deltas are small);
- ``recent_event_ids`` and ``recent_sessions`` (8-byte digests, see ``profile.id_digest``) are
  one byte string each, 8 bytes per id;
- a lower-case hex string (e-mail hashes, the definitions fingerprint) is its raw bytes; an
  ``email:<hash>`` customer id is the hash's bytes (a bare customer id is always text);
- the identifier of the profile's own key in its identifier list is ``nil`` (it is the key);
- a float that is a whole number of hundredths (amounts, the affinity of one undecayed event)
  is that number of hundredths as an int, when that gives back the same float;
- maps are flat arrays ``[key, value..., key, value...]``; the ``[at, value]`` slots are
  ``nil`` when unset (their defaults).

Anything this layout cannot hold exactly (a float time, a non-text identifier, an int too large
for msgpack) is written as format 0 instead: the JSON of ``ProfileState.to_dict()`` (first byte
``{``), which is also what earlier versions wrote. ``decode`` reads both, so existing changelogs
and stores recover unchanged; they are rewritten in format 1 the next time the profile changes.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable
from typing import Any

import msgpack

from pipeline.identity import ANONYMOUS_PREFIX, EMAIL_PREFIX, LOYALTY_PREFIX
from pipeline.profile import ProfileState

FORMAT = 1
_HEADER = bytes([FORMAT])
_LEGACY = ord("{")
_CENTS_LIMIT = 2**53  # hundredths beyond this are not exact in a float
_UNSET: dict[str, list[Any]] = {"unsubscribed": [0, False], "nps": [0, None], "loyalty_tier": [0, None],
                                 "consent_marketing": [0, None]}


class _NotCompact(Exception):
    """The state holds a value format 1 cannot represent exactly: use the JSON format."""


# --- small codecs --------------------------------------------------------------------------------

def _hex(value: str) -> str | bytes:
    """A lower-case hex string as its bytes (half the size); any other string as is."""
    if value and not len(value) % 2:
        try:
            raw = bytes.fromhex(value)
        except ValueError:
            return value
        if raw.hex() == value:
            return raw
    return value


def _unhex(value: str | bytes) -> str:
    return value.hex() if isinstance(value, bytes) else value


def _num(value: Any) -> Any:
    """A float that is a whole number of hundredths as that int; another float as is. An int
    (or anything else) is wrapped in a list so it cannot be mistaken for hundredths."""
    if type(value) is float:
        if math.isfinite(value):
            cents = round(value * 100)
            if -_CENTS_LIMIT < cents < _CENTS_LIMIT and cents / 100 == value and (
                    cents or math.copysign(1.0, value) > 0):
                return cents
        return value
    return [value]


def _unnum(value: Any) -> Any:
    if type(value) is int:
        return value / 100
    if type(value) is list:
        return value[0]
    return value


def _rel(value: Any, base: int) -> int | None:
    if value is None:
        return None
    if type(value) is not int:
        raise _NotCompact
    return value - base


def _abs(value: int | None, base: int) -> int | None:
    return None if value is None else value + base


def _digests(values: list[int]) -> bytes:
    try:
        return struct.pack(f">{len(values)}Q", *values)
    except struct.error as exc:  # not an unsigned 64-bit int (e.g. a state built by hand)
        raise _NotCompact from exc


def _undigests(blob: bytes) -> list[int]:
    return list(struct.unpack(f">{len(blob) // 8}Q", blob))


def _own(customer_id: str) -> tuple[str, str]:
    """(kind prefix, identifier) of the profile's own key ('' for a bare customer id)."""
    for prefix in (ANONYMOUS_PREFIX, EMAIL_PREFIX, LOYALTY_PREFIX):
        if customer_id.startswith(prefix):
            return prefix, customer_id[len(prefix):]
    return "", customer_id


def _ids(values: list[str], own: str | None, packed: bool) -> list[Any]:
    out: list[Any] = []
    for value in values:
        if type(value) is not str:
            raise _NotCompact
        out.append(None if value == own else _hex(value) if packed else value)
    return out


def _unids(values: list[Any], own: str) -> list[str]:
    return [own if value is None else _unhex(value) for value in values]


def _slot(slot: list[Any], name: str, base: int) -> list[Any] | None:
    if slot == _UNSET[name] and type(slot[0]) is int and type(slot[1]) is type(_UNSET[name][1]):
        return None
    if len(slot) != 2:
        raise _NotCompact
    return [_rel(slot[0], base), slot[1]]


def _unslot(value: list[Any] | None, name: str, base: int) -> list[Any]:
    if value is None:
        return list(_UNSET[name])
    return [value[0] + base, value[1]]


# --- the profile ---------------------------------------------------------------------------------

def encode(state: ProfileState) -> bytes:
    """The stored bytes of ``state``: format 1, or the JSON format when it cannot hold ``state`` exactly."""
    try:
        return _HEADER + msgpack.packb(_compact(state), use_bin_type=True)
    except (_NotCompact, OverflowError, TypeError, ValueError):
        return json.dumps(state.to_dict(), separators=(",", ":")).encode()


def decode(value: bytes) -> ProfileState:
    """A profile from its stored bytes (format 1, or the JSON format of any version)."""
    if value[0] == FORMAT:
        return _expand(msgpack.unpackb(value[1:], use_list=True, raw=False, strict_map_key=False))
    if value[0] == _LEGACY:
        return ProfileState.from_dict(json.loads(value))
    raise ValueError(f"unknown profile encoding (first byte {value[0]:#04x})")


def _compact(s: ProfileState) -> list[Any]:
    base = s.first_seen_at if s.first_seen_at is not None else s.updated_at
    if type(base) is not int:
        raise _NotCompact
    prefix, own = _own(s.customer_id)
    if type(s.customer_id) is not str:
        raise _NotCompact
    key: str | bytes = s.customer_id
    if prefix == EMAIL_PREFIX and isinstance(packed := _hex(own), bytes):
        key = packed
    orders: list[Any] = []
    previous = base
    for order in s.orders:
        if len(order) != 3:
            raise _NotCompact
        at: int = order[0]  # type: ignore[assignment]  # an int ms (else _rel refuses it)
        orders += (_rel(at, previous), _num(order[1]), order[2])
        previous = at
    affinity: list[Any] = []
    for category, (raw, as_of) in s.affinity.items():
        affinity += (category, _num(raw), _rel(as_of, base))
    surveys: list[Any] = []
    for survey, answer in s.surveys.items():
        if len(answer) != 3:
            raise _NotCompact
        surveys += (survey, _rel(answer[0], base), answer[1], answer[2])
    traits: list[Any] = []
    for name, slot in s.traits.items():
        if len(slot) != 2:
            raise _NotCompact
        traits += (name, _rel(slot[0], base), slot[1])
    segments: list[Any] = []
    for segment, since in s.segments.items():
        segments += (segment, _rel(since, base))
    channels: list[Any] = [x for item in s.channels.items() for x in item]
    return [
        key, base, _rel(s.first_seen_at, base), _rel(s.last_seen_at, base), _rel(s.updated_at, base),
        _rel(s.next_check_at, base), _rel(s.first_purchase_at, base), _rel(s.last_purchase_at, base),
        _ids(s.anonymous_ids, own if prefix == ANONYMOUS_PREFIX else None, False),
        _ids(s.email_hashes, own if prefix == EMAIL_PREFIX else None, True),
        _ids(s.loyalty_ids, own if prefix == LOYALTY_PREFIX else None, False),
        s.events_count, s.sessions_count, _digests(s.recent_sessions), s.page_views_count,
        s.product_views_count, s.cart_adds_count, s.orders_count, _num(s.lifetime_value), orders, affinity,
        channels, s.email_opens_count, s.email_clicks_count, _slot(s.unsubscribed, "unsubscribed", base),
        s.open_tickets, _num(s.sentiment_sum), s.sentiment_count, _slot(s.nps, "nps", base), surveys,
        s.surveys_count, _slot(s.loyalty_tier, "loyalty_tier", base),
        _slot(s.consent_marketing, "consent_marketing", base), traits, segments, _digests(s.recent_event_ids),
        s.merged_keys, _hex(s.definitions), s.version,
    ]


def _expand(f: list[Any]) -> ProfileState:
    (key, base, first_seen, last_seen, updated, next_check, first_purchase, last_purchase, anonymous, emails,
     loyalty, events_count, sessions_count, sessions, page_views, product_views, cart_adds, orders_count,
     lifetime_value, flat_orders, flat_affinity, flat_channels, opens, clicks, unsubscribed, open_tickets,
     sentiment_sum, sentiment_count, nps, flat_surveys, surveys_count, loyalty_tier, consent, flat_traits,
     flat_segments, event_ids, merged_keys, definitions, version) = f
    customer_id = EMAIL_PREFIX + key.hex() if isinstance(key, bytes) else key
    prefix, own = _own(customer_id)
    orders = []
    previous = base
    for i in range(0, len(flat_orders), 3):
        previous += flat_orders[i]
        orders.append([previous, _unnum(flat_orders[i + 1]), flat_orders[i + 2]])
    affinity = {flat_affinity[i]: [_unnum(flat_affinity[i + 1]), flat_affinity[i + 2] + base]
                for i in range(0, len(flat_affinity), 3)}
    surveys = {flat_surveys[i]: [flat_surveys[i + 1] + base, flat_surveys[i + 2], flat_surveys[i + 3]]
               for i in range(0, len(flat_surveys), 4)}
    traits = {flat_traits[i]: [flat_traits[i + 1] + base, flat_traits[i + 2]] for i in range(0, len(flat_traits), 3)}
    return ProfileState(
        customer_id=customer_id,
        anonymous_ids=_unids(anonymous, own if prefix == ANONYMOUS_PREFIX else ""),
        email_hashes=_unids(emails, own if prefix == EMAIL_PREFIX else ""),
        loyalty_ids=_unids(loyalty, own if prefix == LOYALTY_PREFIX else ""),
        first_seen_at=_abs(first_seen, base),
        last_seen_at=_abs(last_seen, base),
        events_count=events_count,
        sessions_count=sessions_count,
        recent_sessions=_undigests(sessions),
        page_views_count=page_views,
        product_views_count=product_views,
        cart_adds_count=cart_adds,
        orders_count=orders_count,
        lifetime_value=_unnum(lifetime_value),
        first_purchase_at=_abs(first_purchase, base),
        last_purchase_at=_abs(last_purchase, base),
        orders=orders,
        affinity=affinity,
        channels=dict(zip(flat_channels[::2], flat_channels[1::2], strict=True)),
        email_opens_count=opens,
        email_clicks_count=clicks,
        unsubscribed=_unslot(unsubscribed, "unsubscribed", base),
        open_tickets=open_tickets,
        sentiment_sum=_unnum(sentiment_sum),
        sentiment_count=sentiment_count,
        nps=_unslot(nps, "nps", base),
        surveys=surveys,
        surveys_count=surveys_count,
        loyalty_tier=_unslot(loyalty_tier, "loyalty_tier", base),
        consent_marketing=_unslot(consent, "consent_marketing", base),
        traits=traits,
        segments={flat_segments[i]: flat_segments[i + 1] + base for i in range(0, len(flat_segments), 2)},
        recent_event_ids=_undigests(event_ids),
        next_check_at=_abs(next_check, base),
        merged_keys=merged_keys,
        definitions=_unhex(definitions),
        version=version,
        updated_at=updated + base,
    )


# --- reading some fields only ----------------------------------------------------------------------

def _customer_id(f: list[Any]) -> str:
    key = f[0]
    return EMAIL_PREFIX + key.hex() if isinstance(key, bytes) else key


def _own_ids(index: int, kind: str) -> Callable[[list[Any]], list[str]]:
    def read(f: list[Any]) -> list[str]:
        prefix, own = _own(_customer_id(f))
        return _unids(f[index], own if prefix == kind else "")
    return read


def _orders(f: list[Any]) -> list[list[Any]]:
    flat, previous, orders = f[19], f[1], []
    for i in range(0, len(flat), 3):
        previous += flat[i]
        orders.append([previous, _unnum(flat[i + 1]), flat[i + 2]])
    return orders


# Each ProfileState field from the format-1 array, as _expand reads it (tests/unit/test_profile_encoding.py
# checks every one against decode). _expand stays one function: a call per field would slow the full decode.
_READERS: dict[str, Callable[[list[Any]], Any]] = {
    "customer_id": _customer_id,
    "anonymous_ids": _own_ids(8, ANONYMOUS_PREFIX),
    "email_hashes": _own_ids(9, EMAIL_PREFIX),
    "loyalty_ids": _own_ids(10, LOYALTY_PREFIX),
    "first_seen_at": lambda f: _abs(f[2], f[1]),
    "last_seen_at": lambda f: _abs(f[3], f[1]),
    "updated_at": lambda f: f[4] + f[1],
    "next_check_at": lambda f: _abs(f[5], f[1]),
    "first_purchase_at": lambda f: _abs(f[6], f[1]),
    "last_purchase_at": lambda f: _abs(f[7], f[1]),
    "events_count": lambda f: f[11],
    "sessions_count": lambda f: f[12],
    "recent_sessions": lambda f: _undigests(f[13]),
    "page_views_count": lambda f: f[14],
    "product_views_count": lambda f: f[15],
    "cart_adds_count": lambda f: f[16],
    "orders_count": lambda f: f[17],
    "lifetime_value": lambda f: _unnum(f[18]),
    "orders": _orders,
    "affinity": lambda f: {f[20][i]: [_unnum(f[20][i + 1]), f[20][i + 2] + f[1]] for i in range(0, len(f[20]), 3)},
    "channels": lambda f: dict(zip(f[21][::2], f[21][1::2], strict=True)),
    "email_opens_count": lambda f: f[22],
    "email_clicks_count": lambda f: f[23],
    "unsubscribed": lambda f: _unslot(f[24], "unsubscribed", f[1]),
    "open_tickets": lambda f: f[25],
    "sentiment_sum": lambda f: _unnum(f[26]),
    "sentiment_count": lambda f: f[27],
    "nps": lambda f: _unslot(f[28], "nps", f[1]),
    "surveys": lambda f: {f[29][i]: [f[29][i + 1] + f[1], f[29][i + 2], f[29][i + 3]]
                          for i in range(0, len(f[29]), 4)},
    "surveys_count": lambda f: f[30],
    "loyalty_tier": lambda f: _unslot(f[31], "loyalty_tier", f[1]),
    "consent_marketing": lambda f: _unslot(f[32], "consent_marketing", f[1]),
    "traits": lambda f: {f[33][i]: [f[33][i + 1] + f[1], f[33][i + 2]] for i in range(0, len(f[33]), 3)},
    "segments": lambda f: {f[34][i]: f[34][i + 1] + f[1] for i in range(0, len(f[34]), 2)},
    "recent_event_ids": lambda f: _undigests(f[35]),
    "merged_keys": lambda f: f[36],
    "definitions": lambda f: _unhex(f[37]),
    "version": lambda f: f[38],
}


def decode_fields(value: bytes, fields: frozenset[str]) -> ProfileState:
    """A profile with only ``fields`` read from its stored bytes: what a scan needs to decide
    whether a profile must change costs a fraction of ``decode`` (the backfill of a new segment
    reads a few columns of every profile, and writes back a few). The other fields are not set
    at all (``ProfileState`` has slots: reading one raises AttributeError, never a default), so
    such a state must never be written or sent: decode the value in full for that. A value in
    the JSON format is decoded in full."""
    if value[0] != FORMAT:
        return decode(value)
    f = msgpack.unpackb(value[1:], use_list=True, raw=False, strict_map_key=False)
    state = object.__new__(ProfileState)
    for name in fields:
        setattr(state, name, _READERS[name](f))
    return state
