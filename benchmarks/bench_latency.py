"""Latency at a steady rate (issue 9, item 2): produce -> segment change, produce -> ClickHouse row,
and time-driven exit -> its deadline.

    .venv/bin/python benchmarks/bench_latency.py [--rate 100 | --rates 200,400,800] [--seconds 60]
        [--burst 15000] [--half-load/--no-half-load] [--half-rate R] [--idle-seconds S] [--py-spy S]
        [--producer-linger-ms 0] [--reader-wait-ms 5] [--partitions 4] [--out benchmarks/results/latency.json]

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

What each phase cost (``usage`` in the results): CPU seconds per wall second and per event of the
worker, its chDB child process, the broker and this process (producer, reader, poller: they share
the two cores with the worker), and per stage the batches and their sizes (the worker's
``pipeline_stage_batches_total``/``pipeline_stage_records_total`` for ingest and the ClickHouse
writer, ``pipeline_evaluation_seconds`` for the profile stage, ``pipeline_sink_batch_*``): costs
that scale with batches rather than events show up there. Whether the worker kept up: the
event -> change p50 of the last quarter of a phase against its first (a queue makes it grow).

Phases, on the same worker: (0) with ``--idle-seconds``, nothing at all (the cost of polling and
timers); (1) ``--seconds`` at ``--rate`` events/s, or at each of ``--rates``; (2) the throughput of this
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

from benchlib import cpu_seconds, send_end_markers

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


def loadavg() -> float:
    with open("/proc/loadavg") as handle:
        return float(handle.read().split()[0])


def children(pid: int) -> list[int]:
    """Direct child processes of ``pid`` (the worker's chDB process)."""
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            out += [int(c) for c in (task / "children").read_text().split()]
        except OSError:
            continue
    return out


# Counters read from the worker's /metrics around each phase: batches and their sizes per stage.
SCRAPED = ("pipeline_evaluation_seconds_count", "pipeline_evaluation_seconds_sum", "pipeline_sink_batch_rows_count",
           "pipeline_sink_batch_rows_sum", "pipeline_sink_batch_seconds_sum", "pipeline_events_in_total",
           "pipeline_stage_batches_total", "pipeline_stage_records_total")


def scrape(port: int) -> dict[str, float]:
    """Sums of the SCRAPED series (over their labels) from GET /metrics."""
    totals: dict[str, float] = {}
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
            text = response.read().decode()
    except OSError:
        return totals
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        base = name.split("{", 1)[0]
        if base in SCRAPED:
            label = name[len(base):]
            stage = label.split('stage="', 1)[1].split('"', 1)[0] if 'stage="' in label else ""
            key = f"{base}:{stage}" if stage else base
            totals[key] = totals.get(key, 0.0) + float(value)
    return totals


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

    def __init__(self, bootstrap: str, topic: str, partitions: int, wait_ms: int) -> None:
        super().__init__(daemon=True)
        from kafka import KafkaConsumer, TopicPartition

        # The embedded broker answers a fetch when its wait expires: the wait is the reader's resolution
        # (adds 0..wait ms to every figure) and its polling cost on the shared cores.
        self.consumer = KafkaConsumer(bootstrap_servers=bootstrap, fetch_max_wait_ms=wait_ms, consumer_timeout_ms=100)
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

    def snapshot(self) -> dict[str, Any]:
        """CPU seconds of the worker, its chDB child and the broker; the load average; the worker's counters."""
        assert self.worker is not None and self.broker.process is not None
        kids = children(self.worker.pid)
        return {"at": time.time(), "load": loadavg(), "worker_cpu": cpu_seconds(self.worker.pid),
                "child_cpu": sum(cpu_seconds(k) for k in kids), "broker_cpu": cpu_seconds(self.broker.process.pid),
                "bench_cpu": cpu_seconds(),  # this process: the producer, the change reader, the cohort poller
                "metrics": scrape(self.port)}

    @staticmethod
    def usage(before: dict[str, Any], after: dict[str, Any], events: int) -> dict[str, Any]:
        """What a phase cost: CPU per second and per event, batches and their sizes per stage."""
        wall = after["at"] - before["at"]
        m0, m1 = before["metrics"], after["metrics"]

        def delta(name: str) -> float:
            return m1.get(name, 0.0) - m0.get(name, 0.0)

        out: dict[str, Any] = {"wall_s": round(wall, 1), "load_start": before["load"], "load_end": after["load"]}
        for part in ("worker_cpu", "child_cpu", "broker_cpu", "bench_cpu"):
            used = after[part] - before[part]
            out[part] = {"s": round(used, 2), "per_wall_s": round(used / wall, 3),
                         "ms_per_event": round(1000 * used / events, 3) if events else None}
        profile_batches = delta("pipeline_evaluation_seconds_count")
        sink_batches = delta("pipeline_sink_batch_rows_count")
        out["profile_batches"] = {"n": int(profile_batches), "per_s": round(profile_batches / wall, 1),
                                  "events_per_batch": round(events / profile_batches, 1) if profile_batches else None,
                                  "evaluation_ms_per_batch": round(1000 * delta("pipeline_evaluation_seconds_sum")
                                                                   / profile_batches, 2) if profile_batches else None}
        out["sink_batches"] = {"n": int(sink_batches), "per_s": round(sink_batches / wall, 2),
                               "rows_per_batch": round(delta("pipeline_sink_batch_rows_sum") / sink_batches, 1)
                               if sink_batches else None,
                               "insert_ms_per_batch": round(1000 * delta("pipeline_sink_batch_seconds_sum")
                                                            / sink_batches, 1) if sink_batches else None}
        for stage in ("ingest", "clickhouse"):
            batches = delta(f"pipeline_stage_batches_total:{stage}")
            if batches:
                out[f"{stage}_stage"] = {"batches": int(batches), "per_s": round(batches / wall, 1),
                                         "records_per_batch": round(delta(f"pipeline_stage_records_total:{stage}")
                                                                    / batches, 1)}
        return out

    def idle(self, seconds: float) -> dict[str, Any]:
        """The worker's cost with no input at all: what it spends on polling and timers."""
        print(f"[{time.strftime('%H:%M:%S')}] idle for {seconds:.0f} s", flush=True)
        before = self.snapshot()
        time.sleep(seconds)
        return self.usage(before, self.snapshot(), 0)

    def producer(self) -> Any:
        from kafka import KafkaProducer

        # linger 0 sends nearly every event in a request of its own at these rates: on this machine
        # the broker's and this process's cost per request competes with the worker for the two cores
        # (--producer-linger-ms 5, Kafka 4's default, packs a few ms of events per request).
        return KafkaProducer(bootstrap_servers=self.broker.bootstrap, linger_ms=self.args.producer_linger_ms,
                             acks="all")

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
        reader = ChangeReader(self.broker.bootstrap, f"{PREFIX}{t.SEGMENT_CHANGES}", args.partitions,
                              args.reader_wait_ms)
        poller = CohortPoller(self.port, args.poll_ms / 1000)
        reader.start()
        poller.start()
        producer = self.producer()
        sent: dict[str, tuple[str, float]] = {}
        before = self.snapshot()
        started = time.time()
        count = 0
        spy = None
        try:
            while (now := time.time()) < started + args.seconds:
                if spy is None and args.py_spy and now > started + args.seconds / 2 - args.py_spy / 2:
                    spy = self.py_spy(phase, rate)
                for _ in range(int((now - started) * rate) - count):
                    send_at = time.time()
                    customer, kind = self.send(producer, phase)
                    sent[customer] = (kind, send_at)
                    count += 1
                time.sleep(0.002)
            producer.flush()
            usage = self.usage(before, self.snapshot(), count)  # the sending window only
            time.sleep(EXIT_AFTER_S + 4)  # the last exits, the last sink batches
        finally:
            if spy is not None:
                spy.wait(timeout=args.py_spy + 60)
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
        # Kept up? A worker that keeps up has the same latency at the end of the phase as at its start;
        # one that falls behind has a queue, and the latency grows through the phase.
        quarter = args.seconds / 4
        first = [1000 * (reader.entered[c] - at) for c, (_, at) in sent.items()
                 if c in reader.entered and at < started + quarter]
        last = [1000 * (reader.entered[c] - at) for c, (_, at) in sent.items()
                if c in reader.entered and at >= started + args.seconds - quarter]
        return {"rate": rate, "achieved_rate": round(achieved, 1), "seconds": args.seconds, "events": count,
                "usage": usage,
                "event_to_change_first_quarter_ms": percentiles(first),
                "event_to_change_last_quarter_ms": percentiles(last),
                "event_to_change_ms": percentiles(change_ms), "event_to_clickhouse_ms": percentiles(ch_ms),
                "exit_after_deadline_ms": percentiles(exit_ms),
                "deadline_minus_occurred_plus_10s_ms": percentiles(deadline_err),
                "cohort_polls": poller.polls, "poll_ms": args.poll_ms, "missing": missing}

    def py_spy(self, phase: str, rate: float) -> subprocess.Popen[bytes]:
        """py-spy (raw folded stacks, 100 Hz, on-CPU samples only) on the worker for --py-spy seconds."""
        assert self.worker is not None
        out = self.args.out.with_name(f"{self.args.out.stem}-{phase}-{rate:.0f}.pyspy.txt")
        out.parent.mkdir(parents=True, exist_ok=True)
        return subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid", str(self.worker.pid),
                                 "--duration", str(int(self.args.py_spy)), "--rate", "100", "--format", "raw",
                                 "--threads", "--nonblocking", "--output", str(out)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def throughput(self) -> dict[str, Any]:
        from kafka import KafkaConsumer, TopicPartition

        args = self.args
        print(f"[{time.strftime('%H:%M:%S')}] throughput: backlog of {args.burst} events", flush=True)
        producer = self.producer()
        before = self.snapshot()
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
        usage = self.usage(before, self.snapshot(), args.burst)
        seconds = done_at - started
        return {"events": args.burst, "produce_s": round(produced_at - started, 2), "seconds": round(seconds, 2),
                "events_per_s": round(args.burst / seconds, 1), "usage": usage}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=100.0, help="the first steady phase, events/s")
    parser.add_argument("--rates", type=str, default="",
                        help="comma-separated steady phases before the throughput phase (instead of --rate)")
    parser.add_argument("--idle-seconds", type=float, default=0.0,
                        help="first measure the idle worker's CPU for this long (0: not measured)")
    parser.add_argument("--half-rate", type=float, default=0.0,
                        help="the rate of the last phase (0: half of the measured throughput)")
    parser.add_argument("--py-spy", type=float, default=0.0,
                        help="record the worker with py-spy for this many seconds in the middle of each steady phase")
    parser.add_argument("--seconds", type=float, default=60.0, help="length of each steady phase")
    parser.add_argument("--burst", type=int, default=15000, help="backlog for the throughput measurement")
    parser.add_argument("--half-load", action=argparse.BooleanOptionalAction, default=True,
                        help="measure the throughput, then a steady phase at half of it")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--poll-ms", type=float, default=100.0, help="GET /cohorts/ch_probe interval")
    parser.add_argument("--producer-linger-ms", type=int, default=0,
                        help="the test producer's linger (0: a request per event at low rates)")
    parser.add_argument("--reader-wait-ms", type=int, default=5, help="fetch wait of the segment-changes reader")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "latency.json")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-latency-"))
    bench = Bench(args, tmp)
    result: dict[str, Any] = {"settings": {"partitions": args.partitions, "store": "rocksdb://", "clock": "wall",
                                           "producer_linger_ms": args.producer_linger_ms,
                                           "reader_wait_ms": args.reader_wait_ms,
                                           "sink_batch_seconds": 0.5, "batch_seconds": 0.05,
                                           "timer_interval_seconds": 0.5, "segments": SEGMENTS}}
    try:
        bench.start()
        result["load_at_start"] = loadavg()
        if args.idle_seconds:
            result["idle"] = bench.idle(args.idle_seconds)
        rates = [float(r) for r in args.rates.split(",") if r.strip()] or [args.rate]
        result["steady"] = [bench.steady(rate, f"fixed{i}") for i, rate in enumerate(rates)]
        if args.half_load:
            result["throughput"] = bench.throughput()
            half = args.half_rate or result["throughput"]["events_per_s"] / 2
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
        u, f, la = phase["usage"], phase["event_to_change_first_quarter_ms"], phase["event_to_change_last_quarter_ms"]
        print(f"    first/last quarter event->change p50 {f.get('p50')} / {la.get('p50')} ms; worker CPU "
              f"{u['worker_cpu']['per_wall_s']} s/s ({u['worker_cpu']['ms_per_event']} ms/event), chDB child "
              f"{u['child_cpu']['per_wall_s']} s/s, broker {u['broker_cpu']['per_wall_s']} s/s, bench "
              f"{u['bench_cpu']['per_wall_s']} s/s; profile batches "
              f"{u['profile_batches']}; sink {u['sink_batches']}; ingest {u.get('ingest_stage')}; "
              f"load {u['load_start']} -> {u['load_end']}", flush=True)
    if "idle" in result:
        u = result["idle"]
        print(f"idle: worker CPU {u['worker_cpu']['per_wall_s']} s/s, chDB child {u['child_cpu']['per_wall_s']} s/s, "
              f"broker {u['broker_cpu']['per_wall_s']} s/s; load {u['load_start']} -> {u['load_end']}", flush=True)
    if "throughput" in result:
        print(f"throughput (same worker, same mix): {result['throughput']['events_per_s']} events/s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
