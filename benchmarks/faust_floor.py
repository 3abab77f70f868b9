"""Variant (b) of bench_pipeline.py, faust's own floor: one faust agent over the input topics,
raw bytes (no serializer, no decode, no table), forwarding every message unchanged to an output
topic, in one of faust's two simple paths:

- ``take_events``: ``stream.take_events(2000, 0.2)`` batches (what the pipeline's agents use),
  one ``send`` per message, the batch's sends awaited together before the next batch;
- ``per_event``: ``async for key, value in stream.items()``, one awaited ``send`` each.

Two more isolate the cost of faust's per-message consumption path in the profile stage's shape
(the pipeline's adaptive window: at most 2000 events, 50 ms, 5 ms linger; sends straight to
faust's producer; the batch's sends awaited, then its acks):

- ``take_events_direct``: ``BatchedTopic(enabled=False)``: the same windows over faust's stream
  (faust's drain loop, conductor, channel, stream iterator and an Event per message);
- ``batched``: ``pipeline.broker.stream.BatchedTopic``, the records taken off faust's consumer in
  batches, tracked and acked through it (same app, topics, assignment and commits).

Offsets are acked by faust as usual. Exits (``os._exit``) once ``--expect`` messages went through,
after printing its result line.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from typing import Any

import faust
from benchlib import Window, report
from faust.worker import Worker

from pipeline.broker.topics import INPUTS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--broker", required=True, help="kafka://host:port")
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--expect", type=int, required=True, help="messages to forward, markers included")
    parser.add_argument("--events", type=int, required=True, help="data messages among them (reported)")
    parser.add_argument("--mode", choices=("take_events", "per_event", "take_events_direct", "batched"),
                        default="take_events")
    parser.add_argument("--app-id", required=True)
    parser.add_argument("--output", required=True, help="output topic")
    parser.add_argument("--data-dir", required=True)
    args = parser.parse_args()
    sys.argv = sys.argv[:1]  # faust's Worker parses the command line too

    window = Window()
    app = faust.App(args.app_id, broker=args.broker, store="memory://", datadir=args.data_dir,
                    topic_partitions=args.partitions, broker_rebalance_timeout=6, broker_session_timeout=6,
                    broker_heartbeat_interval=1, web_enabled=False, topic_allow_declare=True,
                    key_serializer="raw", value_serializer="raw")
    raw: dict[str, Any] = {"key_serializer": "raw", "value_serializer": "raw"}
    inputs = app.topic(*(f"{args.prefix}{name}" for name in INPUTS), **raw)
    output = app.topic(args.output, **raw)
    seen = 0

    def finish() -> None:
        window.end()
        report(window.result(args.events, consumed=seen, mode=args.mode))
        os._exit(0)

    if args.mode == "take_events":
        @app.agent(inputs)
        async def forward(stream: Any) -> None:
            nonlocal seen
            async for batch in stream.take_events(2000, 0.2):
                window.first()
                sends = [await output.send(key=e.message.key, value=e.message.value) for e in batch]
                await asyncio.gather(*sends)
                seen += len(batch)
                if seen >= args.expect:
                    finish()
    elif args.mode in ("take_events_direct", "batched"):
        from pipeline.broker.stream import BatchedTopic

        batched = BatchedTopic(app, inputs, enabled=args.mode == "batched")
        out_name = output.get_topic_name()

        @app.agent(inputs)
        async def forward(stream: Any) -> None:
            nonlocal seen
            async for batch in batched.batches(stream, 2000, 0.05, 0.005):
                window.first()
                send = app.producer.send
                sends = [await send(out_name, m.key, m.value, partition=None, timestamp=None, headers=None)
                         for m in batch]
                await asyncio.gather(*sends)
                seen += len(batch)
                if seen >= args.expect:
                    finish()
    else:
        @app.agent(inputs)
        async def forward(stream: Any) -> None:
            nonlocal seen
            async for key, value in stream.items():
                window.first()
                await output.send(key=key, value=value)
                seen += 1
                if seen >= args.expect:
                    await app.producer.flush()
                    finish()

    Worker(app, loglevel="warning").execute_from_commandline()


if __name__ == "__main__":
    main()
