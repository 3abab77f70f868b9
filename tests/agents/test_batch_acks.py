"""``BatchedTopic.batches`` acks (and so lets faust commit) a batch's events only once the agent's
body for that batch returned: a body that raised must leave them unacked, to be consumed again after
a rebalance or restart, never committed unprocessed. A bare faust app in ``test_context()`` (no
broker, so the events come through faust's stream); acks are seen through faust's sensor hook, as in
harness.Processed."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import faust
from faust.types import TP

from pipeline.broker.stream import BatchedTopic
from tests.agents.harness import run


class Acked(faust.Sensor):
    def __init__(self) -> None:
        super().__init__()
        self.values: list[bytes] = []

    def on_stream_event_out(self, tp: TP, offset: int, stream: Any, event: Any, state: Any = None) -> None:
        self.values.append(event.value)


async def _batches(tmp_path: Path, fail_first: bool) -> tuple[list[list[bytes]], list[bytes], BaseException | None]:
    """Three events, taken as one batch of at most three: the bodies run, what was acked, the crash."""
    app = faust.App(f"batch-acks-{fail_first}", broker="kafka://127.0.0.1:9", store="memory://",
                    datadir=str(tmp_path), web_enabled=False)
    topic = app.topic("events", key_serializer="raw", value_serializer="raw")
    acked = Acked()
    app.sensors.add(acked)
    bodies: list[list[bytes]] = []

    batched = BatchedTopic(app, topic)

    @app.agent(topic)
    async def agent(stream: Any) -> None:
        async for batch in batched.batches(stream, 3, 60.0, 60.0):
            bodies.append([message.value for message in batch])
            if fail_first and len(bodies) == 1:
                raise RuntimeError("the body failed")

    crash: BaseException | None = None
    try:
        async with agent.test_context() as context:
            for value in (b"a", b"b", b"c"):
                await context.put(value, key=b"k", partition=0)
            for _ in range(200):  # until the batch was handled (or the body crashed)
                if getattr(context, "_crash_reason", None) is not None or len(acked.values) >= 3:
                    break
                await asyncio.sleep(0.01)
            await asyncio.sleep(0.2)  # time for a closed generator's finalizer to run (it acked, before)
    except RuntimeError as exc:  # the test wrapper re-raises the agent's crash on exit
        crash = exc
    return bodies, list(acked.values), crash


def test_a_batch_whose_body_returned_is_acked(tmp_path):
    bodies, acked, crash = run(_batches(tmp_path, fail_first=False))
    assert crash is None
    assert bodies == [[b"a", b"b", b"c"]]
    assert acked == [b"a", b"b", b"c"]


def test_a_batch_whose_body_raised_is_not_acked(tmp_path):
    bodies, acked, crash = run(_batches(tmp_path, fail_first=True))
    assert bodies == [[b"a", b"b", b"c"]]
    assert isinstance(crash, RuntimeError), crash
    assert acked == []  # unprocessed: never committed; consumed again after a rebalance or restart
