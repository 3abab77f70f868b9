"""A stage batch's sends: faust's producer record by record (what the worker did before) against
``pipeline.broker.sends.Sends`` (one produce batch per topic partition), on the embedded broker.

    .venv/bin/python benchmarks/bench_sends.py [--batches 40] [--records 8000] [--rounds 3]

Each batch is ``--records`` records spread over customer keys and three topics of 4 partitions
(sizes like the worker's outputs: changes ~120 B, profile rows ~1.2 KB, folded events ~400 B);
the two ways alternate batch by batch in one process, each batch awaited until acknowledged.
Prints the client's CPU per record (this process: encode, partition, accumulate, send, resolve
acknowledgements; the broker's CPU is apart) and the Python heap's peak during a batch (tracemalloc,
one batch each at the end). CPU per record is the robust figure on a shared machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import faust

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pipeline.broker.embedded import EmbeddedBroker  # noqa: E402
from pipeline.broker.sends import Sends  # noqa: E402
from pipeline.broker.topics import TopicSpec, ensure_topics  # noqa: E402

SIZES = {"changes": 120, "profiles": 1200, "folded": 400}


def batch(records: int, rng: random.Random) -> list[tuple[str, bytes, bytes]]:
    out = []
    topics = list(SIZES)
    for _ in range(records):
        topic = rng.choice(topics)
        out.append((topic, f"cust-{rng.randrange(3000):05d}".encode(), rng.randbytes(SIZES[topic])))
    return out


async def per_record(app: faust.App, records: list[tuple[str, bytes, bytes]]) -> None:
    futures = [await app.producer.send(topic, key, value, partition=None, timestamp=None, headers=None)
               for topic, key, value in records]
    await asyncio.gather(*futures)


async def batched(app: faust.App, records: list[tuple[str, bytes, bytes]]) -> None:
    sends = Sends(app.producer)
    for topic, key, value in records:
        sends.add(topic, key, value)
    await sends.flush()


async def run(args: argparse.Namespace, url: str, prefix: str) -> None:
    app = faust.App(f"bench-sends-{prefix}", broker=url, web_enabled=False, producer_linger=0.005,
                    producer_max_batch_size=args.max_batch_size)
    await app.producer.start()
    rng = random.Random(1)
    ways = {"faust producer.send per record": per_record, "Sends (batch per partition)": batched}
    cpu = dict.fromkeys(ways, 0.0)
    wall = dict.fromkeys(ways, 0.0)
    try:
        named = [[(f"{prefix}-{topic}", key, value) for topic, key, value in batch(args.records, rng)]
                 for _ in range(args.batches)]
        for way in ways.values():  # warm-up: metadata, connections
            await way(app, named[0][:100])
        for _ in range(args.rounds):
            for records in named:
                for name, way in ways.items():
                    c0, w0 = time.process_time(), time.perf_counter()
                    await way(app, records)
                    cpu[name] += time.process_time() - c0
                    wall[name] += time.perf_counter() - w0
        peaks = {}
        for name, way in ways.items():
            tracemalloc.start()
            await way(app, named[-1])
            peaks[name] = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    finally:
        await app.producer.stop()
    total = args.records * args.batches * args.rounds
    print(f"{total:,} records per way, batches of {args.records:,}, producer batches of {args.max_batch_size:,} B; "
          f"load {os.getloadavg()[0]:.2f} (1-min)")
    print(f"{'way':34}{'CPU us/record':>15}{'wall us/record':>16}{'heap peak MiB':>15}")
    for name in ways:
        print(f"{name:34}{cpu[name] / total * 1e6:>15.1f}{wall[name] / total * 1e6:>16.1f}"
              f"{peaks[name] / 2**20:>15.1f}")
    first, second = ways
    print(f"CPU ratio (Sends / per record): {cpu[second] / cpu[first]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--records", type=int, default=8000, help="records per batch (~2000 events' outputs)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-batch-size", type=int, default=16384, help="faust's producer_max_batch_size (bytes)")
    args = parser.parse_args()
    print(f"load before {os.getloadavg()[0]:.2f} (1-min)")
    with tempfile.TemporaryDirectory(prefix="bench-sends-") as tmp, EmbeddedBroker(Path(tmp)) as broker:
        prefix = f"s{os.getpid()}"
        ensure_topics([broker.bootstrap], [TopicSpec(f"{prefix}-{t}") for t in SIZES], partitions=4)
        asyncio.run(run(args, broker.url, prefix))


if __name__ == "__main__":
    main()
