"""The timer index: per partition, which customer's memberships may change next, and when.

Time-driven transitions (a customer leaves "bought in the last 30 days" on day 31 with no
event) are found without sweeping the profiles: every time a profile is evaluated, the
instant at which its memberships could next change is derived from the predicates
(``pipeline.segments.deadlines``) and kept here. A tick pops only what is due, so its cost
grows with the transitions due, not with the number of profiles.

A heap per partition with lazy deletion: rescheduling a key leaves its old entry in the heap,
ignored when popped because it no longer matches the key's current due instant.
"""

from __future__ import annotations

import heapq


class TimerIndex:
    def __init__(self) -> None:
        self._heaps: dict[int, list[tuple[int, bytes]]] = {}
        self._due: dict[int, dict[bytes, int]] = {}

    def put(self, partition: int, key: bytes, due: int | None) -> None:
        """Schedule ``key`` at ``due`` (epoch ms), replacing its previous instant; None cancels."""
        dues = self._due.setdefault(partition, {})
        if due is None:
            dues.pop(key, None)
            return
        if dues.get(key) == due:
            return
        dues[key] = due
        heap = self._heaps.setdefault(partition, [])
        heapq.heappush(heap, (due, key))
        if len(heap) > 64 and len(heap) > 4 * len(dues):  # too many stale entries: rebuild
            self._heaps[partition] = [(d, k) for k, d in dues.items()]
            heapq.heapify(self._heaps[partition])

    def pop_due(self, partition: int, now_ms: int) -> list[tuple[bytes, int]]:
        """Remove and return the keys due at or before ``now_ms``, earliest first, with their instant."""
        heap = self._heaps.get(partition)
        dues = self._due.get(partition)
        out: list[tuple[bytes, int]] = []
        if not heap or dues is None:
            return out
        while heap and heap[0][0] <= now_ms:
            due, key = heapq.heappop(heap)
            if dues.get(key) == due:
                del dues[key]
                out.append((key, due))
        return out

    def due_of(self, partition: int, key: bytes) -> int | None:
        return self._due.get(partition, {}).get(key)

    def next_due(self, partition: int) -> int | None:
        heap = self._heaps.get(partition)
        dues = self._due.get(partition, {})
        while heap and dues.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        return heap[0][0] if heap else None

    def partitions(self) -> set[int]:
        return set(self._due)

    def drop(self, partition: int) -> None:
        """Forget a partition (revoked from this worker)."""
        self._heaps.pop(partition, None)
        self._due.pop(partition, None)

    def __len__(self) -> int:
        return sum(len(d) for d in self._due.values())
