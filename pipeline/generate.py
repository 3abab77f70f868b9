"""Synthetic traffic: customers with a latent interest, so browsing, purchases and survey
answers are correlated and segments mean something. Deterministic for a given seed.

``traffic(customers=, seed=, start_ms=, step_ms=)`` is the basic stream (``pipeline dev`` and
the fault tests): every event carries the customer id. ``traffic(..., extended=True)`` (what
``pipeline generate`` writes by default) adds what real input looks like:

- identities: about a third of the customers browse anonymously (``anonymous_id`` only) until
  a CRM ``identify`` links that anonymous id, their e-mail and their customer id; the others
  are introduced by an ``identify`` (sign-up) before anything else. Some purchases carry only
  the e-mail address (a receipt by e-mail), linked by that ``identify``;
- latent motivations and satisfaction per customer: motivations drive spending ("quality"
  buyers spend more, "price" buyers less) and are what surveys state; satisfaction drives NPS,
  support-ticket sentiment and e-mail engagement, so a behavioural cohort has a "why";
- refunds of an earlier purchase, support tickets (opened, then resolved), e-mails
  (sent / open / click, rarely unsubscribe) and consent changes.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipeline.identity import hash_email, routing_key

CATEGORIES = ("cookware", "outdoor", "books", "electronics", "fashion", "toys")
INTERESTS = {"cookware": "cooking_classes", "outdoor": "hiking", "books": "reading_club",
             "electronics": "smart_home", "fashion": "styling", "toys": "family_events"}
MOTIVATIONS = ("price", "quality", "convenience", "sustainability", "health")
SOURCES = ("clickstream", "pos", "crm", "surveys")
TIERS = ("bronze", "silver", "gold")
TICKET_TOPICS = ("delivery", "billing", "product_quality", "returns")
ANONYMOUS_SHARE = 0.35


@dataclass(frozen=True)
class Message:
    topic: str  # input kind: clickstream, pos, crm, surveys
    key: bytes
    value: bytes


def traffic(*, customers: int = 500, seed: int = 7, start_ms: int, step_ms: int = 1000,
            extended: bool = False) -> Iterator[Message]:
    """An endless stream of input messages; ``occurred_at`` advances by ``step_ms`` per message.

    ``extended=False`` (the default) is the basic stream, unchanged for its existing callers;
    ``extended=True`` adds identities, e-mails, refunds, tickets and e-mail engagement (module doc).
    """
    if extended:
        yield from _extended(customers=customers, seed=seed, start_ms=start_ms, step_ms=step_ms)
        return
    rng = random.Random(seed)
    latent = {f"cust-{i:05d}": rng.choice(CATEGORIES) for i in range(customers)}
    ids = list(latent)
    now = start_ms
    n = 0
    while True:
        n += 1
        now += step_ms
        customer = rng.choice(ids)
        favourite = latent[customer]
        category = favourite if rng.random() < 0.7 else rng.choice(CATEGORIES)
        roll = rng.random()
        base = {"occurred_at": now, "customer_id": customer}
        if roll < 0.6:
            kind = rng.choices(["page_view", "product_view", "add_to_cart"], [3, 5, 1])[0]
            record = {**base, "event_id": f"c{seed}-{n}", "type": kind, "category": category,
                      "session_id": f"{customer}-s{now // 1_800_000}", "product_id": f"{category}-{rng.randint(1, 50)}"}
            yield Message("clickstream", customer.encode(), json.dumps(record).encode())
        elif roll < 0.8:
            price = round(rng.uniform(5, 120), 2)
            quantity = rng.randint(1, 3)
            record = {**base, "transaction_id": f"t{seed}-{n}", "total": round(price * quantity, 2),
                      "channel": rng.choice(["store", "online"]),
                      "items": [{"sku": f"{category}-{rng.randint(1, 50)}", "category": category,
                                 "quantity": quantity, "unit_price": price}]}
            yield Message("pos", customer.encode(), json.dumps(record).encode())
        elif roll < 0.9:
            record = {**base, "response_id": f"r{seed}-{n}", "survey_id": rng.choice(["interests", "nps"]),
                      "source": rng.choice(["survey", "nps", "community"]),
                      "nps": rng.choice([None, rng.randint(0, 10)]),
                      "interests": [INTERESTS[favourite]] if rng.random() < 0.8 else [],
                      "motivations": rng.sample(MOTIVATIONS, 2)}
            yield Message("surveys", customer.encode(), json.dumps(record).encode())
        else:
            record = {**base, "event_id": f"k{seed}-{n}", "type": "consent", "marketing": rng.random() < 0.8}
            yield Message("crm", customer.encode(), json.dumps(record).encode())


# --- the extended stream ------------------------------------------------------------------------

@dataclass
class _Customer:
    customer_id: str
    anonymous_id: str
    email: str
    favourite: str
    motivations: tuple[str, str]
    satisfaction: float  # 0..1: NPS, ticket sentiment, e-mail engagement
    tier: str
    linked: bool = False  # an identify has linked its identifiers
    anonymous_start: bool = False
    purchases: list[tuple[str, float]] = field(default_factory=list)  # (transaction id, total), not refunded
    open_ticket: str | None = None


def _customers(rng: random.Random, count: int) -> list[_Customer]:
    people = []
    for i in range(count):
        customer_id = f"cust-{i:05d}"
        people.append(_Customer(
            customer_id=customer_id,
            anonymous_id=f"anon-{rng.getrandbits(48):012x}",
            email=f"{customer_id}@example.com",
            favourite=rng.choice(CATEGORIES),
            motivations=tuple(rng.sample(MOTIVATIONS, 2)),  # type: ignore[arg-type]
            satisfaction=rng.betavariate(2.5, 1.5),
            tier=rng.choices(TIERS, [6, 3, 1])[0],
            anonymous_start=rng.random() < ANONYMOUS_SHARE,
        ))
    return people


def _message(source: str, record: dict[str, Any]) -> Message:
    email = record.get("email")
    key = routing_key(customer_id=record.get("customer_id"), loyalty_id=record.get("loyalty_id"),
                      email_hash=hash_email(email) if email else None, anonymous_id=record.get("anonymous_id"))
    return Message(source, (key or "").encode(), json.dumps(record).encode())


def _extended(*, customers: int, seed: int, start_ms: int, step_ms: int) -> Iterator[Message]:
    rng = random.Random(seed)
    people = _customers(rng, max(1, customers))
    now = start_ms
    n = 0
    while True:
        n += 1
        now += step_ms
        person = rng.choice(people)
        roll = rng.random()
        if not person.linked and (not person.anonymous_start or roll >= 0.55):
            yield _identify(person, seed, n, now)
            continue
        if roll < 0.55:
            yield _click(rng, person, seed, n, now)
        elif roll < 0.72:
            yield _pos(rng, person, seed, n, now)
        elif roll < 0.82:
            yield _survey(rng, person, seed, n, now)
        elif roll < 0.92:
            yield _email(rng, person, seed, n, now)
        elif roll < 0.96:
            yield _ticket(rng, person, seed, n, now)
        else:
            yield _message("crm", {"event_id": f"k{seed}-{n}", "occurred_at": now, "customer_id": person.customer_id,
                                   "type": "consent", "marketing": rng.random() < 0.8})


def _identify(person: _Customer, seed: int, n: int, now: int) -> Message:
    person.linked = True
    record: dict[str, Any] = {"event_id": f"i{seed}-{n}", "occurred_at": now, "customer_id": person.customer_id,
                              "email": person.email, "type": "identify",
                              "traits": {"loyalty_tier": person.tier}}
    if person.anonymous_start:
        record["anonymous_id"] = person.anonymous_id
    return _message("crm", record)


def _click(rng: random.Random, person: _Customer, seed: int, n: int, now: int) -> Message:
    category = person.favourite if rng.random() < 0.7 else rng.choice(CATEGORIES)
    kind = rng.choices(["page_view", "product_view", "search", "add_to_cart"], [3, 5, 1, 1])[0]
    ids: dict[str, Any] = ({"customer_id": person.customer_id} if person.linked else {})
    if person.anonymous_start:
        ids["anonymous_id"] = person.anonymous_id
    record: dict[str, Any] = {"event_id": f"c{seed}-{n}", "occurred_at": now, **ids, "type": kind,
                              "category": category, "session_id": f"{person.anonymous_id}-s{now // 1_800_000}"}
    if kind == "search":
        record["search_query"] = category
    else:
        record["product_id"] = f"{category}-{rng.randint(1, 50)}"
        record["url"] = f"/p/{record['product_id']}"
    return _message("clickstream", record)


def _pos(rng: random.Random, person: _Customer, seed: int, n: int, now: int) -> Message:
    base: dict[str, Any] = {"transaction_id": f"t{seed}-{n}", "occurred_at": now}
    if person.purchases and rng.random() < 0.06:
        refunded, total = person.purchases.pop(rng.randrange(len(person.purchases)))
        return _message("pos", {**base, "customer_id": person.customer_id, "kind": "refund", "total": total,
                                "channel": "store", "store_id": "s-01", "items": [],
                                "currency": "EUR", "event_id": f"{refunded}-refund"})
    category = person.favourite if rng.random() < 0.7 else rng.choice(CATEGORIES)
    low, high = (10, 120)
    if "price" in person.motivations:
        low, high = 5, 60
    elif "quality" in person.motivations:
        low, high = 40, 220
    price = round(rng.uniform(low, high), 2)
    quantity = rng.randint(1, 3)
    total = round(price * quantity, 2)
    channel = rng.choice(["store", "online"])
    receipt_by_email = channel == "online" and rng.random() < 0.25
    ids = {"email": person.email} if receipt_by_email else {"customer_id": person.customer_id}
    person.purchases.append((base["transaction_id"], total))
    del person.purchases[:-5]
    store = {"store_id": f"s-{rng.randint(1, 9):02d}"} if channel == "store" else {}
    return _message("pos", {**base, **ids, **store, "kind": "purchase", "total": total, "channel": channel,
                            "currency": "EUR",
                            "items": [{"sku": f"{category}-{rng.randint(1, 50)}", "category": category,
                                       "quantity": quantity, "unit_price": price}]})


def _survey(rng: random.Random, person: _Customer, seed: int, n: int, now: int) -> Message:
    survey_id = rng.choice(["interests", "nps", "motivations"])
    nps = None
    if survey_id == "nps" or rng.random() < 0.3:
        nps = max(0, min(10, round(person.satisfaction * 10 + rng.gauss(0, 1.5))))
    interests = [INTERESTS[person.favourite]] if rng.random() < 0.8 else []
    if rng.random() < 0.2:
        interests.append(INTERESTS[rng.choice(CATEGORIES)])
    motivations = list(person.motivations) if rng.random() < 0.85 else rng.sample(MOTIVATIONS, 2)
    return _message("surveys", {"response_id": f"r{seed}-{n}", "survey_id": survey_id, "occurred_at": now,
                                "customer_id": person.customer_id,
                                "source": "nps" if survey_id == "nps" else rng.choice(["survey", "community", "diary"]),
                                "nps": nps, "interests": sorted(set(interests)), "motivations": sorted(motivations),
                                "answers": {"channel": rng.choice(["web", "app", "store"])}})


def _email(rng: random.Random, person: _Customer, seed: int, n: int, now: int) -> Message:
    engaged = person.satisfaction
    roll = rng.random()
    if roll < 0.01 + 0.03 * (1 - engaged):
        action = "unsubscribe"
    elif roll < 0.35:
        action = "sent"
    elif roll < 0.35 + 0.5 * engaged:
        action = "open"
    else:
        action = "click" if rng.random() < engaged else "sent"
    return _message("crm", {"event_id": f"e{seed}-{n}", "occurred_at": now, "customer_id": person.customer_id,
                            "type": "email", "action": action, "campaign_id": f"camp-{(now // 86_400_000) % 7}"})


def _ticket(rng: random.Random, person: _Customer, seed: int, n: int, now: int) -> Message:
    sentiment = round(max(-1.0, min(1.0, person.satisfaction * 2 - 1 + rng.gauss(0, 0.3))), 3)
    if person.open_ticket is not None:
        ticket, person.open_ticket = person.open_ticket, None
        action = "resolved"
    else:
        ticket = person.open_ticket = f"tk{seed}-{n}"
        action = "opened"
    return _message("crm", {"event_id": f"s{seed}-{n}", "occurred_at": now, "customer_id": person.customer_id,
                            "type": "support_ticket", "action": action, "ticket_id": ticket,
                            "topic": rng.choice(TICKET_TOPICS), "sentiment": sentiment})


# --- output -------------------------------------------------------------------------------------

def write_jsonl(messages: Iterable[Message], directory: Path) -> dict[str, Path]:
    """Write ``messages`` as one JSON Lines file per source (``DIR/<source>.jsonl``, what
    ``pipeline replay --source SOURCE FILE`` reads); returns the files written (one per source
    that had messages). Existing files of those names are replaced."""
    directory.mkdir(parents=True, exist_ok=True)
    handles: dict[str, Any] = {}
    counts: Counter[str] = Counter()
    try:
        for message in messages:
            handle = handles.get(message.topic)
            if handle is None:
                handle = handles[message.topic] = open(directory / f"{message.topic}.jsonl", "wb")  # noqa: SIM115
            handle.write(message.value + b"\n")
            counts[message.topic] += 1
    finally:
        for handle in handles.values():
            handle.close()
    return {source: directory / f"{source}.jsonl" for source in SOURCES if counts[source]}
