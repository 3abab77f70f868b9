"""Variant (a) of bench_pipeline.py, the ceiling: consume the input topics with aiokafka
``getmany`` (assigned partitions, no consumer group) and decode every message with
``pipeline.decode.decode``; no processing, nothing produced. Stops after ``--expect`` messages
(data and end markers; markers are recognised by their header and not decoded).
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiokafka import AIOKafkaConsumer, TopicPartition
from benchlib import Window, report

from pipeline.broker.topics import INPUTS
from pipeline.control import MARKER, control_kind
from pipeline.decode import decode
from pipeline.events import DeadLetter


async def run(args: argparse.Namespace) -> None:
    window = Window()
    source_of = {f"{args.prefix}{name}": name for name in INPUTS}
    consumer = AIOKafkaConsumer(bootstrap_servers=args.bootstrap, enable_auto_commit=False,
                                max_partition_fetch_bytes=4 * 1024 * 1024)
    await consumer.start()
    seen = decoded = dead = 0
    try:
        consumer.assign([TopicPartition(topic, p) for topic in source_of for p in range(args.partitions)])
        await consumer.seek_to_beginning()
        while seen < args.expect:
            batches = await consumer.getmany(timeout_ms=1000, max_records=5000)
            if batches:
                window.first()
            now_ms = int(time.time() * 1000)
            for tp, records in batches.items():
                source = source_of[tp.topic]
                for record in records:
                    seen += 1
                    if control_kind(record.headers) == MARKER:
                        continue
                    decoded += 1
                    dead += isinstance(decode(source, record.value, now_ms=now_ms), DeadLetter)
        window.end()
    finally:
        await consumer.stop()
    report(window.result(decoded, consumed=seen, dead_letters=dead))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", required=True)
    parser.add_argument("--prefix", required=True)
    parser.add_argument("--partitions", type=int, required=True)
    parser.add_argument("--expect", type=int, required=True, help="messages to consume, markers included")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
