"""Soak test (issue 8, item 5; not part of CI): the embedded stack at a steady rate for minutes.

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--rate 300] [--partitions 4]
        [--customers 5000] [--warmup 2] [--out benchmarks/results/soak.json]
        [--store rocksdb://] [--debug-memory [--tracemalloc FRAMES]] [--env NAME=VALUE ...]
        [--drain-minutes 10]

Starts the embedded broker and one ``python -m pipeline worker`` (RocksDB store, the built-in
segments, wall clock, an HTTP port, the ClickHouse sink on chDB), then produces
``pipeline.generate.traffic(extended=True)`` (identities, e-mails, receipts, refunds, tickets) at
``--rate`` events/s with ``occurred_at`` = now, as JSON, for ``--minutes``.

Every 10 s it records the worker's RSS (VmRSS) and CPU time (/proc), and from its ``/metrics``:
events in, segment changes out, dead letters, duplicates, consumer lag (sum over partitions) and
timers pending; plus the ERROR lines and tracebacks in the worker's log. A table is printed every
minute. At the end it sends one end marker into every input partition, waits for the worker's
``done`` (pipeline.control: everything processed, the sink flushed), and checks that nothing was
lost (events in == produced + markers) and that the worker is still alive.

Each sample also splits the worker's RSS into anonymous and file-backed pages (RssAnon / RssFile:
the chDB engine's 550 MB shared library is file-backed, paged in on first use and not a leak) and
records the machine's load average. ``--debug-memory`` runs the worker under
``python -m pipeline.memdebug`` (the same worker plus a sampler thread, pipeline/memdebug.py):
RocksDB memtables and block cache, the chDB engine's own accounting and allocator (jemalloc), glibc's
heap and thread arenas, the chDB child process's mappings and, with ``--tracemalloc``, the Python
source lines that grew; those samples go into ``--out`` too. The worker's child processes (chDB runs
in one) are sampled with it: ``children_rss_mib`` and ``total_rss_mib``, whose slope the verdict
gives as well. ``--env`` adds variables to the worker's environment for allocator experiments
(``MALLOC_ARENA_MAX``, ``MALLOC_CONF`` for chDB's jemalloc, ``PIPELINE_DEBUG_MALLOC_TRIM=1``).

Written: the time series and the verdict to ``--out`` (JSON). The verdict line gives the memory
growth per minute after the warm-up (least-squares slope of RSS), the maximum and p99 lag, and
the error count. Every process started here is stopped here; the temporary directory is deleted
(the worker log is copied next to ``--out`` when the run fails or logged errors).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from benchlib import cpu_seconds, send_end_markers, status_kib

from pipeline.broker import topics as t
from pipeline.broker.embedded import EmbeddedBroker, free_port
from pipeline.control import DONE, Marker, control_kind
from pipeline.generate import traffic
from pipeline.processes import stop_process
from pipeline.settings import load_settings

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PREFIX = "soak-"
SAMPLE_SECONDS = 10.0


def parse_metrics(text: str) -> dict[str, float]:
    """Sum of every sample of each metric name (labels summed over) in Prometheus text."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0]
        try:
            sums[name] = sums.get(name, 0.0) + float(value)
        except ValueError:
            continue
    return sums


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        return parse_metrics(response.read().decode())


def get_status(port: int, path: str) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
            return int(response.status)
    except OSError:
        return 0


def log_errors(path: Path) -> tuple[int, int]:
    """(lines logged at ERROR or CRITICAL, tracebacks) in the worker's log."""
    errors = tracebacks = 0
    with open(path, errors="replace") as handle:
        for line in handle:
            if "Traceback (most recent call last)" in line:
                tracebacks += 1
            if "ERROR" in line or "CRITICAL" in line or '"level": "error"' in line.lower():
                errors += 1
    return errors, tracebacks


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))]


def slope_per_minute(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, value), per minute."""
    if len(points) < 2:
        return 0.0
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    var = sum((x - mx) ** 2 for x, _ in points)
    return 0.0 if var == 0 else 60 * sum((x - mx) * (y - my) for x, y in points) / var


def child_pids(pid: int) -> list[int]:
    """Every descendant of ``pid`` (the worker's children: a chDB process of its own, if it has one)."""
    out: list[int] = []
    try:
        tasks = list(Path(f"/proc/{pid}/task").iterdir())
    except OSError:
        return out
    for task in tasks:
        try:
            kids = [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            continue
        for kid in kids:
            out += [kid, *child_pids(kid)]
    return out


def messages(customers: int, seed: int):  # noqa: ANN201 - an endless iterator of (source, key, JSON bytes)
    """The extended generated stream with occurred_at rewritten to the moment of sending."""
    for message in traffic(customers=customers, seed=seed, start_ms=int(time.time() * 1000), step_ms=1,
                           extended=True):
        record = json.loads(message.value)
        yield message.topic, message.key or None, record


class Soak:
    def __init__(self, args: argparse.Namespace, tmp: Path) -> None:
        self.args = args
        self.tmp = tmp
        self.broker = EmbeddedBroker(tmp / "broker")
        self.worker: subprocess.Popen[bytes] | None = None
        self.port = free_port()
        self.log_path = tmp / "worker.log"
        self.samples: list[dict[str, Any]] = []
        self.produced = 0
        self.watermark = 0
        self.memdebug_path = tmp / "memdebug.jsonl"

    def settings(self) -> Any:
        return load_settings(broker=self.broker.url, topic_prefix=PREFIX, partitions=self.args.partitions)

    def start(self) -> None:
        self.broker.start()
        t.ensure_topics([self.broker.bootstrap], t.product_topics(self.settings()), self.args.partitions)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
        env.update(dict(self.args.env))
        env.update({"PIPELINE_BROKER": self.broker.url, "PIPELINE_TOPIC_PREFIX": PREFIX,
                    "PIPELINE_APP_ID": f"soak-{uuid.uuid4().hex[:8]}", "PIPELINE_DATA_DIR": str(self.tmp / "worker"),
                    "PIPELINE_PARTITIONS": str(self.args.partitions), "PIPELINE_STORE": self.args.store,
                    "PIPELINE_HTTP_PORT": str(self.port), "PIPELINE_CLOCK": "wall",
                    "PIPELINE_LOG_LEVEL": "warning"})
        module = "pipeline"
        if self.args.debug_memory:
            module = "pipeline.memdebug"
            env.update({"PIPELINE_DEBUG_MEMORY": str(self.memdebug_path),
                        "PIPELINE_DEBUG_TRACEMALLOC": str(self.args.tracemalloc),
                        "PIPELINE_DEBUG_MEMORY_SECONDS": os.environ.get("PIPELINE_DEBUG_MEMORY_SECONDS", "20")})
        with open(self.log_path, "wb") as log:
            self.worker = subprocess.Popen([sys.executable, "-m", module, "worker"], cwd=ROOT, env=env,
                                           stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           start_new_session=True)
        deadline = time.monotonic() + 180
        while get_status(self.port, "/ready") != 200:
            if self.worker.poll() is not None:
                raise RuntimeError(f"the worker exited with code {self.worker.returncode}")
            if time.monotonic() > deadline:
                raise RuntimeError("the worker was not ready within 180 s")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.worker is not None:
            stop_process(self.worker, timeout=30)
        self.broker.stop()

    def sample(self, started: float) -> dict[str, Any]:
        assert self.worker is not None
        metrics = scrape(self.port)
        errors, tracebacks = log_errors(self.log_path)
        row = {"t_s": round(time.time() - started, 1), "produced": self.produced,
               "rss_mib": round(status_kib("VmRSS", self.worker.pid) / 1024, 1),
               "rss_anon_mib": round(status_kib("RssAnon", self.worker.pid) / 1024, 1),
               "rss_file_mib": round(status_kib("RssFile", self.worker.pid) / 1024, 1),
               "loadavg_1m": float(Path("/proc/loadavg").read_text().split()[0]),
               "cpu_s": round(cpu_seconds(self.worker.pid), 2),
               "events_in": int(metrics.get("pipeline_events_in_total", 0)),
               "changes_out": int(metrics.get("pipeline_segment_changes_total", 0)),
               "dead_letters": int(metrics.get("pipeline_dead_letters_total", 0)),
               "duplicates": int(metrics.get("pipeline_duplicates_total", 0)),
               "lag": int(metrics.get("pipeline_consumer_lag", 0)),
               "timers_pending": int(metrics.get("pipeline_timers_pending", 0)),
               "profiles": int(metrics.get("pipeline_profiles_in_store", 0)),
               "log_errors": errors, "tracebacks": tracebacks}
        # the worker's child processes (chDB in a process of its own): their RSS is not in the worker's
        children = {}
        for pid in child_pids(self.worker.pid):
            kib = status_kib("VmRSS", pid)
            if kib:
                children[str(pid)] = {"rss_mib": round(kib / 1024, 1),
                                      "rss_anon_mib": round(status_kib("RssAnon", pid) / 1024, 1)}
        if children:
            row["children"] = children
            row["children_rss_mib"] = round(sum(c["rss_mib"] for c in children.values()), 1)
            row["total_rss_mib"] = round(row["rss_mib"] + row["children_rss_mib"], 1)
        if self.samples:
            prev = self.samples[-1]
            span = row["t_s"] - prev["t_s"]
            row["cpu_pct"] = round(100 * (row["cpu_s"] - prev["cpu_s"]) / span, 1) if span > 0 else 0.0
            row["in_per_s"] = round((row["events_in"] - prev["events_in"]) / span, 1) if span > 0 else 0.0
        else:
            row["cpu_pct"] = row["in_per_s"] = 0.0
        self.samples.append(row)
        return row

    def run(self) -> dict[str, Any]:
        from kafka import KafkaProducer

        args = self.args
        self.start()
        producer = KafkaProducer(bootstrap_servers=self.broker.bootstrap, linger_ms=5, acks="all")
        stream = messages(args.customers, args.seed)
        started = time.time()
        end = started + args.minutes * 60
        next_sample = started
        next_table = started + 60
        interval = 0.05
        header = ("t_s", "produced", "events_in", "in_per_s", "changes_out", "dead_letters", "duplicates", "lag",
                  "timers_pending", "rss_mib", "rss_anon_mib", "cpu_pct", "loadavg_1m", "log_errors", "tracebacks")
        print(f"soak: {args.rate} events/s for {args.minutes} min, worker pid {self.worker.pid if self.worker else '?'}"
              f", metrics on :{self.port}", flush=True)
        while True:
            now = time.time()
            if now >= end:
                break
            due = int((now - started) * args.rate) - self.produced
            for _ in range(max(0, due)):
                source, key, record = next(stream)
                record["occurred_at"] = now_ms = int(time.time() * 1000)
                self.watermark = max(self.watermark, now_ms)
                producer.send(f"{PREFIX}{source}", key=key, value=json.dumps(record).encode())
                self.produced += 1
            if now >= next_sample:
                self.sample(started)
                next_sample += SAMPLE_SECONDS
                assert self.worker is not None
                if self.worker.poll() is not None:
                    raise RuntimeError(f"the worker exited with code {self.worker.returncode}")
            if now >= next_table:
                next_table += 60
                print(" ".join(f"{h:>10}" for h in header), flush=True)
                for row in self.samples[-6:]:
                    print(" ".join(f"{row.get(h, ''):>10}" for h in header), flush=True)
            time.sleep(interval)
        producer.flush()
        run_id = uuid.uuid4().hex
        marker = send_end_markers(producer, lambda source: f"{PREFIX}{source}", run_id, self.watermark,
                                  args.partitions)
        sent_at = time.time()
        self.wait_done(run_id)
        drain_s = time.time() - sent_at
        final = self.sample(started)
        return self.verdict(final, marker.origins, drain_s)

    def wait_done(self, run_id: str) -> None:
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(bootstrap_servers=self.broker.bootstrap, consumer_timeout_ms=200)
        consumer.assign([TopicPartition(f"{PREFIX}{t.CONTROL}", p) for p in range(self.args.partitions)])
        consumer.seek_to_beginning()
        deadline = time.monotonic() + self.args.drain_minutes * 60
        try:
            while time.monotonic() < deadline:
                for record in consumer:
                    if control_kind(record.headers) == DONE and Marker.decode(record.value).run_id == run_id:
                        return
                assert self.worker is not None
                if self.worker.poll() is not None:
                    raise RuntimeError(f"the worker exited with code {self.worker.returncode} before done")
            raise RuntimeError(f"no done within {self.args.drain_minutes:g} min of the end markers")
        finally:
            consumer.close()

    def verdict(self, final: dict[str, Any], markers: int, drain_s: float) -> dict[str, Any]:
        warm = [s for s in self.samples if s["t_s"] >= self.args.warmup * 60]
        rss = [(s["t_s"], s["rss_mib"]) for s in warm]
        anon = [(s["t_s"], s["rss_anon_mib"]) for s in warm]
        half = [s for s in warm if s["t_s"] >= (self.args.warmup * 60 + final["t_s"]) / 2]
        last30 = [s for s in warm if s["t_s"] >= final["t_s"] - 30 * 60]
        total = [(s["t_s"], s.get("total_rss_mib", s["rss_mib"])) for s in warm]
        lags = [s["lag"] for s in self.samples]
        alive = self.worker is not None and self.worker.poll() is None
        lost = self.produced + markers - final["events_in"]
        result = {
            "rate": self.args.rate, "minutes": self.args.minutes, "partitions": self.args.partitions,
            "produced": self.produced, "markers": markers, "events_in": final["events_in"], "lost": lost,
            "alive": alive, "drain_s": round(drain_s, 2),
            "rss_start_mib": self.samples[0]["rss_mib"], "rss_after_warmup_mib": warm[0]["rss_mib"] if warm else None,
            "rss_end_mib": final["rss_mib"], "rss_max_mib": max(s["rss_mib"] for s in self.samples),
            "rss_slope_mib_per_min": round(slope_per_minute(rss), 3),
            "rss_anon_slope_mib_per_min": round(slope_per_minute(anon), 3),
            # the second half of the run after the warm-up alone: a plateau shows as ~0 here
            "rss_slope_second_half_mib_per_min": round(slope_per_minute([(s["t_s"], s["rss_mib"]) for s in half]), 3),
            # the last 30 minutes (the whole run after the warm-up when shorter): the plateau test of a long run
            "rss_slope_last_30min_mib_per_min": round(slope_per_minute([(s["t_s"], s["rss_mib"]) for s in last30]), 3),
            # worker plus its child processes (equal to the worker's when it has none)
            "total_rss_slope_mib_per_min": round(slope_per_minute(total), 3),
            "total_rss_end_mib": final.get("total_rss_mib", final["rss_mib"]),
            "worker_env": dict(self.args.env),
            "rss_file_end_mib": final["rss_file_mib"], "rss_anon_end_mib": final["rss_anon_mib"],
            "store": self.args.store,
            "loadavg_1m_mean": round(sum(s["loadavg_1m"] for s in self.samples) / len(self.samples), 2),
            "loadavg_1m_max": max(s["loadavg_1m"] for s in self.samples),
            "lag_max": max(lags), "lag_p99": percentile(lags, 99), "lag_p50": percentile(lags, 50),
            "cpu_pct_mean": round(sum(s["cpu_pct"] for s in self.samples[1:]) / max(1, len(self.samples) - 1), 1),
            "changes_out": final["changes_out"], "dead_letters": final["dead_letters"],
            "duplicates": final["duplicates"], "timers_pending_end": final["timers_pending"],
            "log_errors": final["log_errors"], "tracebacks": final["tracebacks"],
        }
        result["ok"] = bool(alive and lost == 0 and final["log_errors"] == 0 and final["tracebacks"] == 0)
        return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--rate", type=float, default=300.0, help="events per second")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--customers", type=int, default=5000)
    parser.add_argument("--seed", type=int, default=11)
    parser.add_argument("--warmup", type=float, default=2.0, help="minutes excluded from the memory slope")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "soak.json")
    parser.add_argument("--store", default="rocksdb://", help="the worker's table store (rocksdb:// or memory://)")
    parser.add_argument("--debug-memory", action="store_true",
                        help="run the worker under pipeline.memdebug and keep its memory attribution samples")
    parser.add_argument("--tracemalloc", type=int, default=0, metavar="FRAMES",
                        help="with --debug-memory: trace Python allocations (slows the worker; not for figures)")
    parser.add_argument("--drain-minutes", type=float, default=10.0,
                        help="how long to wait for the worker's done after the end markers (a loaded machine "
                             "leaves a backlog: 230k events behind at load 35)")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        type=lambda x: tuple(x.split("=", 1)),
                        help="an extra variable in the worker's environment (memory experiments: MALLOC_ARENA_MAX=2, "
                             "MALLOC_CONF=..., PIPELINE_DEBUG_MALLOC_TRIM=1); repeatable")
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="soak-"))
    soak = Soak(args, tmp)
    v: dict[str, Any] | None = None
    try:
        v = soak.run()
    finally:
        soak.stop()
        args.out.parent.mkdir(parents=True, exist_ok=True)
        if (v is None or not v["ok"]) and soak.log_path.exists():
            shutil.copy(soak.log_path, args.out.with_suffix(".worker.log"))
        memdebug = []
        if soak.memdebug_path.exists():
            memdebug = [json.loads(line) for line in soak.memdebug_path.read_text().splitlines() if line.strip()]
        if soak.samples:
            args.out.write_text(json.dumps({"verdict": v, "samples": soak.samples, "memdebug": memdebug}, indent=1)
                                + "\n")
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"soak verdict: {'OK' if v['ok'] else 'FAIL'} - {v['produced']} events at {v['rate']:.0f}/s for "
          f"{v['minutes']:g} min, lost {v['lost']}, worker alive {v['alive']}; RSS {v['rss_start_mib']} -> "
          f"{v['rss_after_warmup_mib']} (after warm-up) -> {v['rss_end_mib']} MiB, growth after warm-up "
          f"{v['rss_slope_mib_per_min']:+.2f} MiB/min ({v['rss_slope_second_half_mib_per_min']:+.2f} in its second "
          f"half, {v['rss_slope_last_30min_mib_per_min']:+.2f} in its last 30 min; worker + children "
          f"{v['total_rss_end_mib']} MiB at the end, {v['total_rss_slope_mib_per_min']:+.2f} MiB/min; "
          f"anonymous {v['rss_anon_end_mib']}, file-backed {v['rss_file_end_mib']} MiB at the end); "
          f"lag max {v['lag_max']} p99 {v['lag_p99']}; "
          f"errors {v['log_errors']}, tracebacks {v['tracebacks']}; drained in {v['drain_s']} s", flush=True)
    return 0 if v["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
