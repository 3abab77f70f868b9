"""Latency at a steady rate (issue 9, item 2): produce -> segment change, produce -> ClickHouse row,
and time-driven exit -> its deadline.

    .venv/bin/python benchmarks/bench_latency.py [--rate 100] [--seconds 60] [--burst 15000]
        [--half-load/--no-half-load] [--partitions 4] [--out benchmarks/results/latency.json]

One embedded broker and one ``python -m pipeline worker`` (RocksDB store, wall clock, the ClickHouse
sink on chDB with its default PIPELINE_SINK_BATCH_SECONDS=0.5, the HTTP API) on three segments made
so that every event produces exactly one known change, for a customer id never seen before:

- ``buyers``      ``orders_count >= 1 AND lifetime_value >= 10``: a purchase of 25 by a fresh customer
                  enters it (most events);
- ``ch_probe``    ``orders_count >= 1 AND lifetime_value < 10``: a purchase of 5 by a fresh customer
                  (1 event in 20); these are the customers looked for in ClickHouse;
- ``recent_10s``  ``page_views_count >= 1 AND last_seen_at > now() - INTERVAL 10 SECOND``: a page view by
                  a fresh customer (1 event in 4) enters it, and the worker's timers make it leave 10 s
                  later, with the exact deadline as the exit's ``changed_at``.

Measured, per event, from the wall-clock time just before ``send`` (also its ``occurred_at``):

- event -> change: until a consumer (assigned to every partition of ``segment-changes``, polling
  continuously) receives the ``entered`` change of that customer;
- event -> ClickHouse: until the customer is listed by ``GET /cohorts/ch_probe`` (polled every
  ``--poll-ms``, so up to that much is added), i.e. its membership row was inserted and is visible;
- exit delay: the ``exited`` change's arrival minus its ``changed_at`` (the deadline).

Phases, on the same worker: (1) ``--seconds`` at ``--rate`` events/s; (2) the throughput of this
worker on the same event mix, from a backlog of ``--burst`` events produced at once to the ``done`` of
the end-marker protocol (pipeline.control); (3) ``--seconds`` at half of that throughput. Each steady
phase ends with a 14 s tail so the last exits arrive. Every process started here is stopped here; the
temporary directory is deleted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from benchlib import send_end_markers

from pipeline.broker import topics as t
from pipeline.broker.embedded import EmbeddedBroker, free_port
from pipeline.codecs import decode_change
from pipeline.control import DONE, MARKER, Marker, control_kind
from pipeline.processes import stop_process
from pipeline.settings import load_settings

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PREFIX = "lat-"
EXIT_AFTER_S = 10
SEGMENTS = f"""segments:
  - id: buyers
    where: orders_count >= 1 AND lifetime_value >= 10
  - id: ch_probe
    where: orders_count >= 1 AND lifetime_value < 10
  - id: recent_10s
    where: page_views_count >= 1 AND last_seen_at > now() - INTERVAL {EXIT_AFTER_S} SECOND
"""


def percentiles(values: list[float]) -> dict[str, Any]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))], 1)

    return {"n": len(ordered), "p50": at(50), "p99": at(99), "p99.9": at(99.9), "max": round(ordered[-1], 1),
            "mean": round(sum(ordered) / len(ordered), 1)}


def event(kind: str, customer: str, now_ms: int) -> tuple[str, dict[str, Any]]:
    if kind == "view":
        return "clickstream", {"event_id": f"{customer}-v", "occurred_at": now_ms, "customer_id": customer,
                               "type": "page_view", "category": "books", "session_id": f"{customer}-s",
                               "product_id": "books-1", "url": "/p/books-1"}
    total = 5.0 if kind == "probe" else 25.0
    return "pos", {"transaction_id": f"{customer}-t", "occurred_at": now_ms, "customer_id": customer,
                   "kind": "purchase", "total": total, "channel": "store", "store_id": "s-01", "currency": "EUR",
                   "items": [{"sku": "books-1", "category": "books", "quantity": 1, "unit_price": total}]}


def kind_of(index: int) -> str:
    return "probe" if index % 20 == 0 else "view" if index % 4 == 1 else "buy"


class ChangeReader(threading.Thread):
    """Receives segment changes as they come; remembers each one's arrival time."""

    def __init__(self, bootstrap: str, topic: str, partitions: int) -> None:
        super().__init__(daemon=True)
        from kafka import KafkaConsumer, TopicPartition

        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=5, consumer_timeout_ms=100)
        parts = [TopicPartition(topic, p) for p in range(partitions)]
        self.consumer.assign(parts)
        self.consumer.seek_to_end()
        for part in parts:
            self.consumer.position(part)  # resolve now: only what comes after this
        self.entered: dict[str, float] = {}
        self.exited: dict[str, tuple[float, int]] = {}  # customer -> (arrival, changed_at ms)
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            batches = self.consumer.poll(timeout_ms=50)
            arrived = time.time()
            for records in batches.values():
                for record in records:
                    if record.value is None or control_kind(record.headers) == MARKER:
                        continue
                    change = decode_change(record.value)
                    if change["change"] == "entered":
                        self.entered.setdefault(change["customer_id"], arrived)
                    else:
                        self.exited.setdefault(change["customer_id"], (arrived, change["changed_at"]))
        self.consumer.close()


class CohortPoller(threading.Thread):
    """Polls GET /cohorts/ch_probe; remembers when each member was first listed."""

    def __init__(self, port: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.interval = interval
        self.seen: dict[str, float] = {}
        self.halt = threading.Event()
        self.polls = 0

    def run(self) -> None:
        while not self.halt.wait(self.interval):
            cursor = None
            try:
                while True:
                    query = "limit=1000" + (f"&cursor={cursor}" if cursor else "")
                    url = f"http://127.0.0.1:{self.port}/cohorts/ch_probe?{query}"
                    with urllib.request.urlopen(url, timeout=10) as response:
                        page = json.loads(response.read())
                    arrived = time.time()
                    for member in page["members"]:
                        customer = member["customer_id"] if isinstance(member, dict) else member
                        self.seen.setdefault(customer, arrived)
                    cursor = page.get("next_cursor")
                    if not cursor:
                        break
                self.polls += 1
            except OSError:
                continue


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.broker = EmbeddedBroker(tmp / "broker")
        self.port = free_port()
        self.log_path = tmp / "worker.log"
        self.worker: subprocess.Popen[bytes] | None = None
        self.sent: dict[str, tuple[str, float]] = {}  # customer -> (kind, produce time)
        self.counter = 0
        self.run_tag = uuid.uuid4().hex[:6]

    def start(self) -> None:
        args = self.args
        self.broker.start()
        settings = load_settings(broker=self.broker.url, topic_prefix=PREFIX, partitions=args.partitions)
        t.ensure_topics([self.broker.bootstrap], t.product_topics(settings), args.partitions)
        segments = self.tmp / "segments.yaml"
        segments.write_text(SEGMENTS)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
        env.update({"PIPELINE_BROKER": self.broker.url, "PIPELINE_TOPIC_PREFIX": PREFIX,
                    "PIPELINE_APP_ID": f"lat-{self.run_tag}", "PIPELINE_DATA_DIR": str(self.tmp / "worker"),
                    "PIPELINE_PARTITIONS": str(args.partitions), "PIPELINE_STORE": "rocksdb://",
                    "PIPELINE_SEGMENTS_PATH": str(segments), "PIPELINE_HTTP_PORT": str(self.port),
                    "PIPELINE_CLOCK": "wall", "PIPELINE_LOG_LEVEL": "warning"})
        with open(self.log_path, "wb") as log:
            self.worker = subprocess.Popen([sys.executable, "-m", "pipeline", "worker"], cwd=ROOT, env=env,
                                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True)
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/ready", timeout=5) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if self.worker.poll() is not None:
                raise RuntimeError(f"the worker exited with code {self.worker.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("the worker was not ready within 180 s")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.worker is not None:
            stop_process(self.worker, timeout=30)
        self.broker.stop()

    def producer(self) -> Any:
        from kafka import KafkaProducer

        return KafkaProducer(bootstrap_servers=self.broker.bootstrap, linger_ms=0, acks="all")

    def send(self, producer: Any, phase: str) -> tuple[str, str]:
        self.counter += 1
        kind = kind_of(self.counter)
        customer = f"{phase}-{self.run_tag}-{self.counter:07d}"
        now = time.time()
        source, record = event(kind, customer, int(now * 1000))
        producer.send(f"{PREFIX}{source}", key=customer.encode(), value=json.dumps(record).encode())
        return customer, kind

    def steady(self, rate: float, phase: str) -> dict[str, Any]:
        args = self.args
        print(f"[{time.strftime('%H:%M:%S')}] {phase}: {rate:.0f} events/s for {args.seconds} s", flush=True)
        reader = ChangeReader(self.broker.bootstrap, f"{PREFIX}{t.SEGMENT_CHANGES}", args.partitions)
        poller = CohortPoller(self.port, args.poll_ms / 1000)
        reader.start()
        poller.start()
        producer = self.producer()
        sent: dict[str, tuple[str, float]] = {}
        started = time.time()
        count = 0
        try:
            while (now := time.time()) < started + args.seconds:
                for _ in range(int((now - started) * rate) - count):
                    send_at = time.time()
                    customer, kind = self.send(producer, phase)
                    sent[customer] = (kind, send_at)
                    count += 1
                time.sleep(0.002)
            producer.flush()
            time.sleep(EXIT_AFTER_S + 4)  # the last exits, the last sink batches
        finally:
            producer.close()
            reader.halt.set()
            poller.halt.set()
            reader.join(10)
            poller.join(15)
        change_ms, ch_ms, exit_ms, deadline_err = [], [], [], []
        missing = {"change": 0, "clickhouse": 0, "exit": 0}
        for customer, (kind, send_at) in sent.items():
            if customer in reader.entered:
                change_ms.append(1000 * (reader.entered[customer] - send_at))
            else:
                missing["change"] += 1
            if kind == "probe":
                if customer in poller.seen:
                    ch_ms.append(1000 * (poller.seen[customer] - send_at))
                else:
                    missing["clickhouse"] += 1
            if kind == "view":
                if customer in reader.exited:
                    arrived, changed_at = reader.exited[customer]
                    exit_ms.append(1000 * arrived - changed_at)
                    deadline_err.append(changed_at - (1000 * send_at + EXIT_AFTER_S * 1000))
                else:
                    missing["exit"] += 1
        achieved = count / args.seconds
        return {"rate": rate, "achieved_rate": round(achieved, 1), "seconds": args.seconds, "events": count,
                "event_to_change_ms": percentiles(change_ms), "event_to_clickhouse_ms": percentiles(ch_ms),
                "exit_after_deadline_ms": percentiles(exit_ms),
                "deadline_minus_occurred_plus_10s_ms": percentiles(deadline_err),
                "cohort_polls": poller.polls, "poll_ms": args.poll_ms, "missing": missing}

    def throughput(self) -> dict[str, Any]:
        from kafka import KafkaConsumer, TopicPartition

        args = self.args
        print(f"[{time.strftime('%H:%M:%S')}] throughput: backlog of {args.burst} events", flush=True)
        producer = self.producer()
        started = time.time()
        for _ in range(args.burst):
            self.send(producer, "burst")
        watermark = int(time.time() * 1000)
        run_id = uuid.uuid4().hex
        send_end_markers(producer, lambda source: f"{PREFIX}{source}", run_id, watermark, args.partitions)
        produced_at = time.time()
        consumer = KafkaConsumer(bootstrap_servers=self.broker.bootstrap, consumer_timeout_ms=200)
        consumer.assign([TopicPartition(f"{PREFIX}{t.CONTROL}", p) for p in range(args.partitions)])
        consumer.seek_to_beginning()
        deadline = time.monotonic() + 900
        done_at = None
        try:
            while done_at is None:
                for record in consumer:
                    if control_kind(record.headers) == DONE and Marker.decode(record.value).run_id == run_id:
                        done_at = time.time()
                        break
                assert self.worker is not None
                if self.worker.poll() is not None:
                    raise RuntimeError(f"the worker exited with code {self.worker.returncode}")
                if time.monotonic() > deadline:
                    raise RuntimeError("no done within 900 s")
        finally:
            consumer.close()
        seconds = done_at - started
        return {"events": args.burst, "produce_s": round(produced_at - started, 2), "seconds": round(seconds, 2),
                "events_per_s": round(args.burst / seconds, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=100.0, help="the first steady phase, events/s")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each steady phase")
    parser.add_argument("--burst", type=int, default=15000, help="backlog for the throughput measurement")
    parser.add_argument("--half-load", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the throughput, then a steady phase at half of it")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--poll-ms", type=float, default=100.0, help="GET /cohorts/ch_probe interval")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "latency.json")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    bench = Bench(args, tmp)
    result: dict[str, Any] = {"settings": {"partitions": args.partitions, "store": "rocksdb://", "clock": "wall",
                                           "sink_batch_seconds": 0.5, "batch_seconds": 0.05,
                                           "timer_interval_seconds": 0.5, "segments": SEGMENTS}}
    try:
        bench.start()
        result["steady"] = [bench.steady(args.rate, "fixed")]
        if args.half_load:
            result["throughput"] = bench.throughput()
            half = result["throughput"]["events_per_s"] / 2
            result["steady"].append(bench.steady(half, "half"))
        result["worker_alive"] = bench.worker is not None and bench.worker.poll() is None
    except BaseException:
        if bench.log_path.exists():
            args.out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(bench.log_path, args.out.with_suffix(".worker.log"))
        raise
    finally:
        bench.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for phase in result["steady"]:
        c, k, e = phase["event_to_change_ms"], phase["event_to_clickhouse_ms"], phase["exit_after_deadline_ms"]
        print(f"{phase['rate']:.0f} events/s (achieved {phase['achieved_rate']}): event->change p50 {c.get('p50')} "
              f"p99 {c.get('p99')} p99.9 {c.get('p99.9')} ms (n={c['n']}); event->ClickHouse p50 {k.get('p50')} "
              f"p99 {k.get('p99')} p99.9 {k.get('p99.9')} ms (n={k['n']}); exit after deadline p50 {e.get('p50')} "
              f"p99 {e.get('p99')} p99.9 {e.get('p99.9')} max {e.get('max')} ms (n={e['n']}); "
              f"missing {phase['missing']}", flush=True)
    if "throughput" in result:
        print(f"throughput (same worker, same mix): {result['throughput']['events_per_s']} events/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
