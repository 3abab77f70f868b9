"""``pipeline.broker.stream.BatchedTopic``: a topic's records taken off faust's consumer in batches.

A bare faust app whose agent reads ``BatchedTopic.batches``, run in faust's ``test_context()``;
its consumer is faust's own (the aiokafka driver's ``Consumer``, not started). The one stand-in is
for the broker at the consumer's fetch interface: the records a fetch returned, yielded by the
``getmany`` that faust's drain loop calls (the hook wraps it). What the tests read is faust's own
bookkeeping: the messages it tracks as in flight, the offsets it acked and would commit, its gaps.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import faust
from faust.types import TP
from faust.types.tuples import ConsumerMessage

from pipeline.broker.stream import BatchedTopic
from tests.agents.harness import run

TOPIC = "events"
OTHER = "other-changelog"
HANG_GUARD_SECONDS = 10.0  # a batch here takes milliseconds


class Fetches:
    """The records faust's consumer fetched, handed out by ``getmany`` as faust's own does."""

    def __init__(self, app: faust.App) -> None:
        self.app = app
        self.queue: list[tuple[TP, ConsumerMessage]] = []

    def record(self, topic: str, partition: int, offset: int, value: bytes) -> None:
        tp = TP(topic, partition)
        self.queue.append((tp, ConsumerMessage(topic, partition, offset, 0.0, 0, [], b"k", value, None, 1, 1, tp,
                                               generation_id=self.app.consumer_generation_id)))

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, ConsumerMessage]]:
        batch, self.queue = self.queue, []
        for tp, message in batch:
            yield tp, message


class Scenario:
    """The app, its consumer and an agent whose body records each batch's values and may fail."""

    def __init__(self, tmp_path: Path, *, fail_on: bytes | None = None, max_: int = 100,
                 max_buffered: int = 1000) -> None:
        self.app = faust.App(f"batched-{tmp_path.name}", broker="kafka://127.0.0.1:9", store="memory://",
                             datadir=str(tmp_path), web_enabled=False)
        self.topic = self.app.topic(TOPIC, key_serializer="raw", value_serializer="raw")
        self.batched = BatchedTopic(self.app, self.topic, max_buffered=max_buffered)
        self.consumer = self.app.consumer  # faust's consumer, created through the hook
        self.fetches = Fetches(self.app)
        self.bodies: list[list[bytes]] = []
        self.body_done = asyncio.Event()
        self.in_body = asyncio.Event()
        self.release = asyncio.Event()
        self.release.set()
        self.fail_on = fail_on

        @self.app.agent(self.topic)
        async def agent(stream: Any) -> None:
            async for batch in self.batched.batches(stream, max_, 0.05, 0.005):
                self.bodies.append([m.value for m in batch])
                self.in_body.set()
                await self.release.wait()
                if fail_on is not None and fail_on in self.bodies[-1]:
                    raise RuntimeError("the body failed")
                self.body_done.set()

        self.agent = agent

    def rehook(self) -> None:
        """Put the broker stand-in under the hook, as faust's own getmany is."""
        consumer = self.consumer
        self.batched._consumers.remove(consumer)
        consumer.getmany = self.fetches.getmany
        self.batched._hook(consumer)

    async def drain(self) -> list[tuple[TP, Any]]:
        """One pass of faust's drain loop over what was fetched: what the hook passed on to it."""
        if TOPIC not in self.app.topics.acking_topics:
            # What a worker's agent does with its topic (test_context gives it a bare channel instead):
            # the conductor subscribes it, and acks of its records count toward commits.
            self.app.topics.add(self.topic)
            await self.app.topics._update_indices()
        return [item async for item in self.consumer.getmany(timeout=0.0)]

    async def wait_for_bodies(self, count: int) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + HANG_GUARD_SECONDS
        while len(self.bodies) < count:
            assert loop.time() < deadline, f"{len(self.bodies)} of {count} batches handled"
            await asyncio.sleep(0.005)
        await asyncio.sleep(0.05)  # the acks after the body returned

    def acked(self, partition: int) -> list[int]:
        return sorted(self.consumer._acked[TP(TOPIC, partition)])

    def in_flight(self) -> set[tuple[int, int]]:
        return {(m.partition, m.offset) for m in self.consumer.unacked if not m.acked}


async def _in_context(scenario: Scenario, body: Any) -> Any:
    scenario.rehook()
    async with scenario.agent.test_context():
        return await body()


def test_records_reach_the_body_in_batches_and_are_acked_after_it_returned(tmp_path):
    async def scenario() -> dict[str, Any]:
        s = Scenario(tmp_path)
        s.release.clear()

        async def body() -> dict[str, Any]:
            for offset in range(3):
                s.fetches.record(TOPIC, 0, offset, f"p0-{offset}".encode())
            s.fetches.record(OTHER, 0, 0, b"changelog")
            s.fetches.record(TOPIC, 1, 0, b"p1-0")
            passed_on = await s.drain()
            await asyncio.wait_for(s.in_body.wait(), HANG_GUARD_SECONDS)
            during = {"in_flight": s.in_flight(), "acked": s.acked(0)}
            s.release.set()
            await s.wait_for_bodies(1)
            acked = (s.acked(0), s.acked(1))
            # What faust would commit now (this takes the acked offsets out of its list)
            committable = s.consumer._filter_committable_offsets({TP(TOPIC, 0), TP(TOPIC, 1)})
            return {"passed_on": [(tp.topic, m.value) for tp, m in passed_on], "during": during,
                    "bodies": s.bodies, "acked": acked, "in_flight": s.in_flight(),
                    "committable": committable, "taken": s.batched.taken}

        return await _in_context(s, body)

    out = run(scenario())
    assert out["passed_on"] == [(OTHER, b"changelog")]  # other topics go on through faust's loop
    assert out["bodies"] == [[b"p0-0", b"p0-1", b"p0-2", b"p1-0"]]
    # While the body runs, faust counts the batch as in flight (a rebalance or shutdown waits) and
    # nothing is acked.
    assert out["during"] == {"in_flight": {(0, 0), (0, 1), (0, 2), (1, 0)}, "acked": []}
    assert out["acked"] == ([0, 1, 2], [0])
    assert out["in_flight"] == set()
    assert out["committable"] == {TP(TOPIC, 0): 3, TP(TOPIC, 1): 1}
    assert out["taken"] == 4


def test_a_batch_whose_body_raised_is_not_acked(tmp_path):
    async def scenario() -> dict[str, Any]:
        s = Scenario(tmp_path, fail_on=b"bad")

        async def body() -> dict[str, Any]:
            s.fetches.record(TOPIC, 0, 0, b"bad")
            await s.drain()
            await s.wait_for_bodies(1)
            return {"acked": s.acked(0), "in_flight": s.in_flight(),
                    "committable": s.consumer._filter_committable_offsets({TP(TOPIC, 0)})}

        try:
            return await _in_context(s, body)
        except RuntimeError:  # the test wrapper re-raises the agent's crash on exit
            return {"acked": s.acked(0), "in_flight": s.in_flight(), "crashed": True}

    out = run(scenario())
    assert out["acked"] == []  # never committed unprocessed; read again after a restart
    assert out["in_flight"] == {(0, 0)}
    assert out.get("committable", {}) == {}


def test_records_of_an_older_generation_or_cleared_on_a_revocation_are_dropped_unacked(tmp_path):
    async def scenario() -> dict[str, Any]:
        s = Scenario(tmp_path)

        async def held(record: tuple[int, bytes]) -> None:
            """Fetch one record and return once the body is handling it (and waits for release)."""
            s.release.clear()
            s.in_body.clear()
            s.fetches.record(TOPIC, record[0], 0, record[1])
            await s.drain()
            await asyncio.wait_for(s.in_body.wait(), HANG_GUARD_SECONDS)

        async def body() -> dict[str, Any]:
            await held((0, b"first"))
            # Fetched before a rebalance, taken after it: an older generation.
            s.fetches.record(TOPIC, 1, 0, b"old generation")
            await s.drain()
            s.app.consumer_generation_id += 1
            s.release.set()
            await held((2, b"second"))
            # Pending when faust clears its buffers on a revocation.
            s.fetches.record(TOPIC, 3, 0, b"cleared")
            await s.drain()
            s.app.flow_control.clear()
            s.fetches.record(TOPIC, 4, 0, b"new")
            await s.drain()
            s.release.set()
            await s.wait_for_bodies(3)
            return {"bodies": s.bodies, "acked": [s.acked(p) for p in range(5)],
                    "dropped": s.batched.dropped, "in_flight": s.in_flight()}

        return await _in_context(s, body)

    out = run(scenario())
    assert out["bodies"] == [[b"first"], [b"second"], [b"new"]]
    assert out["acked"] == [[0], [], [0], [], [0]]  # partitions 1 and 3: read again by their next owner
    assert out["dropped"] == 2
    assert out["in_flight"] == set()


def test_a_gap_in_offsets_does_not_hold_the_commit_back_and_a_seek_back_is_not_read_twice(tmp_path):
    async def scenario() -> dict[str, Any]:
        s = Scenario(tmp_path)

        async def body() -> dict[str, Any]:
            for offset in (0, 1, 5, 6):  # 2..4 are not records (compaction, transaction markers)
                s.fetches.record(TOPIC, 0, offset, f"{offset}".encode())
            s.fetches.record(TOPIC, 0, 1, b"again")  # already read: faust's drain loop skips it
            await s.drain()
            await s.wait_for_bodies(1)
            return {"bodies": s.bodies,
                    "committable": s.consumer._filter_committable_offsets({TP(TOPIC, 0)})}

        return await _in_context(s, body)

    out = run(scenario())
    assert out["bodies"] == [[b"0", b"1", b"5", b"6"]]
    # Past the gap: without it faust would stop at 2 and never commit further. (faust's gap
    # bookkeeping, the same for its own drain loop, counts the record after a gap twice: its first
    # commit stops just before that record's successor, the next one reaches 7.)
    assert out["committable"][TP(TOPIC, 0)] >= 6


def test_batches_hold_at_most_max_records(tmp_path):
    async def scenario() -> Sequence[list[bytes]]:
        s = Scenario(tmp_path, max_=3)

        async def body() -> Sequence[list[bytes]]:
            for offset in range(7):
                s.fetches.record(TOPIC, 0, offset, f"{offset}".encode())
            await s.drain()
            await s.wait_for_bodies(3)
            return s.bodies

        return await _in_context(s, body)

    assert run(scenario()) == [[b"0", b"1", b"2"], [b"3", b"4", b"5"], [b"6"]]


def test_a_record_fetched_during_a_rebalance_waits_for_flow_to_resume_and_a_stale_one_is_read_again(tmp_path):
    async def scenario() -> dict[str, Any]:
        s = Scenario(tmp_path)

        async def body() -> dict[str, Any]:
            # Fetched before a rebalance ended: the seek to the committed offsets reads it again, so
            # it is neither taken nor noted as read (the re-read would be skipped as read already).
            s.fetches.record(TOPIC, 0, 0, b"stale")
            s.app.consumer_generation_id += 1
            await s.drain()
            stale_read_offset = s.consumer._read_offset[TP(TOPIC, 0)]
            # Fetched while faust's flow control is suspended (partitions being revoked): held, as
            # faust's conductor holds it, until flow resumes, and not cleared with faust's buffers then.
            s.app.flow_control.suspend()
            s.fetches.record(TOPIC, 0, 0, b"held")
            draining = asyncio.ensure_future(s.drain())
            await asyncio.sleep(0.1)
            held = not draining.done() and not s.bodies
            s.app.flow_control.resume()
            await asyncio.wait_for(draining, HANG_GUARD_SECONDS)
            await s.wait_for_bodies(1)
            return {"stale_read_offset": stale_read_offset, "held": held, "bodies": s.bodies, "acked": s.acked(0)}

        return await _in_context(s, body)

    out = run(scenario())
    assert out["stale_read_offset"] is None
    assert out["held"]
    assert out["bodies"] == [[b"held"]]
    assert out["acked"] == [0]


def test_the_drain_loop_waits_while_the_agent_is_max_buffered_records_behind(tmp_path):
    async def scenario() -> dict[str, Any]:
        s = Scenario(tmp_path, max_=2, max_buffered=4)

        async def body() -> dict[str, Any]:
            s.release.clear()
            for offset in range(10):
                s.fetches.record(TOPIC, 0, offset, f"{offset}".encode())
            draining = asyncio.ensure_future(s.drain())
            await asyncio.wait_for(s.in_body.wait(), HANG_GUARD_SECONDS)
            await asyncio.sleep(0.1)
            # Four fetched, then the drain loop waited; one batch of two in hand, two waiting: it
            # still waits (until the agent is under half of max_buffered behind).
            behind = {"draining": not draining.done(), "pending": len(s.batched._pending)}
            s.release.set()
            await asyncio.wait_for(draining, HANG_GUARD_SECONDS)
            await s.wait_for_bodies(5)
            return {"behind": behind, "bodies": s.bodies, "acked": s.acked(0)}

        return await _in_context(s, body)

    out = run(scenario())
    assert out["behind"] == {"draining": True, "pending": 2}
    assert [v for batch in out["bodies"] for v in batch] == [f"{i}".encode() for i in range(10)]
    assert all(len(batch) <= 2 for batch in out["bodies"])
    assert out["acked"] == list(range(10))
