"""Profiles: bytes per profile (resident and serialized), profile-fold rate per core, and the time a
worker takes to recover its profile table from the changelog (issue 4 items 4 and 8, issue 9 goals).

    .venv/bin/python benchmarks/bench_profiles.py [--profiles 1000000] [--templates 2000]
        [--recovery 100000,300000] [--stores memory,rocksdb] [--only size,fold,recovery]

Realistic profiles: ``pipeline.generate.traffic(extended=True)`` (seeded; identities, e-mails, refunds,
tickets, surveys) for ``--templates`` customers over ``--days`` days of event time, each message decoded
by ``pipeline.decode.decode``, keyed by ``pipeline.identity.routing_key`` and folded by
``pipeline.processor.step`` with the default segments, then ``schedule`` (as the worker does). The
profiles obtained are the templates; ``--profiles`` profiles are clones of them under new customer ids
(``bench-0000001``...), each decoded from its own JSON (no shared objects, as a worker holds them).

(a) size: the worker keeps profiles in its table as encoded bytes (memory:// a dict of bytes, or RocksDB)
    and decodes one when it reads it. Resident = RSS growth of a forked child while it builds that
    store for ``--profiles`` profiles (key bytes -> value bytes), divided by the count: with the values
    of ``pipeline.app._encode_state`` (the compact encoding), and with the JSON values written before it
    (format 0); also a dict of decoded ``ProfileState`` objects (for 200,000 profiles; what the earlier
    figure measured). Serialized = the value's length (table value and changelog message), mean, p50,
    p99 and max over all profiles. Every profile carries the definitions fingerprint, as in the worker.
    The fold part also gives the µs per profile to encode and decode a value, compact against JSON.
(b) fold rate: ``step()`` calls per second on one core over the decoded events, with the default
    segments and with benchmarks/segments_50.yaml, also with ``schedule`` after each step (the worker's
    per-event work). Ceiling: ``fold`` alone (the profile update without any segment evaluation).
(c) recovery: an embedded broker; the changelog topic the worker's ``profiles`` table uses
    (``<app_id>-profiles-changelog``, PIPELINE_PARTITIONS partitions, compacted, created here first as
    faust would) filled with N records (key = customer id, value = the serialized state, on the partition
    the worker's partitioner gives the key; each template's encoding computed once and the clone's id
    substituted in its bytes, checked against ``_encode_state`` of the clone), in 1 MiB batches, on a
    broker of its own per N; then ``python -m pipeline worker`` with that app id, one run per store
    (each with a fresh data dir), timed from its start to the first 200 of GET /ready; peak RSS (VmHWM)
    of the worker and of the broker at that moment. Completeness: GET /profiles/{id} must answer 200
    for every id of each partition's last batch and the 25 before it (the embedded broker reports a
    partition's end as its last batch's base offset + 1, DESIGN §3; pipeline.recovery corrects it) and
    for 2,000 random ids (all of them up to 20,000). Ceiling: a bare kafka-python consumer reading the
    same changelog to its end (counting records, not end offsets).
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

from benchlib import status_kib

from pipeline.app import _encode_state, partition_for_key
from pipeline.broker.embedded import EmbeddedBroker, free_port
from pipeline.decode import decode
from pipeline.events import DeadLetter, Event
from pipeline.generate import traffic
from pipeline.identity import routing_key
from pipeline.processes import stop_process
from pipeline.processor import Config, schedule, step
from pipeline.profile import ProfileState, fold
from pipeline.segments.definitions import Segment, load_segments

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DAY_MS = 86_400_000


# --- realistic profiles ---------------------------------------------------------------------------

def realistic_events(*, customers: int, events: int, days: int, seed: int = 9) -> tuple[list[tuple[str, Event]], int]:
    """(key, event) pairs decoded from generated traffic spanning ``days`` up to now, and now (ms)."""
    now_ms = int(time.time() * 1000)
    step_ms = days * DAY_MS // events
    start_ms = now_ms - days * DAY_MS - 60_000
    out: list[tuple[str, Event]] = []
    for message in traffic(customers=customers, seed=seed, start_ms=start_ms, step_ms=step_ms, extended=True):
        result = decode(message.topic, message.value, now_ms=now_ms)
        if not isinstance(result, DeadLetter):
            key = routing_key(customer_id=result.customer_id, loyalty_id=result.loyalty_id,
                              email_hash=result.email_hash, anonymous_id=result.anonymous_id)
            if key:
                out.append((key, result))
        if len(out) >= events:
            break
    return out, now_ms


def realistic_profiles(*, customers: int = 2000, events: int = 80_000, days: int = 180,
                       segments: list[Segment] | None = None) -> tuple[list[ProfileState], list[Any]]:
    """Profiles folded from generated traffic (the templates) and the rows (columns) they last emitted."""
    segments = segments if segments is not None else load_segments(None)
    config = Config()
    pairs, _ = realistic_events(customers=customers, events=events, days=days)
    states: dict[str, ProfileState] = {}
    rows: dict[str, Any] = {}
    for key, event in pairs:
        result = step(states.get(key), key, event, event.occurred_at, segments, config)
        states[key] = result.state
        if result.row is not None:
            rows[key] = result.row
    last = max(e.occurred_at for _, e in pairs)
    for state in states.values():
        schedule(state, max(last, state.updated_at), segments, config)
    return list(states.values()), [rows[k] for k in states if k in rows]


def clone_id(i: int) -> str:
    return f"bench-{i:07d}"


def clone(template_json: dict[str, Any], customer_id: str) -> ProfileState:
    data = json.loads(json.dumps(template_json))  # fresh objects, as decoded by a worker
    data["customer_id"] = customer_id
    return ProfileState.from_dict(data)


def deep_size(obj: Any, seen: set[int] | None = None) -> int:
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, dict):
        size += sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    elif isinstance(obj, (list, tuple, set)):
        size += sum(deep_size(v, seen) for v in obj)
    elif hasattr(obj, "__slots__"):
        size += sum(deep_size(getattr(obj, s), seen) for s in obj.__slots__ if hasattr(obj, s))
    return size


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# --- (a) size ------------------------------------------------------------------------------------

def _legacy_json(data: dict[str, Any]) -> bytes:
    """What ``_encode_state`` wrote before the compact encoding (format 0, still read): the JSON of
    ``ProfileState.to_dict()``; from the dict directly (``asdict`` would take minutes at 1M)."""
    return json.dumps(data, separators=(",", ":")).encode()


def _store_child(kind: str, template_json: list[dict[str, Any]], count: int, conn: Any) -> None:
    """In a forked child: build the store a worker holds for ``count`` profiles and send back the RSS
    growth and the value sizes. ``compact``/``json``: a dict of key bytes -> encoded value bytes (the
    memory:// store; ``_encode_state`` / format 0); ``objects``: a dict of decoded ``ProfileState``."""
    def value(i: int) -> Any:
        data = json.loads(json.dumps(template_json[i % len(template_json)]))  # fresh objects, as decoded
        data["customer_id"] = clone_id(i)
        if kind == "json":
            return _legacy_json(data)
        state = ProfileState.from_dict(data)
        return state if kind == "objects" else _encode_state(state)

    for i in range(len(template_json)):  # touch the inherited templates first (copy-on-write pages)
        value(i)
    gc.collect()
    rss_before = status_kib("VmRSS")
    started = time.perf_counter()
    store: dict[bytes, Any] = {}
    for i in range(count):
        store[clone_id(i).encode()] = value(i)
    build_s = time.perf_counter() - started
    gc.collect()
    rss_after = status_kib("VmRSS")
    sizes = [len(v) for v in store.values()] if kind != "objects" else []
    conn.send({"store": kind, "profiles": count, "build_s": round(build_s, 1),
               "rss_delta_mib": round((rss_after - rss_before) / 1024, 1),
               "resident_b": round((rss_after - rss_before) * 1024 / count),
               **({"serialized_mean_b": round(sum(sizes) / count), "serialized_p50_b": round(percentile(sizes, 0.5)),
                   "serialized_p99_b": round(percentile(sizes, 0.99)), "serialized_max_b": max(sizes)}
                  if sizes else {})})
    conn.close()


def measure_size(templates: list[ProfileState], count: int, objects: int = 200_000) -> dict[str, Any]:
    """Bytes per profile as the worker holds and sends them: for each store kind a forked child
    builds it for ``count`` profiles (``objects``: the decoded form, for fewer, as before this
    encoding the figures were of that form) and reports its RSS growth per profile."""
    import multiprocessing

    from pipeline.segments.live import set_fingerprint

    # as in the worker, every stored profile carries the fingerprint of the definitions it was evaluated under
    fingerprint = set_fingerprint(load_segments(None))
    template_json = [{**t.to_dict(), "definitions": fingerprint} for t in templates]
    sample = ProfileState.from_dict(json.loads(json.dumps(template_json[0])))
    assert _legacy_json(template_json[0]) == json.dumps(sample.to_dict(), separators=(",", ":")).encode()
    context = multiprocessing.get_context("fork")
    rows = []
    for kind, n in (("compact", count), ("json", count), ("objects", min(objects, count))):
        parent, child = context.Pipe(duplex=False)
        process = context.Process(target=_store_child, args=(kind, template_json, n, child))
        process.start()
        child.close()
        rows.append(parent.recv())
        process.join()
        print(f"    {kind}: {rows[-1]}", flush=True)
    deep_t = [deep_size(ProfileState.from_dict(json.loads(json.dumps(t)))) for t in template_json]
    compact_t = [len(_encode_state(ProfileState.from_dict(json.loads(json.dumps(t))))) for t in template_json]
    return {"profiles": count, "templates": len(templates), "stores": rows,
            "decoded_deep_mean_b": round(sum(deep_t) / len(deep_t)),
            "decoded_deep_p99_b": round(percentile(deep_t, 0.99)),
            "template_compact_p99_b": round(percentile(compact_t, 0.99))}


def measure_codec(states: list[ProfileState], repeat: int = 3) -> list[dict[str, Any]]:
    """µs per profile to encode and to decode it: ``_encode_state``/``_decode_state`` (compact) against
    the JSON the worker used before (``to_dict`` + ``json.dumps``; ``json.loads`` + ``from_dict``);
    CPU time, best of ``repeat`` passes over ``states``."""
    from pipeline.app import _decode_state

    def best(fn: Any, values: list[Any]) -> float:
        times = []
        for _ in range(repeat):
            started = time.process_time()
            for v in values:
                fn(v)
            times.append(time.process_time() - started)
        return min(times) / len(values) * 1e6

    compact = [_encode_state(s) for s in states]
    legacy = [json.dumps(s.to_dict(), separators=(",", ":")).encode() for s in states]
    return [
        {"variant": "encode, compact (_encode_state)", "us_per_profile": round(best(_encode_state, states), 1)},
        {"variant": "encode, JSON (before)", "us_per_profile": round(best(
            lambda s: json.dumps(s.to_dict(), separators=(",", ":")).encode(), states), 1)},
        {"variant": "decode, compact (_decode_state)", "us_per_profile": round(best(_decode_state, compact), 1)},
        {"variant": "decode, JSON (before)", "us_per_profile": round(best(
            lambda v: ProfileState.from_dict(json.loads(v)), legacy), 1)},
    ]


# --- (b) fold rate -------------------------------------------------------------------------------

def measure_fold(pairs: list[tuple[str, Event]], segment_sets: dict[str, list[Segment]]) -> list[dict[str, Any]]:
    config = Config()
    rows = []
    states: dict[str, ProfileState] = {}
    started = time.process_time()
    for key, event in pairs:
        state = states.get(key)
        if state is None:
            state = states[key] = ProfileState(customer_id=key)
        fold(state, event, event.occurred_at)
    cpu = time.process_time() - started
    rows.append({"variant": "fold only (ceiling)", "segments": 0, "calls": len(pairs),
                 "per_s": round(len(pairs) / cpu), "us_per_call": round(cpu / len(pairs) * 1e6, 1)})
    for name, segments in segment_sets.items():
        for with_schedule in (False, True):
            states = {}
            started = time.process_time()
            for key, event in pairs:
                result = step(states.get(key), key, event, event.occurred_at, segments, config)
                states[key] = result.state
                if with_schedule and not result.duplicate:
                    schedule(result.state, event.occurred_at, segments, config)
            cpu = time.process_time() - started
            rows.append({"variant": f"step{' + schedule' if with_schedule else ''}, {name}",
                         "segments": len(segments), "calls": len(pairs), "per_s": round(len(pairs) / cpu),
                         "us_per_call": round(cpu / len(pairs) * 1e6, 1)})
    return rows


# --- (c) recovery --------------------------------------------------------------------------------

PLACEHOLDER = "bench-#######"  # as long as clone_id(i): substituted for it in a template's encoded bytes
TAIL_BEFORE = 25  # ids checked before each partition's last batch


def _get(url: str, timeout: float = 5.0) -> int:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


def _clone_values(template_json: list[dict[str, Any]]) -> list[tuple[bytes, bytes] | None]:
    """Per template, the bytes before and after the customer id in ``_encode_state`` of its clone, so a
    clone's value is ``before + id + after`` without building it (None: the id is not there exactly once).
    Checked below against the real encoding."""
    parts: list[tuple[bytes, bytes] | None] = []
    for data in template_json:
        encoded = _encode_state(clone(data, PLACEHOLDER))
        before, *after = encoded.split(PLACEHOLDER.encode())
        parts.append((before, after[0]) if len(after) == 1 else None)
    return parts


def fill_changelog(bootstrap: str, topic: str, partitions: int, templates: list[ProfileState],
                   count: int) -> dict[str, Any]:
    """Write ``count`` profile records (the values ``_encode_state`` gives each clone; checked for every
    template and 500 random ids) in large batches; the per-partition ends as written and as ListOffsets
    reports them, and the ids of each partition's last batch (plus the ``TAIL_BEFORE`` before it)."""
    from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
    from kafka.admin import NewTopic

    admin = KafkaAdminClient(bootstrap_servers=bootstrap, client_id="bench-admin")
    try:  # as faust declares a table's changelog: compacted, the table's partition count
        admin.create_topics([NewTopic(topic, partitions, 1, topic_configs={"cleanup.policy": "compact"})])
    finally:
        admin.close()
    template_json = [t.to_dict() for t in templates]
    parts = _clone_values(template_json)
    rng = random.Random(count)
    for i in [*range(min(count, len(template_json))), *(rng.randrange(count) for _ in range(500))]:
        expected = _encode_state(clone(template_json[i % len(template_json)], clone_id(i)))
        part = parts[i % len(parts)]
        if part is not None and part[0] + clone_id(i).encode() + part[1] != expected:
            parts[i % len(parts)] = None  # this template: encode each clone in full
    producer = KafkaProducer(bootstrap_servers=bootstrap, linger_ms=50, acks=1, batch_size=1024 * 1024,
                             max_request_size=8 * 1024 * 1024)
    ids: dict[int, list[str]] = {p: [] for p in range(partitions)}
    total = 0
    started = time.perf_counter()
    try:
        for i in range(count):
            cid = clone_id(i)
            key = cid.encode()
            part = parts[i % len(parts)]
            value = part[0] + key + part[1] if part is not None else \
                _encode_state(clone(template_json[i % len(template_json)], cid))
            partition = partition_for_key(key, partitions)
            producer.send(topic, key=key, value=value, partition=partition)
            ids[partition].append(cid)
            total += len(value)
        producer.flush()
    finally:
        producer.close()
    produce_s = time.perf_counter() - started
    consumer = KafkaConsumer(bootstrap_servers=bootstrap)
    try:
        reported = {tp.partition: end for tp, end in
                    consumer.end_offsets([TopicPartition(topic, p) for p in range(partitions)]).items()}
    finally:
        consumer.close()
    written = {p: len(ids[p]) for p in ids}  # a new topic: offsets 0..n-1
    # ListOffsets answers the last batch's base offset + 1 on the embedded broker: that batch is checked whole
    tail = {p: ids[p][max(0, min(reported[p], written[p]) - 1 - TAIL_BEFORE):] for p in ids}
    return {"tail": tail, "bytes": total, "produce_s": produce_s, "written_ends": written,
            "reported_ends": reported, "encoding": _encoding_name(_encode_state(templates[0])),
            "full_encodes": sum(p is None for p in parts)}


def _encoding_name(value: bytes) -> str:
    return "JSON (format 0)" if value[:1] == b"{" else f"compact (format {value[0]}, pipeline.profile_encoding)"


def bare_read(bootstrap: str, topic: str, partitions: int, count: int, timeout: float) -> float:
    """Ceiling: a bare consumer reading the changelog from the start until it has ``count`` records."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None,
                             max_partition_fetch_bytes=8 * 1024 * 1024, fetch_max_bytes=64 * 1024 * 1024)
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        consumer.seek_to_beginning(*tps)
        started = time.perf_counter()
        seen = 0
        while seen < count:
            if time.perf_counter() - started > timeout:
                raise RuntimeError(f"bare read: {seen} of {count} records after {timeout} s")
            for records in consumer.poll(timeout_ms=500, max_records=100_000).values():
                seen += len(records)
        return time.perf_counter() - started
    finally:
        consumer.close()


def recover(broker: EmbeddedBroker, tmp: Path, app_id: str, partitions: int, store: str,
            tail: dict[int, list[str]], count: int, timeout: float) -> dict[str, Any]:
    port = free_port()
    data = tmp / f"worker-{store.rstrip(':/')}-{count}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")}
    env.update({"PIPELINE_BROKER": broker.url, "PIPELINE_APP_ID": app_id, "PIPELINE_DATA_DIR": str(data),
                "PIPELINE_TOPIC_PREFIX": f"{app_id}-", "PIPELINE_PARTITIONS": str(partitions),
                "PIPELINE_STORE": store, "PIPELINE_HTTP_PORT": str(port), "PIPELINE_LOG_LEVEL": "info"})
    log_path = tmp / f"worker-{store.rstrip(':/')}-{count}.log"
    base = f"http://127.0.0.1:{port}"
    with open(log_path, "wb") as log:
        started = time.perf_counter()
        worker = subprocess.Popen([sys.executable, "-m", "pipeline", "worker"], cwd=ROOT, env=env, stdout=log,
                                  stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        http_at = None
        while True:
            elapsed = time.perf_counter() - started
            if worker.poll() is not None:
                raise RuntimeError(f"worker exited with {worker.returncode}: see {log_path}")
            if elapsed > timeout:
                raise RuntimeError(f"worker not ready after {timeout} s: see {log_path}")
            status = _get(base + "/ready", timeout=2)
            if status and http_at is None:
                http_at = elapsed
            if status == 200:
                break
            time.sleep(0.1)
        ready_s = time.perf_counter() - started
        peak_rss = status_kib("VmHWM", worker.pid)
        broker_rss = status_kib("VmHWM", broker.process.pid) if broker.process is not None else 0
        last_ids = [cid for ids in tail.values() for cid in ids]
        rng = random.Random(1)
        others = [clone_id(i) for i in range(count)] if count <= 20_000 else \
            [clone_id(rng.randrange(count)) for _ in range(2000)]
        missing_last = [cid for cid in last_ids if _get(f"{base}/profiles/{cid}", timeout=30) != 200]
        missing_others = sum(_get(f"{base}/profiles/{cid}", timeout=30) != 200 for cid in others)
        time.sleep(5)  # do the missing ones arrive later? (they should not be missing at all)
        still_missing = [cid for cid in missing_last if _get(f"{base}/profiles/{cid}") != 200]
        log_lines = log_path.read_text(errors="replace").splitlines()
        corrected = sum("changelog ends corrected" in line for line in log_lines)
        return {"store": store, "profiles": count, "ready_s": round(ready_s, 1),
                "http_up_s": round(http_at, 1) if http_at is not None else None,
                "per_s": round(count / ready_s), "last_checked": len(last_ids), "last_missing": len(missing_last),
                "last_missing_ids": missing_last[:10], "last_missing_5s_later": len(still_missing),
                "others_checked": len(others), "others_missing": missing_others,
                "complete": not missing_last and not missing_others, "peak_rss_mib": round(peak_rss / 1024),
                "broker_peak_rss_mib": round(broker_rss / 1024), "highwater_corrections_logged": corrected}
    finally:
        stop_process(worker, timeout=30)


def measure_recovery(templates: list[ProfileState], counts: list[int], stores: list[str], partitions: int,
                     timeout: float) -> list[dict[str, Any]]:
    """Per count, its own embedded broker (so its memory is that changelog's), filled once, read by the
    bare consumer, then recovered by one worker per store (the same app id, each with a fresh data dir)."""
    tmp = Path(tempfile.mkdtemp(prefix="bench-profiles-"))
    rows: list[dict[str, Any]] = []
    failed = True
    try:
        for count in counts:
            broker = EmbeddedBroker(tmp / f"broker-{count}")
            try:
                broker.start()
                app_id = f"bench-recovery-{uuid.uuid4().hex[:6]}"
                topic = f"{app_id}-profiles-changelog"
                fill = fill_changelog(broker.bootstrap, topic, partitions, templates, count)
                total, produce_s = fill["bytes"], fill["produce_s"]
                filled_rss = status_kib("VmRSS", broker.process.pid) if broker.process is not None else 0
                print(f"  wrote {count:,} profile records ({total / 2**20:.0f} MiB, {fill['encoding']}) to {topic} "
                      f"in {produce_s:.1f} s ({count / produce_s:,.0f}/s); broker RSS {filled_rss / 1024:.0f} MiB; "
                      f"ends written {fill['written_ends']}, ListOffsets {fill['reported_ends']}", flush=True)
                bare_s = bare_read(broker.bootstrap, topic, partitions, count, timeout)
                rows.append({"store": "bare consumer (ceiling)", "profiles": count, "ready_s": round(bare_s, 1),
                             "per_s": round(count / bare_s), "complete": True, "bytes": total,
                             "encoding": fill["encoding"], "fill_s": round(produce_s, 1),
                             "fill_per_s": round(count / produce_s), "written_ends": fill["written_ends"],
                             "reported_ends": fill["reported_ends"], "broker_rss_filled_mib": round(filled_rss / 1024)})
                print(f"  bare consumer read them in {bare_s:.1f} s", flush=True)
                for store in stores:  # the same app id: each run with its own data dir (a cold start)
                    row = recover(broker, tmp, app_id, partitions, store, fill["tail"], count, timeout)
                    rows.append(row)
                    print(f"  {store}: ready in {row['ready_s']} s (HTTP up at {row['http_up_s']} s), worker peak "
                          f"RSS {row['peak_rss_mib']} MiB, broker {row['broker_peak_rss_mib']} MiB; missing: "
                          f"{row['last_missing']} of the {row['last_checked']} ids of the partitions' last batches, "
                          f"{row['others_missing']} of {row['others_checked']} other ids", flush=True)
            finally:
                broker.stop()
        failed = False
    finally:
        if failed:
            logs = HERE / "results" / "logs"
            logs.mkdir(parents=True, exist_ok=True)
            for log in tmp.glob("*.log"):
                shutil.copy(log, logs / f"profiles-{log.name}")
            print(f"failed: logs copied to {logs}", file=sys.stderr)
        shutil.rmtree(tmp, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--profiles", type=int, default=1_000_000)
    parser.add_argument("--templates", type=int, default=2000, help="generated customers (distinct profiles)")
    parser.add_argument("--events", type=int, default=80_000, help="generated events folded into the templates")
    parser.add_argument("--days", type=int, default=180, help="days of event time the events span")
    parser.add_argument("--recovery", default="100000,300000", help="profile counts to recover (comma-separated)")
    parser.add_argument("--stores", default="memory,rocksdb")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds a recovery may take")
    parser.add_argument("--only", default="size,fold,recovery")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "profiles.json")
    args = parser.parse_args()
    only = set(args.only.split(","))
    load_before = os.getloadavg()
    started = time.time()
    default_segments = load_segments(None)
    fifty = load_segments(HERE / "segments_50.yaml")
    pairs, _ = realistic_events(customers=args.templates, events=args.events, days=args.days)
    templates, _ = realistic_profiles(customers=args.templates, events=args.events, days=args.days,
                                      segments=default_segments)
    print(f"{len(templates):,} template profiles from {len(pairs):,} events ({args.templates:,} generated customers, "
          f"{args.days} days)", flush=True)
    out: dict[str, Any] = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
                           "cpus": os.cpu_count(), "templates": len(templates), "events": len(pairs),
                           "days": args.days}
    if "size" in only:
        print("\n(a) size", flush=True)
        size = measure_size(templates, args.profiles)
        out["size"] = size
        print(f"    {'store (what the worker holds)':<34}{'profiles':>10}{'RSS MiB':>9}{'B/profile':>10}"
              f"{'value mean':>11}{'p50':>6}{'p99':>6}{'max':>6}")
        for r in size["stores"]:
            print(f"    {r['store']:<34}{r['profiles']:>10,}{r['rss_delta_mib']:>9}{r['resident_b']:>10,}"
                  f"{r.get('serialized_mean_b', '-'):>11}{r.get('serialized_p50_b', '-'):>6}"
                  f"{r.get('serialized_p99_b', '-'):>6}{r.get('serialized_max_b', '-'):>6}")
        print(f"    decoded ProfileState, deep getsizeof: mean {size['decoded_deep_mean_b']} B, p99 "
              f"{size['decoded_deep_p99_b']} B (goals: <= 1,024 B resident, <= 300 B serialized)", flush=True)
    if "fold" in only:
        fold_rows = measure_fold(pairs, {"default": default_segments, "segments_50": fifty})
        out["fold"] = fold_rows
        print(f"\n(b) {'variant':<36}{'segments':>9}{'calls/s':>10}{'µs/call':>9}")
        for r in fold_rows:
            print(f"    {r['variant']:<36}{r['segments']:>9}{r['per_s']:>10,}{r['us_per_call']:>9}")
        codec_rows = measure_codec(templates)
        out["codec"] = codec_rows
        print(f"    {'stored value, per profile':<36}{'µs':>9}")
        for r in codec_rows:
            print(f"    {r['variant']:<36}{r['us_per_profile']:>9}")
    if "recovery" in only:
        counts = [int(c) for c in args.recovery.split(",") if c]
        stores = [f"{s}://" for s in args.stores.split(",")]
        print("\n(c) recovery", flush=True)
        rec = measure_recovery(templates, counts, stores, args.partitions, args.timeout)
        out["recovery"] = rec
        print(f"    {'store':<26}{'profiles':>10}{'ready s':>9}{'profiles/s':>12}{'complete':>10}")
        for r in rec:
            print(f"    {r['store']:<26}{r['profiles']:>10,}{r['ready_s']:>9}{r['per_s']:>12,}{str(r['complete']):>10}")
    out["load_before"] = load_before
    out["load_after"] = os.getloadavg()
    out["wall_s"] = round(time.time() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2))
    print(f"\nwritten {args.out} ({out['wall_s']} s; load {load_before[0]:.2f} -> {out['load_after'][0]:.2f})")


if __name__ == "__main__":
    main()
