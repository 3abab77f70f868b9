"""The one internal customer event every input is normalized into, and the dead letter.

Times are epoch milliseconds in UTC (ints are what the hot path compares fastest);
``occurred_at_dt`` gives the timezone-aware datetime.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from datetime import UTC, datetime
from typing import Any

SOURCES = ("clickstream", "pos", "crm", "surveys")

CLICKSTREAM_TYPES = frozenset(
    {"page_view", "product_view", "search", "add_to_cart", "remove_from_cart", "checkout_started"}
)
CRM_TYPES = frozenset({"identify", "consent", "email", "support_ticket", "erasure_request"})
POS_KINDS = frozenset({"purchase", "refund"})
SURVEY_SOURCES = frozenset({"survey", "nps", "focus_group", "community", "diary"})
EMAIL_ACTIONS = frozenset({"sent", "open", "click", "unsubscribe"})
TICKET_ACTIONS = frozenset({"opened", "resolved"})


@dataclass(slots=True)
class Item:
    sku: str
    category: str | None
    quantity: int
    unit_price: float


@dataclass(slots=True)
class Event:
    """A normalized customer event. ``type`` is the clickstream/crm type, the pos kind
    (``purchase``/``refund``) or ``survey`` for surveys."""

    event_id: str
    source: str
    type: str
    occurred_at: int  # epoch ms, UTC
    customer_id: str | None = None
    anonymous_id: str | None = None
    email_hash: str | None = None
    loyalty_id: str | None = None
    # clickstream
    session_id: str | None = None
    url: str | None = None
    product_id: str | None = None
    category: str | None = None
    search_query: str | None = None
    price: float | None = None
    # pos
    store_id: str | None = None
    channel: str | None = None
    items: list[Item] = field(default_factory=list)
    total: float | None = None
    currency: str | None = None
    # crm
    traits: dict[str, str] = field(default_factory=dict)
    marketing: bool | None = None
    action: str | None = None
    campaign_id: str | None = None
    ticket_id: str | None = None
    topic: str | None = None
    sentiment: float | None = None
    # surveys
    survey_id: str | None = None
    survey_source: str | None = None
    nps: int | None = None
    interests: list[str] = field(default_factory=list)
    motivations: list[str] = field(default_factory=list)
    answers: dict[str, str] = field(default_factory=dict)

    @property
    def occurred_at_dt(self) -> datetime:
        return datetime.fromtimestamp(self.occurred_at / 1000, tz=UTC)

    def to_dict(self) -> dict[str, Any]:
        """Compact dict for the internal topic: empty and None fields are left out. (Not
        ``asdict``: it deep-copies every value, and this runs twice per event.)"""
        out = {}
        for name in _EVENT_FIELDS:
            value = getattr(self, name)
            if value is not None and value != [] and value != {}:
                out[name] = value
        if "items" in out:
            out["items"] = [asdict(item) for item in self.items]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Event:
        values = dict(data)
        values["items"] = [Item(**item) for item in values.get("items", ())]
        return cls(**values)


_EVENT_FIELDS = tuple(f.name for f in fields(Event))


@dataclass(slots=True, frozen=True)
class DeadLetter:
    """A message that could not become an event: the original bytes and why."""

    payload: bytes
    error_class: str
    error_message: str
    source_topic: str = ""
    source_partition: int = -1
    source_offset: int = -1

    def headers(self) -> list[tuple[str, bytes]]:
        return [
            ("source_topic", self.source_topic.encode()),
            ("source_partition", str(self.source_partition).encode()),
            ("source_offset", str(self.source_offset).encode()),
            ("error_class", self.error_class.encode()),
            ("error_message", self.error_message.encode()),
        ]
