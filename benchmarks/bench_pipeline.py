"""Throughput of the full pipeline against its ceiling, faust's floor and a Quix Streams peer, in one
run, on the same generated Avro messages in the same embedded (Tansu) broker (issue 9, item 1).

    .venv/bin/python benchmarks/bench_pipeline.py [--messages 40000] [--customers 3000]
        [--partitions 4] [--only a,b,c,d] [--profile-worker] [--out benchmarks/results/pipeline.json]

The messages (``pipeline.generate.traffic(extended=True)``, seeded, Avro in the Confluent wire
format with schema id 0) are produced once into the four input topics, followed by one end marker
per input partition (``pipeline.control``), then each variant reads that backlog from the start,
each in its own process (CPU and peak RSS are per variant):

(a) ceiling       ceiling_aiokafka.py: aiokafka ``getmany`` + ``pipeline.decode.decode``, nothing else;
(b) faust floor   faust_floor.py: a faust agent forwarding raw bytes to an output topic, in both of
                  faust's simple paths (``take_events`` batches and per event); the faster is "b";
(c) pipeline      ``python -m pipeline worker`` with one worker: decode, identity, repartition through
                  ``customer-events``, profile (RocksDB table + changelog), 50 segments
                  (benchmarks/segments_50.yaml), changes to ``segment-changes``, profiles to
                  ``profile-updates``, AND the ClickHouse (chDB) sink in the same process. Timed from
                  the first ``customer-events`` record (the first input batch went through ingest)
                  to the ``done`` record on ``pipeline-control`` (every marker through every stage,
                  the sink flushed); worker start-up and the group join are outside the window.
                  Also reported: the window up to the last end marker on ``segment-changes``
                  (everything emitted, before the sink's last insert).
(d) Quix peer     quix_peer.py: the same decode/routing/profile/segment core on Quix Streams 3.28
                  (group_by, RocksDB state with changelog), changes to its own segment-changes topic;
(d') the same, plus ``pipeline.processor.schedule`` after every event (the next time-driven check,
                  which the pipeline computes for its timers): the same per-event computation as (c).

Events/s counts the data messages only (not the markers), over each variant's measured window
(from its first message; start-up and rebalance excluded). Nothing relies on the broker's end
offsets (DESIGN §3): (a), (b), (d) count what they consumed, (c) waits for the end-marker protocol.
Every process started here is stopped here, even on failure or Ctrl-C; the temporary directory
(broker log, worker data, Quix state) is deleted (logs are copied to the results directory on
failure).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime as dt
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from benchlib import RESULT_PREFIX, cpu_seconds, send_end_markers, status_kib

from pipeline.broker import topics as t
from pipeline.broker.embedded import EmbeddedBroker
from pipeline.codecs import decode_change
from pipeline.control import DONE, MARKER, Marker, control_kind
from pipeline.decode import encode_avro
from pipeline.generate import traffic
from pipeline.processes import stop_process
from pipeline.settings import load_settings

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PREFIX = "bench-"
RETENTION = {"retention.ms": "-1", "retention.bytes": "-1"}  # what Quix needs to see (DESIGN §3)


def _die_with_parent() -> None:  # in the child, between fork and exec
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Sampler(threading.Thread):
    """Samples the CPU time of watched processes every 50 ms, to read the CPU used in a window."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.samples: dict[int, list[tuple[float, float]]] = {}
        self.halt = threading.Event()

    def watch(self, pid: int) -> None:
        self.samples.setdefault(pid, [])

    def run(self) -> None:
        while not self.halt.wait(0.05):
            for pid, samples in list(self.samples.items()):
                with contextlib.suppress(OSError, ValueError, IndexError):
                    samples.append((time.time(), cpu_seconds(pid)))

    def cpu_between(self, pid: int, start: float, end: float) -> float | None:
        samples = self.samples.get(pid, [])

        def at(when: float) -> float | None:
            before = [s for s in samples if s[0] <= when]
            after = [s for s in samples if s[0] >= when]
            if not before or not after:
                return None
            (t0, c0), (t1, c1) = before[-1], after[0]
            return c0 if t1 == t0 else c0 + (c1 - c0) * (when - t0) / (t1 - t0)

        first, last = at(start), at(end)
        return None if first is None or last is None else last - first


class Bench:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.children: list[subprocess.Popen[bytes]] = []
        self.sampler = Sampler()
        self.broker = EmbeddedBroker(tmp / "broker")
        self.run_id = uuid.uuid4().hex[:8]
        self.events = 0
        self.markers = len(t.INPUTS) * args.partitions

    # -- set-up ----------------------------------------------------------------------------------

    def start_broker(self) -> None:
        self.broker.start()
        assert self.broker.process is not None
        self.sampler.watch(self.broker.process.pid)
        self.sampler.start()

    def settings(self) -> Any:
        return load_settings(broker=self.broker.url, topic_prefix=PREFIX, partitions=self.args.partitions)

    def create_topics(self) -> None:
        from kafka import KafkaAdminClient
        from kafka.admin import NewTopic

        admin = KafkaAdminClient(bootstrap_servers=self.broker.bootstrap, client_id="bench-admin")
        try:  # the inputs carry explicit retention configs, so Quix can read them (DESIGN §3)
            admin.create_topics([NewTopic(f"{PREFIX}{name}", self.args.partitions, 1, topic_configs=RETENTION)
                                 for name in t.INPUTS])
        finally:
            admin.close()
        t.ensure_topics([self.broker.bootstrap], t.product_topics(self.settings()), self.args.partitions)

    def produce(self) -> dict[str, Any]:
        from kafka import KafkaProducer

        args = self.args
        step_ms = 60 * 86_400_000 // args.messages  # the events span 60 days: the 30-day windows move
        start_ms = int(time.time() * 1000) - args.messages * step_ms - 3_600_000
        started = time.perf_counter()
        messages = []
        watermark = 0
        for message in traffic(customers=args.customers, seed=args.seed, start_ms=start_ms, step_ms=step_ms,
                               extended=True):
            record = json.loads(message.value)
            watermark = max(watermark, record["occurred_at"])
            messages.append((message.topic, message.key, encode_avro(message.topic, record)))
            if len(messages) >= args.messages:
                break
        generated = time.perf_counter() - started
        producer = KafkaProducer(bootstrap_servers=self.broker.bootstrap, linger_ms=20, acks="all",
                                 batch_size=512 * 1024, max_request_size=4 * 1024 * 1024)
        started = time.perf_counter()
        per_source: Counter[str] = Counter()
        for source, key, value in messages:
            producer.send(f"{PREFIX}{source}", key=key or None, value=value)
            per_source[source] += 1
        marker = send_end_markers(producer, lambda source: f"{PREFIX}{source}", f"bench-{self.run_id}", watermark,
                                  args.partitions)
        produced = time.perf_counter() - started
        self.events = len(messages)
        self.marker = marker
        return {"messages": len(messages), "markers": self.markers, "per_source": dict(per_source),
                "bytes": sum(len(v) for _, _, v in messages), "generate_encode_s": round(generated, 2),
                "produce_s": round(produced, 2), "produce_per_s": round(len(messages) / produced)}

    # -- processes ---------------------------------------------------------------------------------

    def spawn(self, name: str, command: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.tmp / f"{name}.log", "wb") as log:
            process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True,
                                       preexec_fn=_die_with_parent)  # noqa: PLW1509
        self.children.append(process)
        self.sampler.watch(process.pid)
        return process

    def stop_all(self) -> None:
        for process in reversed(self.children):
            stop_process(process, timeout=15)

    def run_variant(self, name: str, command: list[str]) -> dict[str, Any]:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        spawned = time.time()
        process = self.spawn(name, [sys.executable, *command])
        try:
            process.wait(self.args.timeout)
        except subprocess.TimeoutExpired:
            stop_process(process, timeout=10)
            raise RuntimeError(f"{name} did not finish within {self.args.timeout} s; see its log") from None
        # faust routes stdout through its logging: the result line may come with a log prefix.
        lines = [line for line in (self.tmp / f"{name}.log").read_text(errors="replace").splitlines()
                 if RESULT_PREFIX in line]
        if not lines:
            raise RuntimeError(f"{name} exited with code {process.returncode} and no result; see its log")
        result: dict[str, Any] = json.loads(lines[-1].split(RESULT_PREFIX, 1)[1])
        result["startup_s"] = result["first_at"] - spawned
        result["broker_cpu_s"] = self.broker_cpu(result["first_at"], result["end_at"])
        return result

    def broker_cpu(self, start: float, end: float) -> float | None:
        assert self.broker.process is not None
        return self.sampler.cpu_between(self.broker.process.pid, start, end)

    # -- the variants ------------------------------------------------------------------------------

    def ceiling(self) -> dict[str, Any]:
        return self.run_variant("a_ceiling", [str(HERE / "ceiling_aiokafka.py"), "--bootstrap", self.broker.bootstrap,
                                              "--prefix", PREFIX, "--partitions", str(self.args.partitions),
                                              "--expect", str(self.events + self.markers)])

    def faust_floor(self, mode: str) -> dict[str, Any]:
        name = f"b_faust_floor_{mode}"
        return self.run_variant(name, [
            str(HERE / "faust_floor.py"), "--broker", self.broker.url, "--prefix", PREFIX,
            "--partitions", str(self.args.partitions), "--expect", str(self.events + self.markers),
            "--events", str(self.events), "--mode", mode, "--app-id", f"bench-floor-{mode}-{self.run_id}",
            "--output", f"{PREFIX}floor-{mode}-out", "--data-dir", str(self.tmp / name)])

    def quix(self, schedule: bool = False) -> dict[str, Any]:
        name = "d_quix_with_schedule" if schedule else "d_quix"
        return self.run_variant(name, [
            str(HERE / "quix_peer.py"), "--bootstrap", self.broker.bootstrap, "--prefix", PREFIX,
            "--partitions", str(self.args.partitions), "--events", str(self.events),
            "--group", f"bench-{name}-{self.run_id}", "--output", f"{PREFIX}{name}-segment-changes",
            "--state-dir", str(self.tmp / f"{name}-state"), "--segments", str(self.args.segments),
            *(["--schedule"] if schedule else [])])

    def pipeline(self) -> dict[str, Any]:
        from kafka import KafkaConsumer, TopicPartition

        print(f"[{time.strftime('%H:%M:%S')}] c_pipeline ...", flush=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
        env.update({"PIPELINE_BROKER": self.broker.url, "PIPELINE_TOPIC_PREFIX": PREFIX,
                    "PIPELINE_APP_ID": f"bench-pipeline-{self.run_id}",
                    "PIPELINE_DATA_DIR": str(self.tmp / "worker"),
                    "PIPELINE_SEGMENTS_PATH": str(self.args.segments),
                    "PIPELINE_PARTITIONS": str(self.args.partitions), "PIPELINE_STORE": "rocksdb://",
                    "PIPELINE_HTTP_PORT": "0", "PIPELINE_CLOCK": "wall", "PIPELINE_LOG_LEVEL": "warning"})
        env.update(dict(item.split("=", 1) for item in self.args.worker_env))
        spawned = time.time()
        worker = self.spawn("c_pipeline", [sys.executable, "-m", "pipeline", "worker"], env=env)
        profiler = None
        if self.args.profile_worker:
            profiler = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                                         str(worker.pid), "--rate", "100", "--format", "raw", "-o",
                                         str(self.args.out.parent / "pipeline-worker.pyspy.txt")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        preexec_fn=_die_with_parent)  # noqa: PLW1509
            self.children.append(profiler)
        control = KafkaConsumer(bootstrap_servers=self.broker.bootstrap, consumer_timeout_ms=200)
        control.assign([TopicPartition(f"{PREFIX}{t.CONTROL}", p) for p in range(self.args.partitions)])
        control.seek_to_beginning()
        done_at = None
        run_id = self.marker.run_id
        deadline = time.monotonic() + self.args.timeout
        try:
            while done_at is None:
                for record in control:
                    if control_kind(record.headers) == DONE and Marker.decode(record.value).run_id == run_id:
                        done_at = record.timestamp / 1000
                        break
                if worker.poll() is not None:
                    raise RuntimeError(f"the worker exited with code {worker.returncode}; see its log")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the worker did not finish within {self.args.timeout} s")
        finally:
            control.close()
        seen_at = time.time()
        peak_rss = status_kib("VmHWM", worker.pid)
        cpu_total = cpu_seconds(worker.pid)
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                profiler.wait(30)
        stop_process(worker, timeout=30)
        first_at = self.first_timestamp(f"{PREFIX}{t.CUSTOMER_EVENTS}")
        changes, emitted_at = self.read_changes(f"{PREFIX}{t.SEGMENT_CHANGES}")
        seconds = done_at - first_at
        return {"events": self.events, "first_at": first_at, "end_at": done_at, "seconds": seconds,
                "events_per_s": self.events / seconds,
                "emitted_s": emitted_at - first_at, "emitted_events_per_s": self.events / (emitted_at - first_at),
                "cpu_s": self.sampler.cpu_between(worker.pid, first_at, done_at), "cpu_total_s": cpu_total,
                "startup_s": first_at - spawned, "peak_rss_kib": peak_rss, "changes": changes,
                "done_seen_after_s": seen_at - done_at, "broker_cpu_s": self.broker_cpu(first_at, done_at),
                "includes_clickhouse_sink": True}

    def first_timestamp(self, topic: str) -> float:
        """The earliest timestamp among the first records of each partition of ``topic``."""
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(bootstrap_servers=self.broker.bootstrap, enable_auto_commit=False)
        firsts = []
        try:
            for partition in range(self.args.partitions):
                tp = TopicPartition(topic, partition)
                consumer.assign([tp])
                consumer.seek_to_beginning(tp)
                records = consumer.poll(timeout_ms=5000, max_records=1).get(tp, [])
                firsts += [r.timestamp / 1000 for r in records]
        finally:
            consumer.close()
        return min(firsts)

    def read_changes(self, topic: str) -> tuple[dict[str, int], float]:
        """Count the changes on ``topic`` up to this run's end markers; the last marker's timestamp."""
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(bootstrap_servers=self.broker.bootstrap, consumer_timeout_ms=500,
                                 enable_auto_commit=False)
        consumer.assign([TopicPartition(topic, p) for p in range(self.args.partitions)])
        consumer.seek_to_beginning()
        changes: Counter[str] = Counter()
        markers = []
        deadline = time.monotonic() + 120
        try:
            while len(markers) < self.args.partitions and time.monotonic() < deadline:
                for record in consumer:
                    if control_kind(record.headers) == MARKER:
                        markers.append(record.timestamp / 1000)
                    elif record.value is not None:
                        changes[decode_change(record.value)["change"]] += 1
        finally:
            consumer.close()
        return dict(changes), max(markers)


def _code_state() -> dict[str, Any]:
    """The commit measured, and pipeline/ files that differed from it (the tree is shared)."""
    def git(*command: str) -> str:
        try:
            return subprocess.run(["git", *command], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"head": git("rev-parse", "HEAD").strip(),
            "pipeline_uncommitted": git("status", "--porcelain", "--", "pipeline").splitlines()}


def _mib(kib: int | None) -> float | None:
    return round(kib / 1024, 1) if kib else None


def _summary(name: str, r: dict[str, Any]) -> str:
    cpu = r.get("cpu_s")
    util = f"{cpu / r['seconds']:.2f}" if cpu is not None else "?"
    broker = r.get("broker_cpu_s")
    return (f"{name:<26}{r['events_per_s']:>10,.0f}{r['seconds']:>9.1f}{(cpu or 0):>8.1f}{util:>7}"
            f"{(broker or 0):>8.1f}{_mib(r['peak_rss_kib']) or 0:>9.0f}{r['startup_s']:>8.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=40_000)
    parser.add_argument("--customers", type=int, default=3000)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--segments", type=Path, default=HERE / "segments_50.yaml")
    parser.add_argument("--only", default="a,b,c,d", help="comma-separated variants to run (a,b,c,d)")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a variant may take")
    parser.add_argument("--profile-worker", action="store_true",
                        help="py-spy the worker during (c) (slows it); raw stacks to the results directory")
    parser.add_argument("--worker-env", action="append", default=[], metavar="NAME=VALUE",
                        help="a setting for (c)'s worker, e.g. PIPELINE_EVENT_LOOP=asyncio (repeatable; the worker "
                             "otherwise gets no PIPELINE_* variable of this shell)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "pipeline.json")
    args = parser.parse_args()
    args.segments = args.segments.resolve()
    args.out = args.out.resolve()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))

    load_before = os.getloadavg()
    started = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    bench = Bench(args, tmp)
    variants: dict[str, dict[str, Any]] = {}
    failed = True
    try:
        bench.start_broker()
        bench.create_topics()
        produce = bench.produce()
        print(f"produced {produce['messages']:,} messages (+{bench.markers} end markers) in "
              f"{produce['produce_s']} s over {args.partitions} partitions of each input topic", flush=True)
        if "a" in only:
            variants["a_ceiling"] = bench.ceiling()
        if "b" in only:
            variants["b_faust_floor_take_events"] = bench.faust_floor("take_events")
            variants["b_faust_floor_per_event"] = bench.faust_floor("per_event")
        if "c" in only:
            variants["c_pipeline"] = bench.pipeline()
        if "d" in only:
            variants["d_quix"] = bench.quix()
            variants["d_quix_with_schedule"] = bench.quix(schedule=True)
        failed = False
    finally:
        bench.stop_all()
        bench.sampler.halt.set()
        bench.broker.stop()
        if failed:
            logs = args.out.parent / "logs"
            logs.mkdir(exist_ok=True)
            for log in [*tmp.glob("*.log"), *tmp.glob("*/*.log")]:
                shutil.copy(log, logs / f"{log.parent.name}-{log.name}")
            print(f"failed: logs copied to {logs}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)

    floors = {k: v for k, v in variants.items() if k.startswith("b_")}
    best_floor = max(floors, key=lambda k: floors[k]["events_per_s"]) if floors else None
    rate = {k: v["events_per_s"] for k, v in variants.items()}
    ratios: dict[str, float] = {}
    if "c_pipeline" in rate:
        for label, key in (("c/a", "a_ceiling"), ("c/b", best_floor), ("c/d", "d_quix"),
                           ("c/d'", "d_quix_with_schedule")):
            if key in rate:
                ratios[label] = round(rate["c_pipeline"] / rate[key], 4)
    load_after = os.getloadavg()
    command = " ".join([".venv/bin/python", "benchmarks/bench_pipeline.py", *sys.argv[1:]])
    out = {
        "date": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(timespec="seconds"),
        "command": command, "seconds": round(time.time() - started, 1),
        "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "load_before": load_before, "load_after": load_after, "code": _code_state(),
        "input": {**produce, "customers": args.customers, "partitions": args.partitions, "seed": args.seed,
                  "segments": str(args.segments.relative_to(ROOT) if args.segments.is_relative_to(ROOT)
                                  else args.segments)},
        "variants": variants, "faust_floor_fastest": best_floor, "ratios": ratios,
    }
    args.out.write_text(json.dumps(out, indent=2))

    print(f"\n{produce['messages']:,} events, {args.partitions} partitions, load {load_before[0]:.2f} -> "
          f"{load_after[0]:.2f} (1-min avg), {os.cpu_count()} cores")
    print(f"{'variant':<26}{'events/s':>10}{'window s':>9}{'CPU s':>8}{'CPU/s':>7}{'broker':>8}{'RSS MiB':>9}"
          f"{'start s':>8}")
    for name, result in variants.items():
        print(_summary(name, result))
    if "c_pipeline" in variants:
        c = variants["c_pipeline"]
        print("(c) includes the ClickHouse (chDB) sink (the worker with its chDB child process); "
              "up to the last change emitted on "
              f"segment-changes: {c['emitted_events_per_s']:,.0f} events/s; changes {c['changes']}")
    for name in ("d_quix", "d_quix_with_schedule"):
        if name in variants:
            print(f"({name}) changes emitted: {variants[name]['changes']}")
    if best_floor:
        print(f"faust's faster floor: {best_floor}")
    for label, value in ratios.items():
        print(f"{label} = {value:.3f}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
