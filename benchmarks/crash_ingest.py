"""The ingest stage's consumer group across SIGKILLs, alone (issue 8 item 1, the open event loss;
not part of ``make bench``): a fast check of one suspect of test_crash's lost events.

A child process runs ``pipeline.broker.batches.BatchConsumer`` as the worker's ingest stage does
(group, 4 input topics x 2 partitions, batches of at most ``--batch`` records, commits at most every
0.5 s), copying every record to an output topic with an aiokafka producer and awaiting the acks
before the batch counts as handled. A kafka-python producer (the test's: idempotent, acks=all)
sends 25 records every 0.2 s; the child is SIGKILLed at random moments and restarted ``--kills``
times. With ``--stalls`` the child's event loop is blocked now and then for 0.05-7 s (a loaded
machine, faust's recovery): heartbeats stop, sessions expire, rebalances and failed commits
happen mid-run. At the end every input record must be on the output topic; the child logs each
batch (per partition, the runs of offsets handled), so a loss is located: a jump inside one
process, or a restart that resumed past its committed offset. Exit status 1 if anything was lost.

With ``--writers N`` the input is written by N producers at once, each with its own connection,
every ``--interval`` seconds (with ``--kills 0``: for ``--seconds``, no kill). The embedded broker
then lets a consumer at the end of a partition skip records: a batch stored by one connection is
served before an earlier batch of another connection (its offsets already counted in the high
watermark) is stored, and the consumer's position moves past the latter (docs/reliability.md,
defect 5). One writer per partition (the fault tests, ``pipeline replay``) never showed it.

    .venv/bin/python benchmarks/crash_ingest.py --kills 25 --stalls
    .venv/bin/python benchmarks/crash_ingest.py --kills 0 --writers 4 --interval 0.05 --batch 100 --seconds 120
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

TOPICS = [f"in-{c}" for c in "abcd"]
OUT = "out"
PARTITIONS = 2


async def child(bootstrap: str, log_path: str, batch: int, stalls: bool) -> None:
    from aiokafka import AIOKafkaProducer

    from pipeline.broker.batches import BatchConsumer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=1)
    await producer.start()
    log = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the process (SIGKILLed)
    pid = os.getpid()
    log.write(f"start {pid}\n")

    async def handle(records: Any) -> None:
        sends = [await producer.send(OUT, key=r.key, value=r.value) for r in records]
        await asyncio.gather(*sends)
        # Per partition, the runs of consecutive offsets handled (a-b,c-d): a fetch can itself skip
        # offsets (the embedded broker with several writers, below), so first..last is not enough.
        runs: dict[tuple[str, int], list[list[int]]] = {}
        for r in records:
            tp_runs = runs.setdefault((r.topic, r.partition), [])
            if tp_runs and tp_runs[-1][1] + 1 == r.offset:
                tp_runs[-1][1] = r.offset
            else:
                tp_runs.append([r.offset, r.offset])
        log.write("".join(f"b {pid} {t} {p} {','.join(f'{a}-{b}' for a, b in tp_runs)}\n"
                          for (t, p), tp_runs in runs.items()))

    async def stall() -> None:
        rng = random.Random(pid)
        while True:
            await asyncio.sleep(rng.uniform(0.2, 3.0))
            seconds = rng.choice([0.05, 0.2, 0.5, 1.0, 3.0, 7.0])
            log.write(f"stall {pid} {seconds}\n")
            time.sleep(seconds)  # blocks the loop on purpose

    consumer = BatchConsumer(bootstrap_servers=[bootstrap], group_id="ingest", topics=TOPICS, max_records=batch,
                             max_wait_s=0.05)
    staller = asyncio.create_task(stall()) if stalls else None
    try:
        await consumer.run(handle)
    finally:
        if staller is not None:
            staller.cancel()


def produce(bootstrap: str, stop: threading.Event, sent: list[Any], writer: int = 0, interval: float = 0.2) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    rng = random.Random(1 + writer)
    i = 0
    while not stop.is_set():
        futures = []
        for _ in range(25):
            futures.append(producer.send(rng.choice(TOPICS), key=f"c{rng.randrange(300)}".encode(),
                                         value=f"{writer}-{i}".encode()))
            i += 1
        producer.flush()
        sent.extend(f.get(timeout=60) for f in futures)
        time.sleep(interval)
    producer.close()


def read_all(bootstrap: str, topics: list[str]) -> dict[bytes, tuple[str, int, int]]:
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, consumer_timeout_ms=3000, fetch_max_wait_ms=50)
    consumer.assign([TopicPartition(t, p) for t in topics for p in range(PARTITIONS)])
    consumer.seek_to_beginning()
    try:
        return {m.value: (m.topic, m.partition, m.offset) for m in consumer}
    finally:
        consumer.close()


def report(log_path: Path, lost: list[tuple[str, int, int]]) -> None:
    """Jumps inside one process, and whether each lost record was handled by some process."""
    last: dict[tuple[str, str, int], int] = {}
    handled: set[tuple[str, int, int]] = set()
    for line in log_path.read_text().splitlines():
        parts = line.split()
        if parts[0] != "b":
            continue
        pid, topic, partition = parts[1], parts[2], int(parts[3])
        key = (pid, topic, partition)
        for run in parts[4].split(","):
            first, end = (int(x) for x in run.split("-"))
            if key in last and first != last[key] + 1:
                print(f"  process {pid}: {topic}[{partition}] jumped from {last[key]} to {first}")
            last[key] = end
            handled.update((topic, partition, o) for o in range(first, end + 1))
    print(f"  lost {len(lost)}: first {lost[:5]}, last {lost[-3:]}; handled by some process: "
          f"{sum(1 for x in lost if x in handled)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=12)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--batch", type=int, default=5, help="max records per batch (PIPELINE_BATCH_SIZE)")
    parser.add_argument("--stalls", action="store_true", help="block the child's event loop now and then")
    parser.add_argument("--writers", type=int, default=1,
                        help="producers writing the input topics at once, each with its own connection")
    parser.add_argument("--interval", type=float, default=0.2, help="seconds between a writer's chunks of 25")
    parser.add_argument("--seconds", type=float, default=60.0, help="with --kills 0: how long to run")
    args = parser.parse_args()

    from kafka.admin import KafkaAdminClient, NewTopic

    from pipeline.broker.embedded import EmbeddedBroker

    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp, EmbeddedBroker(Path(tmp)) as broker:
        bootstrap = broker.bootstrap
        admin = KafkaAdminClient(bootstrap_servers=bootstrap)
        admin.create_topics([NewTopic(t, PARTITIONS, 1) for t in [*TOPICS, OUT]])
        admin.close()
        log_path = Path(tmp) / "batches.log"
        stop, sent = threading.Event(), []  # type: ignore[var-annotated]
        feeders = [threading.Thread(target=produce, args=(bootstrap, stop, sent, w, args.interval),
                                    daemon=True)
                   for w in range(args.writers)]
        command = [sys.executable, __file__, "--child", bootstrap, str(log_path), str(args.batch),
                   "1" if args.stalls else "0"]
        process = subprocess.Popen(command)
        for feeder in feeders:
            feeder.start()
        try:
            if not args.kills:
                time.sleep(args.seconds)
            for kill in range(args.kills):
                time.sleep(rng.uniform(1.0, 8.0))
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
                print(f"SIGKILL {kill + 1} after {len(sent)} records sent", flush=True)
                time.sleep(rng.uniform(0.0, 1.0))
                process = subprocess.Popen(command)
            time.sleep(2)
            stop.set()
            for feeder in feeders:
                feeder.join()
            inputs = read_all(bootstrap, TOPICS)
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                out = read_all(bootstrap, [OUT])
                if set(inputs) <= set(out):
                    break
                time.sleep(2)
        finally:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
        lost = sorted(inputs[v] for v in set(inputs) - set(out))
        where = [(m.topic, m.partition, m.offset) for m in sent]
        print(f"{args.kills} SIGKILLs, {args.writers} writer(s): {len(sent)} records acknowledged "
              f"({len(where) - len(set(where))} offsets given twice), {len(inputs)} on the input topics, "
              f"{len(set(out) & set(inputs))} of them on the output topic, lost {len(lost)}; "
              f"load average {open('/proc/loadavg').read().split()[:3]}")
        if lost:
            report(log_path, lost)
        return 1 if lost or len(inputs) != len(sent) else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        asyncio.run(child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"))
    else:
        sys.exit(main())
