"""The product's topics (DESIGN §4) and their creation on any Kafka-protocol broker."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from pipeline.errors import BrokerError
from pipeline.settings import Settings

log = logging.getLogger(__name__)

INPUTS = ("clickstream", "pos", "crm", "surveys")
CUSTOMER_EVENTS = "customer-events"  # internal: normalized events keyed by customer
FOLDED_EVENTS = "folded-events"  # internal: the events each profile folded, per batch, for ClickHouse `events`
SEGMENT_CHANGES = "segment-changes"
PROFILE_UPDATES = "profile-updates"
DEAD_LETTERS = "dead-letters"
DEFINITIONS = "segment-definitions"  # compacted, one partition: live segment definitions
CONTROL = "pipeline-control"  # internal: markers that tell a replay everything was processed and flushed


@dataclass(frozen=True)
class TopicSpec:
    name: str
    compacted: bool = False
    partitions: int | None = None  # None: the pipeline's partition count


def product_topics(settings: Settings) -> list[TopicSpec]:
    names = [*INPUTS, CUSTOMER_EVENTS, FOLDED_EVENTS, SEGMENT_CHANGES, DEAD_LETTERS, CONTROL]
    specs = [TopicSpec(settings.topic(n)) for n in names]
    specs.append(TopicSpec(settings.topic(PROFILE_UPDATES), compacted=True))
    specs.append(TopicSpec(settings.topic(DEFINITIONS), compacted=True, partitions=1))
    return specs


def ensure_topics(bootstrap: list[str], specs: list[TopicSpec], partitions: int, *, timeout: float = 30.0,
                  options: dict[str, Any] | None = None) -> None:
    """Create the topics that do not exist yet (idempotent)."""
    from kafka import KafkaAdminClient
    from kafka.admin import NewTopic
    from kafka.errors import KafkaError, TopicAlreadyExistsError

    deadline = time.monotonic() + timeout
    while True:
        try:
            admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="pipeline-admin", **(options or {}),
                                     request_timeout_ms=10000)
            break
        except KafkaError as exc:
            if time.monotonic() > deadline:
                raise BrokerError(f"cannot reach the broker at {','.join(bootstrap)}: {exc}") from None
            time.sleep(0.5)
    try:
        existing = set(admin.list_topics())
        missing = [
            NewTopic(spec.name, spec.partitions or partitions, 1,
                     topic_configs={"cleanup.policy": "compact"} if spec.compacted else {})
            for spec in specs if spec.name not in existing
        ]
        if missing:
            try:
                admin.create_topics(missing)
            except TopicAlreadyExistsError:
                pass
            log.info("created topics %s", ", ".join(t.name for t in missing))
    finally:
        admin.close()
