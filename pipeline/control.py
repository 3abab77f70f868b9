"""Control markers: how a one-shot run knows that every event was processed and every sink flushed.

The embedded broker under-reports end offsets (DESIGN §3), so "drained" is never read from
offsets. Instead ``pipeline replay`` sends, after its data, one marker into every partition of
every input topic. Each stage forwards a marker only after everything before it in that
partition was handled:

- ingest: after the sends of the events before it completed, to every partition of
  ``customer-events`` and of ``dead-letters``;
- profiles: identity links travel between ``customer-events`` partitions as commands, which
  may beget more commands, so completion there is a small termination detection. Once a
  partition has seen the marker from every input partition (round 0), and then after each
  round k, it sends a round k+1 marker to every partition, saying whether it sent commands
  since its previous marker (``busy``). A partition that receives round k markers from all
  partitions has received every command sent before them; when none of them was busy, no
  command is in flight anywhere, and it applies the time-driven transitions up to the
  marker's watermark, writes its state, and forwards the marker to the same partition of
  ``segment-changes``, ``profile-updates`` and ``folded-events``;
- the ClickHouse writer: once every partition of those topics and of ``dead-letters`` brought
  the marker and the batches before it were inserted, it announces the run done on the
  control topic, where the replay waits for it.

A marker is recognised by its header, never by its content, so it is never dead-lettered.
"""

from __future__ import annotations

import json
from collections.abc import Hashable, Iterable
from dataclasses import asdict, dataclass, replace
from typing import Any

HEADER = "pipeline-control"
MARKER = b"marker"
DONE = b"done"


@dataclass(frozen=True, slots=True)
class Marker:
    run_id: str
    watermark: int  # latest occurred_at of the run's input, epoch ms
    origins: int  # input partitions the marker was sent to (topics x partitions)
    partitions: int  # partitions of the internal and output topics
    origin: str = ""  # "topic:partition" of the input partition the marker came through
    round: int = 0  # 0: from ingest; 1, 2, ...: between profile partitions, until no command is in flight
    busy: bool = False  # the sending partition sent identity commands since its previous round's marker

    def encode(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @classmethod
    def decode(cls, data: bytes) -> Marker:
        return cls(**json.loads(data))

    def via(self, origin: str) -> Marker:
        return replace(self, origin=origin)

    def headers(self) -> list[tuple[str, bytes]]:
        return [(HEADER, MARKER)]


def control_kind(headers: Any) -> bytes | None:
    """The control header's value (``marker``/``done``), or None for an ordinary message."""
    if not headers:
        return None
    items: Iterable[Any] = headers.items() if isinstance(headers, dict) else headers
    for name, value in items:
        if name == HEADER:
            return bytes(value) if value is not None else None
    return None


class Completion:
    """Counts distinct arrivals of each run's marker; a run completes when all expected arrived."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, Hashable], set[Hashable]] = {}
        self._busy: dict[tuple[str, Hashable], bool] = {}

    def add(self, run_id: str, scope: Hashable, arrival: Hashable, expected: int, busy: bool = False) -> bool:
        """Record ``arrival`` of run ``run_id`` within ``scope``; True exactly once, when the
        scope has seen ``expected`` distinct arrivals."""
        seen = self._seen.setdefault((run_id, scope), set())
        if arrival in seen:
            return False  # a redelivered marker counts once
        seen.add(arrival)
        self._busy[(run_id, scope)] = self._busy.get((run_id, scope), False) or busy
        return len(seen) == expected

    def busy(self, run_id: str, scope: Hashable) -> bool:
        """Whether any arrival in the scope said it was busy."""
        return self._busy.get((run_id, scope), False)
