"""Variant (d) of bench_pipeline.py, the peer: the pipeline's profile and segment logic written on
Quix Streams, with the same pure core:

1. per input topic: skip the end markers (their value is not Avro: no 0x00 magic byte), decode with
   ``pipeline.decode.decode`` (dead letters dropped; the generated input has none), route with
   ``pipeline.identity.routing_key``;
2. ``group_by`` the routing key (Quix's repartition topic; the pipeline's ``customer-events``);
3. a stateful ``apply``: the customer's ``ProfileState`` as a JSON dict in Quix's RocksDB state
   (changelog topic, checkpoints every 5 s), ``pipeline.processor.step`` with the same segments,
   each change Avro-encoded (``pipeline.codecs.encode_change``) to the segment-changes topic.

What the pipeline does and this does not: identity linking and merges (commands between
partitions), profile-updates messages, dead-letter output, timers, the ClickHouse sink. With
``--schedule`` it also computes each profile's next time-driven check after every event, as the
pipeline does (``pipeline.processor.schedule``), without firing timers.
Stops (``Application.stop``) after ``--events`` events reached step 3, and reports.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from benchlib import Window, report
from quixstreams import Application, State
from quixstreams.models import TopicConfig

from pipeline.broker.topics import INPUTS
from pipeline.codecs import encode_change
from pipeline.decode import decode
from pipeline.events import DeadLetter, Event
from pipeline.identity import routing_key
from pipeline.processor import Config, schedule, step
from pipeline.profile import ProfileState
from pipeline.segments.definitions import load_segments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--events", type=int, required=True, help="data events to process before stopping")
    parser.add_argument("--group", required=True)
    parser.add_argument("--output", required=True, help="the peer's segment-changes topic")
    parser.add_argument("--state-dir", required=True)
    parser.add_argument("--segments", required=True)
    parser.add_argument("--schedule", action="store_true",
                        help="also compute each profile's next time-driven check (pipeline.processor.schedule), "
                        "as the pipeline does for its timers (no timer fires here)")
    args = parser.parse_args()

    segments = load_segments(Path(args.segments))
    config = Config()
    window = Window()
    counts = {"events": 0, "changes": 0, "dead_letters": 0, "decoded": 0}
    marks: dict[str, float] = {}  # when the last event was decoded, when the first reached the profile step
    topic_config = TopicConfig(num_partitions=args.partitions, replication_factor=1,
                               extra_config={"retention.ms": "-1", "retention.bytes": "-1"})
    app = Application(
        broker_address=args.bootstrap, consumer_group=args.group, auto_offset_reset="earliest",
        state_dir=args.state_dir, loglevel="WARNING",
        # The embedded broker holds a JoinGroup for half the rebalance timeout (max.poll.interval.ms, which
        # must also outlast the longest gap between polls: 6 s was exceeded once under load).
        consumer_extra_config={"session.timeout.ms": 6000, "heartbeat.interval.ms": 1000,
                               "max.poll.interval.ms": 15000, "fetch.wait.max.ms": 20},
    )
    app_logger = logging.getLogger("quixstreams")
    app_logger.setLevel(logging.WARNING)

    def decoder(source: str) -> Any:
        def to_event(value: bytes) -> dict[str, Any] | None:
            window.first()
            counts["decoded"] += 1
            if counts["decoded"] == args.events:
                marks["decoded_all_at"] = time.time()
            result = decode(source, value, now_ms=int(time.time() * 1000))
            if isinstance(result, DeadLetter):
                counts["dead_letters"] += 1
                return None
            key = routing_key(customer_id=result.customer_id, loyalty_id=result.loyalty_id,
                              email_hash=result.email_hash, anonymous_id=result.anonymous_id)
            return {"key": key, "event": result.to_dict()}
        return to_event

    frames = []
    for source in INPUTS:
        topic = app.topic(f"{args.prefix}{source}", key_deserializer="bytes", value_deserializer="bytes",
                          config=topic_config)
        sdf = app.dataframe(topic)
        sdf = sdf.filter(lambda value: value[:1] == b"\x00").apply(decoder(source))
        frames.append(sdf.filter(lambda value: value is not None))
    sdf = frames[0]
    for other in frames[1:]:
        sdf = sdf.concat(other)
    sdf = sdf.group_by(lambda value: value["key"], name="customer")

    def profile(value: dict[str, Any], state: State) -> list[bytes]:
        event = Event.from_dict(value["event"])
        stored = state.get("profile")
        previous = ProfileState.from_dict(stored) if stored else None
        now_ms = int(time.time() * 1000)
        result = step(previous, value["key"], event, now_ms, segments, config)
        if not result.duplicate:
            if args.schedule:
                schedule(result.state, now_ms, segments, config)
            state.set("profile", result.state.to_dict())
        counts["events"] += 1
        marks.setdefault("first_profiled_at", time.time())
        counts["changes"] += len(result.changes)
        if counts["events"] >= args.events:
            window.end()
            app.stop()
        return [encode_change(change.to_dict()) for change in result.changes]

    changes = app.topic(args.output, key_serializer="str", value_serializer="bytes", config=topic_config)
    sdf.apply(profile, stateful=True, expand=True).to_topic(changes)
    app.run()
    stopped_at = time.time()
    report(window.result(counts["events"], changes=counts["changes"], dead_letters=counts["dead_letters"],
                         stopped_at=stopped_at, **marks))


if __name__ == "__main__":
    main()
