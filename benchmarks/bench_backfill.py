"""Backfill: a new segment evaluated over every existing profile of a running worker (issue 9 item 4:
"a new segment backfilled over 1M profiles in <= 60 s").

    .venv/bin/python benchmarks/bench_backfill.py [--profiles 100000] [--templates 2000]
        [--where "orders_count >= 0"] [--profile-worker] [--out benchmarks/results/backfill.json]

Profiles: bench_profiles.py's realistic templates (generated traffic folded by ``processor.step`` with
the built-in segments, then ``schedule``), each marked as evaluated under the built-in set (its
fingerprint, as the worker stores it), cloned under new ids and written straight into the worker's
changelog ``<app_id>-profiles-changelog`` with the worker's partitioner and encoding
(``bench_profiles.fill_changelog``). Then ``python -m pipeline worker`` (``rocksdb://``, wall clock,
PIPELINE_SEGMENTS_PATH = a file holding the built-in set) recovers them; the benchmark waits for
GET /ready and for the initial scan (every recovered profile put in the timer index:
``pipeline_timers_pending`` unchanged over 3 s), then publishes a new definition set — the built-in
segments plus one (``--segment-id``, ``--where``) — on the definitions topic
(``pipeline.segments.live.publish_definitions``, what ``pipeline segments apply`` does). The worker
adopts it (``follow_definitions`` → ``adopt``) and its timer re-evaluates every profile
(``tick`` → ``_scan_some``, cause ``definition_changed``).

Completion: the worker has logged the end of its scan under the new set (``tick``: "profiles checked
against definition set ...; finished at <epoch>", with how many profiles took the fast path or the
full one, were written, and the changes; the log is polled every 0.25 s), and then its
``pipeline_segment_changes_total{segment=<new>, change="entered"}`` (GET /metrics, read only once the
scan is over, so the window has no scrapes) reaches the number of members the pure core gives on the
same profiles (``processor.advance`` then ``processor.reevaluate`` under the new set, per template,
times its clones). The window runs from the timestamp of the new set's
manifest record on the definitions topic to the later of the scan's end and the timestamp of the last
such ``entered`` record on ``segment-changes`` (read afterwards; counted and checked against the
expectation, with its causes). The default segment (``orders_count >= 0``) takes every profile (the
worst case: a change, a profile row and a store write per profile); a selective ``--where`` (most
profiles unchanged: nothing written or sent for them) is the usual case. Worker and broker CPU in the window are sampled
from /proc. ``--profile-worker`` records the worker with py-spy during the backfill (raw stacks to
the results directory). Every process started here is stopped, the temporary directory deleted.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import yaml
from bench_pipeline import Sampler, _code_state, _die_with_parent
from bench_profiles import _get, fill_changelog, realistic_profiles
from benchlib import cpu_seconds, status_kib

from pipeline.broker import topics as t
from pipeline.broker.embedded import EmbeddedBroker, free_port
from pipeline.codecs import decode_change
from pipeline.control import control_kind
from pipeline.processes import stop_process
from pipeline.processor import Config, advance, reevaluate, schedule
from pipeline.profile import ProfileState
from pipeline.segments.definitions import Segment, load_segments, parse_segments
from pipeline.segments.live import (
    MANIFEST_KEY,
    SetHistory,
    backfill,
    definition_record,
    publish_definitions,
    set_fingerprint,
)

try:
    from pipeline.segments.live import Scan
except ImportError:  # an older commit's tree on PYTHONPATH (A/B runs): its scan was decode + backfill
    Scan = None  # type: ignore[assignment,misc]
from pipeline.settings import load_settings

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def metric(port: int, name: str, labels: dict[str, str] | None = None) -> float | None:
    """One sample of the worker's /metrics (None: absent or unreachable)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            text = response.read().decode()
    except OSError:
        return None
    wanted = labels or {}
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        match = re.match(r"^(\w+)(?:\{(.*)\})? (\S+)$", line)
        if match is None or match.group(1) != name:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2) or ""))
        if all(found.get(k) == v for k, v in wanted.items()):
            return float(match.group(3))
    return None


def expected_members(templates: list[ProfileState], count: int, segments: list[Segment], segment_id: str,
                     now_ms: int) -> int:
    """Members of ``segment_id`` after the worker's re-evaluation under ``segments`` (pure core), over
    ``count`` clones (clone i is template i mod len(templates); membership does not read the id)."""
    config = Config()
    member = []
    for template in templates:
        state = ProfileState.from_dict(json.loads(json.dumps(template.to_dict())))
        advance(state, now_ms, segments, config)
        reevaluate(state, now_ms, segments, config, cause="definition_changed")
        member.append(segment_id in state.segments)
    full, rest = divmod(count, len(templates))
    return full * sum(member) + sum(member[:rest])


def core_rates(templates: list[ProfileState], base: list[Segment], new_set: list[Segment], count: int,
               now_ms: int) -> dict[str, float]:
    """CPU per profile of the pure work the scan does under a new set, in this process (no broker,
    no store): the old path (decode, advance + reevaluate + schedule over every segment, encode)
    against ``live.backfill`` (decode, the changed segments only, encode only when written) and
    ``live.Scan`` (what the worker's scan runs: only the fields needed read from the stored value,
    the whole profile when written), on the same ``count`` encoded clones. Ratios taken in one run,
    so less sensitive to the machine's load."""
    from pipeline import profile_encoding

    config = Config()
    old_fp, new_fp = set_fingerprint(base), set_fingerprint(new_set)
    history = SetHistory()
    history.add(base)
    history.add(new_set)
    values = [profile_encoding.encode(templates[i % len(templates)]) for i in range(count)]

    def old_path() -> int:
        written = 0
        for value in values:
            state = profile_encoding.decode(value)
            advance(state, now_ms, new_set, config)
            reevaluate(state, now_ms, new_set, config, cause="definition_changed")
            state.definitions = new_fp
            schedule(state, now_ms, new_set, config)
            profile_encoding.encode(state)
            written += 1
        return written

    def new_path() -> int:
        written = 0
        for value in values:
            state = profile_encoding.decode(value)
            done = backfill(state, now_ms, new_set, new_fp, history.change(state.definitions, new_fp), config)
            if done.write:
                profile_encoding.encode(state)
                written += 1
        return written

    def scan_path() -> int:
        written = 0
        scan = Scan(new_set, new_fp, history, config)  # a fresh one: it learns the fields as the worker's does
        for value in values:
            found = scan.check(value, now_ms)
            if found.done is not None and found.done.write:
                profile_encoding.encode(found.state)
                written += 1
        return written

    assert all(t.definitions == old_fp for t in templates)
    out: dict[str, float] = {}
    for name, run in (("full", old_path), ("backfill", new_path), ("scan", scan_path if Scan else new_path)):
        started = time.process_time()
        written = run()
        out[f"{name}_us_per_profile"] = 1e6 * (time.process_time() - started) / count
        out[f"{name}_written"] = written
    out["speedup"] = out["full_us_per_profile"] / out["backfill_us_per_profile"]
    out["scan_speedup"] = out["full_us_per_profile"] / out["scan_us_per_profile"]
    return out


def read_entries(bootstrap: str, topic: str, partitions: int, segment_id: str, expected: int,
                 timeout: float) -> tuple[int, float, dict[str, int]]:
    """Count the ``entered`` changes of ``segment_id`` on ``topic`` (until ``expected`` or the end);
    the latest one's timestamp and the causes."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                             max_partition_fetch_bytes=8 * 2**20, fetch_max_bytes=64 * 2**20)
    consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
    consumer.seek_to_beginning()
    needle = segment_id.encode()
    count, last = 0, 0.0
    causes: Counter[str] = Counter()
    deadline = time.monotonic() + timeout
    try:
        while count < expected and time.monotonic() < deadline:
            before = count
            for records in consumer.poll(timeout_ms=3000, max_records=100_000).values():
                for record in records:
                    if record.value is None or needle not in record.value or control_kind(record.headers):
                        continue  # cheap filter before decoding
                    change = decode_change(record.value)
                    if change["segment_id"] == segment_id and change["change"] == "entered":
                        count += 1
                        last = max(last, record.timestamp / 1000)
                        causes["definition_changed" if change["cause"] == "definition_changed" else "other"] += 1
            if count == before:
                break  # the iterator timed out with nothing new: the end
    finally:
        consumer.close()
    return count, last, dict(causes)


SCAN_LINE = re.compile(r"profiles checked against definition set (\w+): (\d+) in [\d.]+ s \((\d+) brought up to date "
                       r"by the changed segments, (\d+) in full, (\d+) written, (\d+) changes\); finished at ([\d.]+)")


def scan_finished(log_path: Path, fingerprint: str) -> dict[str, float] | None:
    """The worker's log line that ends its scan of the profiles under the set ``fingerprint``."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return None
    for match in SCAN_LINE.finditer(text):
        if match.group(1) == fingerprint:
            checked, backfilled, full, written, changes, at = match.groups()[1:]
            return {"checked": int(checked), "backfilled": int(backfilled), "full": int(full),
                    "written": int(written), "changes": int(changes), "finished_at": float(at)}
    return None


def manifest_timestamp(bootstrap: str, topic: str) -> float:
    """The timestamp of the latest manifest record on the definitions topic (bounded polls: the
    iterator's consumer_timeout_ms never fired on this compacted topic of the embedded broker)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    tp = TopicPartition(topic, 0)
    consumer.assign([tp])
    consumer.seek_to_beginning(tp)
    at = 0.0
    empty = 0
    deadline = time.monotonic() + 30
    try:
        while empty < 3 and time.monotonic() < deadline:
            records = consumer.poll(timeout_ms=500).get(tp, [])
            empty = 0 if records else empty + 1
            for record in records:
                if record.key == MANIFEST_KEY.encode():
                    at = record.timestamp / 1000
    finally:
        consumer.close()
    if not at:
        raise RuntimeError(f"no manifest record found on {topic}")
    return at


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", type=int, default=100_000)
    parser.add_argument("--templates", type=int, default=2000, help="generated customers (distinct profiles)")
    parser.add_argument("--events", type=int, default=80_000, help="generated events folded into the templates")
    parser.add_argument("--days", type=int, default=180)
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--segment-id", default="backfill_new")
    parser.add_argument("--where", default="orders_count >= 0",
                        help="the new segment (default: every profile, so the last entry is the last profile)")
    parser.add_argument("--timeout", type=float, default=1200.0, help="seconds each phase may take")
    parser.add_argument("--profile-worker", action="store_true", help="py-spy the worker during the backfill")
    parser.add_argument("--core-only", action="store_true",
                        help="only the in-process CPU per profile of the old scan path against live.backfill")
    parser.add_argument("--core-profiles", type=int, default=20_000, help="clones timed in the in-process comparison")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "backfill.json")
    args = parser.parse_args()
    args.out = args.out.resolve()
    args.out.parent.mkdir(parents=True, exist_ok=True)

    load_before = os.getloadavg()
    started = time.time()
    base = load_segments(None)
    templates, _ = realistic_profiles(customers=args.templates, events=args.events, days=args.days, segments=base)
    fingerprint = set_fingerprint(base)
    for template in templates:
        template.definitions = fingerprint  # evaluated under the built-in set, as the worker stores it
    new_segment = parse_segments(yaml.safe_dump({"segments": [{"id": args.segment_id, "where": args.where}]}),
                                 source="--where")
    new_set = [*base, *new_segment]
    print(f"{len(templates):,} template profiles; {args.profiles:,} clones", flush=True)
    core = core_rates(templates, base, new_set, args.core_profiles, int(time.time() * 1000))
    print(f"  in-process, per profile: full path {core['full_us_per_profile']:.0f} us ({core['full_written']:,} "
          f"written), backfill {core['backfill_us_per_profile']:.0f} us ({core['backfill_written']:,} written): "
          f"x{core['speedup']:.1f}, scan {core['scan_us_per_profile']:.1f} us ({core['scan_written']:,} written): "
          f"x{core['scan_speedup']:.1f}; load {os.getloadavg()[0]:.1f}", flush=True)
    if args.core_only:
        return

    tmp = Path(tempfile.mkdtemp(prefix="bench-backfill-"))
    segments_file = tmp / "segments.yaml"
    segments_file.write_text(yaml.safe_dump({"segments": [
        {k: v for k, v in definition_record(s).items() if v not in (None, "")} for s in base]}))
    assert set_fingerprint(load_segments(segments_file)) == fingerprint
    broker = EmbeddedBroker(tmp / "broker")
    sampler = Sampler()
    worker: subprocess.Popen[bytes] | None = None
    profiler: subprocess.Popen[bytes] | None = None
    app_id = f"bench-backfill-{uuid.uuid4().hex[:6]}"
    prefix = f"{app_id}-"
    port = free_port()
    result: dict[str, Any] = {}
    failed = True
    try:
        broker.start()
        assert broker.process is not None
        sampler.watch(broker.process.pid)
        sampler.start()
        settings = load_settings(broker=broker.url, topic_prefix=prefix, partitions=args.partitions)
        t.ensure_topics([broker.bootstrap], t.product_topics(settings), args.partitions)
        fill = fill_changelog(broker.bootstrap, f"{app_id}-profiles-changelog", args.partitions, templates,
                              args.profiles)
        print(f"  wrote {args.profiles:,} profiles ({fill['bytes'] / 2**20:.0f} MiB) in {fill['produce_s']:.1f} s",
              flush=True)
        env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
        env.update({"PIPELINE_BROKER": broker.url, "PIPELINE_APP_ID": app_id, "PIPELINE_TOPIC_PREFIX": prefix,
                    "PIPELINE_DATA_DIR": str(tmp / "worker"), "PIPELINE_SEGMENTS_PATH": str(segments_file),
                    "PIPELINE_PARTITIONS": str(args.partitions), "PIPELINE_STORE": "rocksdb://",
                    "PIPELINE_HTTP_PORT": str(port), "PIPELINE_CLOCK": "wall", "PIPELINE_LOG_LEVEL": "info"})
        spawned = time.perf_counter()
        with open(tmp / "worker.log", "wb") as log:
            worker = subprocess.Popen([sys.executable, "-m", "pipeline", "worker"], cwd=ROOT, env=env, stdout=log,
                                      stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
                                      preexec_fn=_die_with_parent)  # noqa: PLW1509
        sampler.watch(worker.pid)

        def alive() -> None:
            assert worker is not None
            if worker.poll() is not None:
                raise RuntimeError(f"the worker exited with code {worker.returncode}; see its log")

        deadline = time.monotonic() + args.timeout
        while _get(f"http://127.0.0.1:{port}/ready", timeout=2) != 200:
            alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker not ready after {args.timeout} s")
            time.sleep(0.2)
        ready_s = time.perf_counter() - spawned
        print(f"  worker ready (recovered) in {ready_s:.1f} s; waiting for the initial scan", flush=True)
        stable, last_pending = 0, -1.0
        while stable < 3:  # the timer index stopped growing: every recovered profile was scanned
            alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"initial scan not over after {args.timeout} s")
            time.sleep(1.0)
            pending = metric(port, "pipeline_timers_pending") or 0.0
            stable = stable + 1 if pending == last_pending and pending > 0 else 0
            last_pending = pending
        scan_s = time.perf_counter() - spawned - ready_s - 3.0
        print(f"  initial scan over {scan_s:.1f} s after ready ({last_pending:,.0f} timers pending)", flush=True)

        now_ms = int(time.time() * 1000)
        expected = expected_members(templates, args.profiles, new_set, args.segment_id, now_ms)
        labels = {"segment": args.segment_id, "change": "entered"}
        if args.profile_worker:
            profiler = subprocess.Popen([str(Path(sys.executable).parent / "py-spy"), "record", "--pid",
                                         str(worker.pid), "--rate", "100", "--format", "raw", "-o",
                                         str(args.out.parent / "backfill-worker.pyspy.txt")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                        preexec_fn=_die_with_parent)  # noqa: PLW1509
            time.sleep(1.0)  # py-spy attached
        idle_from = time.time()
        time.sleep(5.0)  # the idle worker's CPU (its consumers poll, /metrics is scraped): subtracted below
        idle_cpu_per_s = (sampler.cpu_between(worker.pid, idle_from, time.time() - 0.5) or 0.0) / 4.5
        published_wall = time.time()
        added, _, _ = publish_definitions([broker.bootstrap], settings.topic(t.DEFINITIONS), new_set)
        print(f"  published {added} ({len(new_set)} segments); expecting {expected:,} entries", flush=True)
        seen_at = None
        scan: dict[str, float] | None = None
        new_fingerprint = set_fingerprint(new_set)
        entered = 0.0
        while True:
            alive()
            # The worker's log says when its scan is over (every change sent and acknowledged by then);
            # /metrics is read only after that: scraping it 4 times a second cost the worker CPU in the window.
            scan = scan or scan_finished(tmp / "worker.log", new_fingerprint)
            if scan is not None:
                entered = metric(port, "pipeline_segment_changes_total", labels) or 0.0
                if entered >= expected:
                    seen_at = time.time()
                    break
            if time.monotonic() > deadline + args.timeout:
                raise RuntimeError(f"{entered:,.0f} of {expected:,} entries after {args.timeout} s "
                                   f"(scan {'over' if scan else 'not over'})")
            time.sleep(0.25)
        if profiler is not None:
            profiler.send_signal(signal.SIGINT)
            with contextlib.suppress(subprocess.TimeoutExpired):
                profiler.wait(60)
        time.sleep(0.2)  # a CPU sample past the end
        peak_rss = status_kib("VmHWM", worker.pid)
        cpu_total = cpu_seconds(worker.pid)
        start_at = manifest_timestamp(broker.bootstrap, settings.topic(t.DEFINITIONS))
        count, end_at, causes = read_entries(broker.bootstrap, settings.topic(t.SEGMENT_CHANGES), args.partitions,
                                             args.segment_id, expected, args.timeout)
        # The scan's end (every profile checked; the log's epoch time, same machine) or the last entry,
        # whichever is later: with a selective segment the last member can come well before the end.
        assert scan is not None
        window_end = max(end_at, scan["finished_at"])
        seconds = window_end - start_at
        result = {"profiles": args.profiles, "templates": len(templates), "segment": args.segment_id,
                  "where": args.where, "expected_entries": expected, "entries_read": count,
                  "entries_causes": causes, "complete": count == expected, "seconds": seconds,
                  "profiles_per_s": args.profiles / seconds, "metric_seen_s": seen_at - start_at,
                  "last_entry_s": end_at - start_at if count else None,
                  "scan_end_s": scan["finished_at"] - start_at, "scan": scan,
                  "publish_call_to_manifest_s": start_at - published_wall,
                  "worker_cpu_s": sampler.cpu_between(worker.pid, start_at, window_end),
                  "worker_cpu_total_s": cpu_total, "worker_idle_cpu_per_s": idle_cpu_per_s,
                  "broker_cpu_s": sampler.cpu_between(broker.process.pid, start_at, window_end),
                  "worker_peak_rss_mib": round(peak_rss / 1024), "recovery_ready_s": ready_s,
                  "initial_scan_s": scan_s, "timers_pending": last_pending, "fill_s": fill["produce_s"],
                  "goal_1m_in_60s_rate": 1_000_000 / 60, "goal_met": args.profiles / seconds >= 1_000_000 / 60}
        result["worker_cpu_net_s"] = (result["worker_cpu_s"] or 0.0) - idle_cpu_per_s * seconds
        failed = False
    finally:
        for process in (profiler, worker):
            if process is not None:
                stop_process(process, timeout=30)
        sampler.halt.set()
        broker.stop()
        if failed:
            logs = args.out.parent / "logs"
            logs.mkdir(exist_ok=True)
            for path in tmp.glob("*.log"):
                shutil.copy(path, logs / f"backfill-{path.name}")
            print(f"failed: logs copied to {logs}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)

    load_after = os.getloadavg()
    out = {"date": dt.datetime.fromtimestamp(started, dt.UTC).isoformat(timespec="seconds"),
           "command": " ".join([".venv/bin/python", "benchmarks/bench_backfill.py", *sys.argv[1:]]),
           "seconds": round(time.time() - started, 1),
           "machine": {"cores": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
           "load_before": load_before, "load_after": load_after, "code": _code_state(), "core": core,
           "result": result}
    args.out.write_text(json.dumps(out, indent=2))
    r = result
    print(f"\nbackfill of '{args.segment_id}' ({args.where}) over {r['profiles']:,} profiles: {r['seconds']:.1f} s, "
          f"{r['profiles_per_s']:,.0f} profiles/s (goal 1M in 60 s = 16,667/s: "
          f"{'met' if r['goal_met'] else 'not met'})")
    sc = r["scan"]
    print(f"scan: {sc['checked']:,} checked, {sc['backfilled']:,} by the changed segments only, "
          f"{sc['full']:,} in full, "
          f"{sc['written']:,} written, {sc['changes']:,} changes; worker CPU per profile "
          f"{1e6 * (r['worker_cpu_s'] or 0) / r['profiles']:.0f} us, net of the idle worker's "
          f"({r['worker_idle_cpu_per_s']:.3f} CPU s/s) {1e6 * r['worker_cpu_net_s'] / r['profiles']:.0f} us")
    print(f"entries {r['entries_read']:,} of {r['expected_entries']:,} expected ({r['entries_causes']}); worker CPU "
          f"{r['worker_cpu_s'] or 0:.1f} s, broker CPU {r['broker_cpu_s'] or 0:.1f} s in the window; worker peak RSS "
          f"{r['worker_peak_rss_mib']} MiB; recovery {r['recovery_ready_s']:.1f} s, "
          f"initial scan {r['initial_scan_s']:.1f} s")
    print(f"load {load_before[0]:.2f} -> {load_after[0]:.2f} (1-min avg), {os.cpu_count()} cores; "
          f"written to {args.out}")


if __name__ == "__main__":
    main()
