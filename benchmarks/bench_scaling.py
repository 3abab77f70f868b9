"""Scaling: one worker against two workers on the same backlog, on this machine's 2 cores (issue 9 item 5).

    .venv/bin/python benchmarks/bench_scaling.py [--messages 20000] [--customers 3000] [--partitions 4]
        [--workers 1,2] [--out benchmarks/results/scaling.json]

The same generated Avro messages as bench_pipeline.py's variant (c) (``traffic(extended=True)``, seed 9,
Confluent framing), with the same 50 segments and ``rocksdb://``, are produced once per variant into
topics of that variant's own prefix (so each variant reads the identical backlog and writes its own
outputs), followed by one end marker per input partition (``pipeline.control``).

Per variant, N ``python -m pipeline worker`` processes (one app id, so one faust group and one
``<app_id>-ingest`` / ``<app_id>-clickhouse`` group shared by the N) are started first, each with its
own PIPELINE_HTTP_PORT and its own PIPELINE_DATA_DIR — chDB is one data directory per process, so
each worker writes its own chDB (a real deployment shares one ClickHouse server). The backlog is
produced only once every worker answers 200 on GET /ready (assigned, not rebalancing, not
recovering, its batched groups joined) in three consecutive checks 1 s apart: the group
rebalance is outside the window; the time from spawn to that point is reported.

Completion signal, the same for both variants: the last end marker of every partition of
``segment-changes``. With two workers the ClickHouse writers split the output partitions, so neither
sees every marker and no ``done`` is ever announced (``clickhouse_sink``, ``sink_markers``); a
partition's marker on ``segment-changes`` is forwarded by the profile stage only after every change
of that partition was sent. The window is from the first ``customer-events`` record (the first input
batch went through ingest) to the latest of those markers (broker timestamps of the records); the
sink's last inserts are not in it. For one worker the ``done`` window is reported too.

CPU is each worker's user+sys in the window (sampled from /proc every 50 ms), RSS its peak (VmHWM).
The machine is shared: the load average is recorded at start and end. Every process started here is
stopped here, the temporary directory (broker log, workers' data) deleted.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from bench_pipeline import RETENTION, Sampler, _code_state, _die_with_parent
from bench_profiles import _get
from benchlib import cpu_seconds, send_end_markers, status_kib

from pipeline.broker import topics as t
from pipeline.broker.embedded import EmbeddedBroker, free_port
from pipeline.codecs import decode_change
from pipeline.control import DONE, MARKER, Marker, control_kind
from pipeline.decode import encode_avro
from pipeline.generate import traffic
from pipeline.processes import stop_process
from pipeline.settings import load_settings

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def generate(args: argparse.Namespace) -> tuple[list[tuple[str, bytes, bytes]], int]:
    """The encoded messages (as bench_pipeline.py produces them) and their latest occurred_at."""
    step_ms = 60 * 86_400_000 // args.messages  # the events span 60 days: the 30-day windows move
    start_ms = int(time.time() * 1000) - args.messages * step_ms - 3_600_000
    messages: list[tuple[str, bytes, bytes]] = []
    watermark = 0
    for message in traffic(customers=args.customers, seed=args.seed, start_ms=start_ms, step_ms=step_ms,
                           extended=True):
        record = json.loads(message.value)
        watermark = max(watermark, record["occurred_at"])
        messages.append((message.topic, message.key, encode_avro(message.topic, record)))
        if len(messages) >= args.messages:
            break
    return messages, watermark


class Variant:
    """N workers of one app id on one prefix's topics of the shared broker."""

    def __init__(self, args: argparse.Namespace, broker: EmbeddedBroker, sampler: Sampler, tmp: Path,
                 workers: int) -> None:
        self.args, self.broker, self.sampler, self.workers = args, broker, sampler, workers
        run = uuid.uuid4().hex[:6]
        self.prefix = f"scale{workers}-{run}-"
        self.app_id = f"bench-scale{workers}-{run}"
        self.tmp = tmp / f"w{workers}"
        self.tmp.mkdir()
        self.processes: list[subprocess.Popen[bytes]] = []
        self.ports: list[int] = []
        self.partitions = args.partitions

    def topic(self, name: str) -> str:
        return f"{self.prefix}{name}"

    def create_topics(self) -> None:
        from kafka import KafkaAdminClient
        from kafka.admin import NewTopic

        admin = KafkaAdminClient(bootstrap_servers=self.broker.bootstrap, client_id="bench-admin")
        try:
            admin.create_topics([NewTopic(self.topic(n), self.partitions, 1, topic_configs=RETENTION)
                                 for n in t.INPUTS])
        finally:
            admin.close()
        settings = load_settings(broker=self.broker.url, topic_prefix=self.prefix, partitions=self.partitions)
        t.ensure_topics([self.broker.bootstrap], t.product_topics(settings), self.partitions)

    def start(self) -> float:
        """Spawn the workers; return once all of them are ready together (seconds from spawn)."""
        spawned = time.perf_counter()
        for i in range(self.workers):
            port = free_port()
            env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
            env.update({"PIPELINE_BROKER": self.broker.url, "PIPELINE_TOPIC_PREFIX": self.prefix,
                        "PIPELINE_APP_ID": self.app_id, "PIPELINE_DATA_DIR": str(self.tmp / f"worker{i}"),
                        "PIPELINE_SEGMENTS_PATH": str(self.args.segments),
                        "PIPELINE_PARTITIONS": str(self.partitions), "PIPELINE_STORE": "rocksdb://",
                        "PIPELINE_HTTP_PORT": str(port), "PIPELINE_HTTP_HOST": "127.0.0.1",
                        "PIPELINE_CLOCK": "wall", "PIPELINE_LOG_LEVEL": "warning"})
            with open(self.tmp / f"worker{i}.log", "wb") as log:
                process = subprocess.Popen([sys.executable, "-m", "pipeline", "worker"], cwd=ROOT, env=env,
                                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True, preexec_fn=_die_with_parent)  # noqa: PLW1509
            self.processes.append(process)
            self.ports.append(port)
            self.sampler.watch(process.pid)
        streak = 0
        deadline = time.monotonic() + self.args.timeout
        while streak < 3:  # ready together, three checks in a row: the rebalances are over
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"workers not ready within {self.args.timeout} s; see their logs")
            ready = all(_get(f"http://127.0.0.1:{port}/ready", timeout=2) == 200 for port in self.ports)
            streak = streak + 1 if ready else 0
            time.sleep(1.0 if ready else 0.2)
        return time.perf_counter() - spawned - 2.0  # the two confirming checks are not part of it

    def check_alive(self) -> None:
        for i, process in enumerate(self.processes):
            if process.poll() is not None:
                raise RuntimeError(f"worker {i} exited with code {process.returncode}; see {self.tmp}/worker{i}.log")

    def produce(self, messages: list[tuple[str, bytes, bytes]], watermark: int) -> tuple[Marker, float]:
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.broker.bootstrap, linger_ms=20, acks="all",
                                 batch_size=512 * 1024, max_request_size=4 * 1024 * 1024)
        started = time.perf_counter()
        for source, key, value in messages:
            producer.send(self.topic(source), key=key or None, value=value)
        marker = send_end_markers(producer, self.topic, f"bench-{self.app_id}", watermark, self.partitions)
        return marker, time.perf_counter() - started

    def wait_markers(self, marker: Marker) -> tuple[float, dict[str, int]]:
        """Read ``segment-changes`` until every partition brought this run's marker; the latest
        marker's timestamp and the changes counted."""
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(bootstrap_servers=self.broker.bootstrap, consumer_timeout_ms=500,
                                 enable_auto_commit=False)
        consumer.assign([TopicPartition(self.topic(t.SEGMENT_CHANGES), p) for p in range(self.partitions)])
        consumer.seek_to_beginning()
        changes: Counter[str] = Counter()
        markers: dict[int, float] = {}
        deadline = time.monotonic() + self.args.timeout
        try:
            while len(markers) < self.partitions:
                for record in consumer:
                    if control_kind(record.headers) == MARKER:
                        if Marker.decode(record.value).run_id == marker.run_id:
                            markers[record.partition] = record.timestamp / 1000
                    elif record.value is not None:
                        changes[decode_change(record.value)["change"]] += 1
                self.check_alive()
                if time.monotonic() > deadline:
                    raise RuntimeError(f"markers on {len(markers)} of {self.partitions} partitions of "
                                       f"segment-changes after {self.args.timeout} s")
        finally:
            consumer.close()
        return max(markers.values()), dict(changes)

    def done_at(self, marker: Marker, wait_s: float) -> float | None:
        """The ``done`` record's timestamp on the control topic, if one comes within ``wait_s``."""
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(bootstrap_servers=self.broker.bootstrap, consumer_timeout_ms=200)
        consumer.assign([TopicPartition(self.topic(t.CONTROL), p) for p in range(self.partitions)])
        consumer.seek_to_beginning()
        deadline = time.monotonic() + wait_s
        try:
            while time.monotonic() < deadline:
                for record in consumer:
                    if control_kind(record.headers) == DONE and Marker.decode(record.value).run_id == marker.run_id:
                        return float(record.timestamp / 1000)
        finally:
            consumer.close()
        return None

    def first_timestamp(self, name: str) -> float:
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(bootstrap_servers=self.broker.bootstrap, enable_auto_commit=False)
        firsts = []
        try:
            for partition in range(self.partitions):
                tp = TopicPartition(self.topic(name), partition)
                consumer.assign([tp])
                consumer.seek_to_beginning(tp)
                firsts += [r.timestamp / 1000 for r in consumer.poll(timeout_ms=5000, max_records=1).get(tp, [])]
        finally:
            consumer.close()
        return min(firsts)

    def stop(self) -> None:
        for process in reversed(self.processes):
            stop_process(process, timeout=30)

    def run(self, messages: list[tuple[str, bytes, bytes]], watermark: int) -> dict[str, Any]:
        print(f"[{time.strftime('%H:%M:%S')}] {self.workers} worker(s) ...", flush=True)
        self.create_topics()
        try:
            ready_s = self.start()
            print(f"  all {self.workers} ready {ready_s:.1f} s after spawn; producing", flush=True)
            marker, produce_s = self.produce(messages, watermark)
            end_at, changes = self.wait_markers(marker)
            first_at = self.first_timestamp(t.CUSTOMER_EVENTS)
            done = self.done_at(marker, 60.0 if self.workers == 1 else 5.0)
            time.sleep(0.2)  # a last CPU sample past the end
            per_worker = [{"cpu_s": self.sampler.cpu_between(p.pid, first_at, end_at),
                           "cpu_total_s": cpu_seconds(p.pid), "peak_rss_kib": status_kib("VmHWM", p.pid)}
                          for p in self.processes]
        finally:
            self.stop()
        seconds = end_at - first_at
        cpu = [w["cpu_s"] for w in per_worker]
        broker_pid = self.broker.process.pid if self.broker.process is not None else 0
        return {"workers": self.workers, "events": len(messages), "seconds": seconds,
                "events_per_s": len(messages) / seconds, "ready_after_spawn_s": ready_s, "produce_s": produce_s,
                "cpu_s": sum(c for c in cpu if c is not None), "per_worker": per_worker, "changes": changes,
                "broker_cpu_s": self.sampler.cpu_between(broker_pid, first_at, end_at),
                "done_s": done - first_at if done is not None else None,
                "done_events_per_s": len(messages) / (done - first_at) if done is not None else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--customers", type=int, default=3000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--segments", type=Path, default=HERE / "segments_50.yaml")
    parser.add_argument("--workers", default="1,2", help="worker counts to run, in order")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds a variant may take")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "scaling.json")
    args = parser.parse_args()
    args.segments = args.segments.resolve()
    args.out = args.out.resolve()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    load_before = os.getloadavg()
    started = time.time()
    messages, watermark = generate(args)
    tmp = Path(tempfile.mkdtemp(prefix="bench-scaling-"))
    broker = EmbeddedBroker(tmp / "broker")
    sampler = Sampler()
    variants: list[dict[str, Any]] = []
    failed = True
    try:
        broker.start()
        assert broker.process is not None
        sampler.watch(broker.process.pid)
        sampler.start()
        for count in [int(n) for n in args.workers.split(",")]:
            variants.append(Variant(args, broker, sampler, tmp, count).run(messages, watermark))
        failed = False
    finally:
        sampler.halt.set()
        broker.stop()
        if failed:
            logs = args.out.parent / "logs"
            logs.mkdir(exist_ok=True)
            for log in tmp.glob("*/*.log"):
                shutil.copy(log, logs / f"scaling-{log.parent.name}-{log.name}")
            print(f"failed: logs copied to {logs}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)

    load_after = os.getloadavg()
    by_count = {v["workers"]: v for v in variants}
    ratio = by_count[2]["events_per_s"] / by_count[1]["events_per_s"] if 1 in by_count and 2 in by_count else None
    out = {"date": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(timespec="seconds"),
           "command": " ".join([".venv/bin/python", "benchmarks/bench_scaling.py", *sys.argv[1:]]),
           "seconds": round(time.time() - started, 1),
           "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
           "load_before": load_before, "load_after": load_after, "code": _code_state(),
           "input": {"messages": len(messages), "customers": args.customers, "partitions": args.partitions,
                     "seed": args.seed, "segments": str(args.segments)},
           "variants": variants, "ratio_2_over_1": ratio}
    args.out.write_text(json.dumps(out, indent=2))

    print(f"\n{len(messages):,} events, {args.partitions} partitions, load {load_before[0]:.2f} -> "
          f"{load_after[0]:.2f} (1-min avg), {os.cpu_count()} cores")
    print(f"{'workers':<9}{'events/s':>10}{'window s':>10}{'CPU s':>8}{'CPU/wall':>10}{'broker s':>10}"
          f"{'ready s':>9}  per worker: CPU s / peak RSS MiB")
    for v in variants:
        workers = ", ".join(f"{w['cpu_s'] or 0:.1f} / {w['peak_rss_kib'] / 1024:.0f}" for w in v["per_worker"])
        print(f"{v['workers']:<9}{v['events_per_s']:>10,.0f}{v['seconds']:>10.1f}{v['cpu_s']:>8.1f}"
              f"{v['cpu_s'] / v['seconds']:>10.2f}{v['broker_cpu_s'] or 0:>10.1f}{v['ready_after_spawn_s']:>9.1f}"
              f"  {workers}")
        done = f"{v['done_s']:.1f} s ({v['done_events_per_s']:.0f} events/s)" if v["done_s"] else "none"
        print(f"{'':<9}changes {v['changes']}; done: {done}")
    if ratio is not None:
        print(f"2 workers / 1 worker = {ratio:.2f}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
