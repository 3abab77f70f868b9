"""Synthetic traffic: customers with a latent interest, so browsing, purchases and survey
answers are correlated and segments mean something. Deterministic for a given seed."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from dataclasses import dataclass

CATEGORIES = ("cookware", "outdoor", "books", "electronics", "fashion", "toys")
INTERESTS = {"cookware": "cooking_classes", "outdoor": "hiking", "books": "reading_club",
             "electronics": "smart_home", "fashion": "styling", "toys": "family_events"}
MOTIVATIONS = ("price", "quality", "convenience", "sustainability", "health")


@dataclass(frozen=True)
class Message:
    topic: str  # input kind: clickstream, pos, crm, surveys
    key: bytes
    value: bytes


def traffic(*, customers: int = 500, seed: int = 7, start_ms: int, step_ms: int = 1000) -> Iterator[Message]:
    """An endless stream of input messages; ``occurred_at`` advances by ``step_ms`` per message."""
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
