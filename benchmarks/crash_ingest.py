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
``--tail`` replaces the child by a bare consumer following the input topics (no group, no
handler), which shows the broker's skips more often than the ingest stage (always at the end).

    .venv/bin/python benchmarks/crash_ingest.py --kills 25 --stalls
    .venv/bin/python benchmarks/crash_ingest.py --kills 0 --writers 4 --interval 0.05 --batch 100 --seconds 120
    .venv/bin/python benchmarks/crash_ingest.py --tail --writers 4 --interval 0 --topics 1 --seconds 90
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


def produce(bootstrap: str, stop: threading.Event, sent: list[Any], writer: int = 0, interval: float = 0.2,
            topics: int = len(TOPICS)) -> None:
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=5, acks="all")
    rng = random.Random(1 + writer)
    i = 0
    while not stop.is_set():
        futures = []
        for _ in range(25):
            futures.append(producer.send(rng.choice(TOPICS[:topics]), key=f"c{rng.randrange(300)}".encode(),
                                         value=f"{writer}-{i}".encode()))
            i += 1
        producer.flush()
        sent.extend(f.get(timeout=60) for f in futures)
        time.sleep(interval)
    producer.close()


def tail(bootstrap: str, stop: threading.Event, seen: set[bytes], jumps: list[tuple[str, int, int, int]]) -> None:
    """``--tail``: a bare aiokafka consumer (no group, no handler) following the input topics at
    their end, noting each time a partition's next record is not the one after the last."""
    from aiokafka import AIOKafkaConsumer

    async def run() -> None:
        consumer = AIOKafkaConsumer(*TOPICS, bootstrap_servers=bootstrap, fetch_max_wait_ms=20,
                                    auto_offset_reset="earliest")
        await consumer.start()
        following: dict[Any, int] = {}
        quiet = 0
        try:
            while quiet < 30:  # 3 s without a record once the writers stopped
                fetched = await consumer.getmany(timeout_ms=100)
                quiet = quiet + 1 if stop.is_set() and not fetched else 0
                for tp, records in fetched.items():
                    for record in records:
                        if tp in following and record.offset != following[tp]:
                            jumps.append((tp.topic, tp.partition, following[tp], record.offset))
                        following[tp] = record.offset + 1
                        seen.add(record.value)
        finally:
            await consumer.stop()

    asyncio.run(run())


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
    parser.add_argument("--topics", type=int, default=len(TOPICS), help="how many of the input topics are written")
    parser.add_argument("--seconds", type=float, default=60.0, help="with --kills 0: how long to run")
    parser.add_argument("--tail", action="store_true",
                        help="no child: a bare consumer follows the input topics (implies --kills 0)")
    args = parser.parse_args()
    if args.tail:
        args.kills = 0

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
        feeders = [threading.Thread(target=produce, args=(bootstrap, stop, sent, w, args.interval, args.topics),
                                    daemon=True)
                   for w in range(args.writers)]
        command = [sys.executable, __file__, "--child", bootstrap, str(log_path), str(args.batch),
                   "1" if args.stalls else "0"]
        seen: set[bytes] = set()
        jumps: list[tuple[str, int, int, int]] = []
        tailer = threading.Thread(target=tail, args=(bootstrap, stop, seen, jumps), daemon=True)
        process: subprocess.Popen[bytes] | None = None
        if args.tail:
            tailer.start()
        else:
            process = subprocess.Popen(command)
        for feeder in feeders:
            feeder.start()
        try:
            if not args.kills:
                time.sleep(args.seconds)
            for kill in range(args.kills):
                assert process is not None
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
            if args.tail:
                tailer.join()
                out = dict.fromkeys(seen, ("", 0, 0))
            deadline = time.monotonic() + 120
            while not args.tail and time.monotonic() < deadline:
                out = read_all(bootstrap, [OUT])
                if set(inputs) <= set(out):
                    break
                time.sleep(2)
        finally:
            if process is not None:
                os.kill(process.pid, signal.SIGKILL)
                process.wait()
        lost = sorted(inputs[v] for v in set(inputs) - set(out))
        where = [(m.topic, m.partition, m.offset) for m in sent]
        print(f"{args.kills} SIGKILLs, {args.writers} writer(s): {len(sent)} records acknowledged "
              f"({len(where) - len(set(where))} offsets given twice), {len(inputs)} on the input topics, "
              f"{len(set(out) & set(inputs))} of them on the output topic, lost {len(lost)}; "
              f"load average {open('/proc/loadavg').read().split()[:3]}")
        if args.tail:
            print(f"  the tailing consumer jumped {len(jumps)} times: {jumps[:10]}")
        elif lost:
            report(log_path, lost)
        return 1 if lost or len(inputs) != len(sent) else 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        asyncio.run(child(sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5] == "1"))
    else:
        sys.exit(main())
