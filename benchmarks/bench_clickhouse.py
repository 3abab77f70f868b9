"""ClickHouse (chDB): sink rows/s against a bare insert, and live-cohort query times at 1M and 10M
memberships (issue 6 item 7, issue 9's ClickHouse goals).

    .venv/bin/python benchmarks/bench_clickhouse.py [--batches 10] [--batch 10000] [--memberships 1000000,10000000]
        [--runs 20] [--only sink,cohort]

(a) sink: ``pipeline.sinks.clickhouse.ClickHouseWriter.write`` of ``--batches`` batches of ``--batch``
    segment changes (each change is a ``segment_changes`` row, which also feeds ``segment_size_history``
    through its materialized view, plus a ``segment_membership`` row), then of the same number of
    profile rows (``customer_profiles``). Profile rows are the columns of realistic profiles (generated
    traffic decoded and folded by ``processor.step``, see bench_profiles.py) cloned under new ids, each
    decoded from its own profile-updates JSON as the sink receives it; changes are drawn over the 50
    segments of segments_50.yaml. Ceilings: a bare ``client.insert`` of the same rows, already converted,
    with explicit column types, into tables of the same columns and engine with no materialized view
    (``CREATE TABLE ... AS``), in the same chDB: row-oriented with datetimes, and column-oriented with
    epoch-ms ticks (the fastest bare insert). Wall rows/s and rows per CPU second of the process.
(b) cohort: ``segment_membership`` filled by ``INSERT ... SELECT`` from ``numbers()`` (bulk, in parts of
    1M rows): 50 segments, segment ``s07`` with 100,000 members (plus 10,000 rows of customers that left it
    and 20,000 superseded older versions); the other 49 share the rest; ``customer_profiles`` holds the
    1,000,000 customers (the cohort query joins it). Timed, ``--runs`` times each, p50/p99 wall and p50
    CPU ms: ``pipeline.cohorts.cohort(client, db, 's07')`` (100,000 dicts with anonymous ids), the
    previous implementation of it (``previous_cohort``, checked to return the same list), ``cohort`` with
    ``anonymous_ids=False``, one keyset page of 100 from the middle of the cohort, and the SQL alone:
    ``SELECT count() FROM segment_membership FINAL WHERE segment_id = 's07' AND is_member = 1`` and the
    members (the same with ``customer_id, since, profile_version``; clickhouse-connect parses the rows
    lazily, so this times the query, not Python objects), at 1M memberships, then at 10M (9M rows added
    to the other segments), then after OPTIMIZE TABLE ... FINAL.

Each part runs in its own process with its own chDB data directory (one chDB path per process),
under a temporary directory deleted at the end.
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
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULT_PREFIX = "BENCH-RESULT "
DB = "segments"
TARGET = "s07"
TARGET_MEMBERS = 100_000
CUSTOMERS = 1_000_000


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def timed(fn: Any, runs: int) -> dict[str, float]:
    fn()  # warm-up, not counted
    times, cpu = [], []
    for _ in range(runs):
        started, cpu_started = time.perf_counter(), time.process_time()
        fn()
        times.append((time.perf_counter() - started) * 1000)
        cpu.append((time.process_time() - cpu_started) * 1000)  # this process: Python and chDB's threads
    return {"p50_ms": round(percentile(times, 0.5), 1), "p99_ms": round(percentile(times, 0.99), 1),
            "min_ms": round(min(times), 1), "cpu_p50_ms": round(percentile(cpu, 0.5), 1), "runs": runs}


# --- (a) sink -------------------------------------------------------------------------------------

def sink(path: Path, batches: int, batch: int) -> dict[str, Any]:
    from bench_profiles import clone_id, realistic_profiles

    from pipeline import codecs
    from pipeline.segments.definitions import load_segments
    from pipeline.sinks import clickhouse as ch

    _, rows = realistic_profiles(customers=2000, events=80_000, days=180)
    segment_ids = [s.id for s in load_segments(HERE / "segments_50.yaml")]
    rng = random.Random(3)
    now_ms = int(time.time() * 1000)
    total = batches * batch
    changes = [{"customer_id": clone_id(rng.randrange(total)), "segment_id": rng.choice(segment_ids),
                "change": "entered" if rng.random() < 0.7 else "exited", "changed_at": now_ms - rng.randrange(10**9),
                "profile_version": rng.randrange(1, 200), "cause": f"c9-{i}"} for i in range(total)]
    # as the sink receives them: each profile decoded from its own profile-updates JSON (epoch ms, fresh objects)
    profiles = [codecs.decode_profile(codecs.encode_profile({**rows[i % len(rows)], "customer_id": clone_id(i)}))
                for i in range(total)]
    writer = ch.ClickHouseWriter(f"chdb://{path}", DB)
    client = writer.client  # migrations applied here, outside the timing
    for table in ("segment_changes", "segment_membership", "customer_profiles"):
        client.command(f"CREATE TABLE {DB}.bare_{table} AS {DB}.{table}")
    out: dict[str, Any] = {"batches": batches, "batch": batch}

    def run(name: str, write: Any, rows_per_item: int) -> None:
        gc.collect()  # each variant starts from the same heap, not from its predecessor's garbage
        started, cpu_started = time.perf_counter(), time.process_time()
        for b in range(batches):
            write(b * batch, (b + 1) * batch)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        # CPU seconds of this process (Python and chDB's threads): less sensitive to a shared machine's load
        out[name] = {"items": total, "rows": total * rows_per_item, "seconds": round(seconds, 2),
                     "cpu_s": round(cpu, 2), "items_per_s": round(total / seconds),
                     "rows_per_s": round(total * rows_per_item / seconds),
                     "rows_per_cpu_s": round(total * rows_per_item / cpu)}

    run("writer_changes", lambda a, b: writer.write(changes=changes[a:b]), 2)
    run("writer_profiles", lambda a, b: writer.write(profiles=profiles[a:b]), 1)

    # ceilings: the same rows converted beforehand (date-times as datetimes, as clickhouse-connect documents
    # them, for the row-oriented insert; as epoch ms ticks for the column-oriented one), explicit column types,
    # into copies of the tables without the materialized view
    def aware(ms: int | None) -> dt.datetime | None:
        return None if ms is None else dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)

    time_columns = {i for i, name in enumerate(ch.PROFILE_COLUMN_NAMES) if "DateTime64" in ch.PROFILE_TYPES[i]}
    change_rows = [[c["customer_id"], c["segment_id"], c["change"], aware(c["changed_at"]), c["profile_version"],
                    c["cause"]] for c in changes]
    membership_rows = [[c["segment_id"], c["customer_id"], 1 if c["change"] == "entered" else 0,
                        aware(c["changed_at"]), c["profile_version"], c["cause"]] for c in changes]
    profile_rows = [[aware(p.get(name)) if i in time_columns else p.get(name)
                     for i, name in enumerate(ch.PROFILE_COLUMN_NAMES)] for p in profiles]
    change_cols = [[c[name] for c in changes] for name in ch.CHANGE_COLUMNS]
    membership_cols = [change_cols[1], change_cols[0], [1 if k == "entered" else 0 for k in change_cols[2]],
                       change_cols[3], change_cols[4], change_cols[5]]
    profile_cols = [[p.get(name) for p in profiles] for name in ch.PROFILE_COLUMN_NAMES]

    def bare_changes(a: int, b: int) -> None:
        client.insert(f"{DB}.bare_segment_changes", change_rows[a:b], column_names=ch.CHANGE_COLUMNS,
                      column_type_names=ch.CHANGE_TYPES)
        client.insert(f"{DB}.bare_segment_membership", membership_rows[a:b], column_names=ch.MEMBERSHIP_COLUMNS,
                      column_type_names=ch.MEMBERSHIP_TYPES)

    def bare_changes_columns(a: int, b: int) -> None:
        client.insert(f"{DB}.bare_segment_changes", [col[a:b] for col in change_cols], column_names=ch.CHANGE_COLUMNS,
                      column_type_names=ch.CHANGE_TYPES, column_oriented=True)
        client.insert(f"{DB}.bare_segment_membership", [col[a:b] for col in membership_cols],
                      column_names=ch.MEMBERSHIP_COLUMNS, column_type_names=ch.MEMBERSHIP_TYPES, column_oriented=True)

    run("bare_changes", bare_changes, 2)
    run("bare_profiles", lambda a, b: client.insert(f"{DB}.bare_customer_profiles", profile_rows[a:b],
                                                    column_names=ch.PROFILE_COLUMN_NAMES,
                                                    column_type_names=ch.PROFILE_TYPES), 1)
    run("bare_columns_changes", bare_changes_columns, 2)
    run("bare_columns_profiles", lambda a, b: client.insert(f"{DB}.bare_customer_profiles",
                                                            [col[a:b] for col in profile_cols],
                                                            column_names=ch.PROFILE_COLUMN_NAMES,
                                                            column_type_names=ch.PROFILE_TYPES,
                                                            column_oriented=True), 1)
    counts = {t: int(client.query(f"SELECT count() FROM {DB}.{t}").result_rows[0][0])
              for t in ("segment_changes", "segment_membership", "segment_size_history", "customer_profiles",
                        "bare_segment_changes", "bare_segment_membership", "bare_customer_profiles")}
    out["table_rows"] = counts
    # the writer's rows read back as the bare row insert stored them (same values, not only the same count)
    same = f"""SELECT count() FROM (SELECT * FROM {DB}.{{t}} FINAL EXCEPT SELECT * FROM {DB}.bare_{{t}} FINAL)"""
    out["writer_rows_not_in_bare"] = {t: int(client.query(same.format(t=t)).result_rows[0][0])
                                      for t in ("segment_membership", "customer_profiles")}
    return out


# --- (b) cohort -------------------------------------------------------------------------------------

MEMBERSHIP_INSERT = f"""INSERT INTO {DB}.segment_membership (segment_id, customer_id, is_member, since,
    profile_version, cause)
SELECT {{segment}}, concat('bench-', leftPad(toString({{customer}}), 7, '0')), {{member}},
    toDateTime64('2026-01-01 00:00:00', 3, 'UTC') + toIntervalSecond(number % 25000000),
    {{version}}, 'bench'
FROM numbers({{start}}, {{count}})"""


def fill(client: Any, *, segment: str, customer: str, member: str, version: str, start: int, count: int,
         part: int = 1_000_000) -> None:
    for offset in range(start, start + count, part):
        client.command(MEMBERSHIP_INSERT.format(segment=segment, customer=customer, member=member, version=version,
                                                start=offset, count=min(part, start + count - offset)))


def previous_cohort(client: Any, database: str, segment_id: str) -> list[dict[str, Any]]:
    """``pipeline.cohorts.cohort`` as it was before the read path was reworked (commit 954ef36), the
    reference the new one is timed and checked against: LEFT JOIN of every profile, per-row dicts."""
    result = client.query(
        f"""SELECT m.customer_id, m.since, p.anonymous_ids, m.profile_version
FROM (SELECT customer_id, since, profile_version FROM {database}.segment_membership FINAL
      WHERE segment_id = %(segment)s AND is_member = 1) AS m
LEFT JOIN (SELECT customer_id, anonymous_ids FROM {database}.customer_profiles FINAL) AS p
  ON p.customer_id = m.customer_id
ORDER BY m.since, m.customer_id""",
        parameters={"segment": segment_id},
    )
    return [{"customer_id": row[0], "since": row[1].replace(tzinfo=dt.UTC) if row[1].tzinfo is None else row[1],
             "anonymous_ids": list(row[2] or []), "profile_version": int(row[3])} for row in result.result_rows]


def cohort_part(path: Path, sizes: list[int], runs: int) -> dict[str, Any]:
    from pipeline.cohorts import cohort
    from pipeline.sinks.clickhouse import ClickHouseWriter

    client = ClickHouseWriter(f"chdb://{path}", DB).client
    out: dict[str, Any] = {"customers": CUSTOMERS, "target_members": TARGET_MEMBERS, "steps": []}
    started = time.perf_counter()
    client.command(f"""INSERT INTO {DB}.customer_profiles (customer_id, anonymous_ids, version, updated_at)
SELECT concat('bench-', leftPad(toString(number), 7, '0')), [concat('anon-', toString(number))], 1,
    toDateTime64('2026-01-01 00:00:00', 3, 'UTC') FROM numbers({CUSTOMERS})""")
    # the target segment: 100k members, 10k customers that left (is_member = 0), 20k superseded versions
    fill(client, segment=f"'{TARGET}'", customer="number * 7 % 1000000", member="1", version="2", start=0,
         count=TARGET_MEMBERS)
    fill(client, segment=f"'{TARGET}'", customer="number * 7 % 1000000", member="0", version="2",
         start=TARGET_MEMBERS, count=10_000)
    fill(client, segment=f"'{TARGET}'", customer="number * 7 % 1000000", member="0", version="1", start=0,
         count=20_000)
    loaded = TARGET_MEMBERS + 30_000
    others = "concat('s', leftPad(toString(8 + number % 49), 2, '0'))"  # s08..s56: 49 other segments
    count_sql = f"SELECT count() FROM {DB}.segment_membership FINAL WHERE segment_id = '{TARGET}' AND is_member = 1"
    list_sql = (f"SELECT customer_id, since, profile_version FROM {DB}.segment_membership FINAL "
                f"WHERE segment_id = '{TARGET}' AND is_member = 1")
    middle: dict[str, Any] = {}

    def measure(**extra: Any) -> dict[str, Any]:
        whole = cohort(client, DB, TARGET)
        if whole != previous_cohort(client, DB, TARGET):  # same members, order and values as before
            raise RuntimeError("cohort() differs from the previous implementation")
        middle["after"] = (whole[len(whole) // 2]["since"], whole[len(whole) // 2]["customer_id"])
        return {**extra, "cohort_members": len(whole), "count_final": int(client.query(count_sql).result_rows[0][0]),
                "cohort": timed(lambda: cohort(client, DB, TARGET), runs),
                "cohort_no_anonymous_ids": timed(lambda: cohort(client, DB, TARGET, anonymous_ids=False), runs),
                "cohort_page_100": timed(lambda: cohort(client, DB, TARGET, limit=100, after=middle["after"]), runs),
                "previous_cohort": timed(lambda: previous_cohort(client, DB, TARGET), max(3, runs // 4)),
                "count": timed(lambda: client.query(count_sql), runs),
                "members_only": timed(lambda: client.query(list_sql), runs)}

    for size in sizes:
        add = size - loaded
        t0 = time.perf_counter()
        fill(client, segment=others, customer="intDiv(number, 49) % 1000000", member="toUInt8(number % 10 != 0)",
             version="1", start=loaded, count=add)
        load_s = time.perf_counter() - t0
        loaded = size
        rows = int(client.query(f"SELECT count() FROM {DB}.segment_membership").result_rows[0][0])
        parts = int(client.query("SELECT count() FROM system.parts WHERE database = %(db)s AND "
                                 "table = 'segment_membership' AND active", parameters={"db": DB}).result_rows[0][0])
        step = measure(memberships=rows, active_parts=parts, load_s=round(load_s, 1), load_avg=os.getloadavg()[0])
        out["steps"].append(step)
        print(f"  {rows:,} memberships ({parts} parts): cohort p50 {step['cohort']['p50_ms']} ms "
              f"(previous {step['previous_cohort']['p50_ms']} ms), count p50 {step['count']['p50_ms']} ms",
              file=sys.stderr, flush=True)
        if size == sizes[-1]:
            t0 = time.perf_counter()
            client.command(f"OPTIMIZE TABLE {DB}.segment_membership FINAL")
            optimize_s = time.perf_counter() - t0
            rows = int(client.query(f"SELECT count() FROM {DB}.segment_membership").result_rows[0][0])
            out["steps"].append(measure(memberships=rows, after_optimize=True, optimize_s=round(optimize_s, 1),
                                        load_avg=os.getloadavg()[0]))
    out["total_s"] = round(time.perf_counter() - started, 1)
    return out


# --- driver ---------------------------------------------------------------------------------------

def child(args: argparse.Namespace) -> None:
    if args.part == "sink":
        result = sink(args.path, args.batches, args.batch)
    else:
        result = cohort_part(args.path, [int(s) for s in args.memberships.split(",")], args.runs)
    sys.stdout.write(RESULT_PREFIX + json.dumps(result, default=str) + "\n")
    sys.stdout.flush()


def run_child(part: str, args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--part", part, "--path", str(tmp / part), "--batches", str(args.batches),
               "--batch", str(args.batch), "--memberships", args.memberships, "--runs", str(args.runs)]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, cwd=HERE.parent)
    try:
        stdout, _ = process.communicate(timeout=args.timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    for line in stdout.splitlines():
        if line.startswith(RESULT_PREFIX):
            return dict(json.loads(line[len(RESULT_PREFIX):]))
    raise RuntimeError(f"{part}: no result (exit {process.returncode})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=10)
    parser.add_argument("--batch", type=int, default=10_000)
    parser.add_argument("--memberships", default="1000000,10000000")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--only", default="sink,cohort")
    parser.add_argument("--timeout", type=float, default=900.0)
    parser.add_argument("--part", choices=["sink", "cohort"], help=argparse.SUPPRESS)
    parser.add_argument("--path", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=HERE / "results" / "clickhouse.json")
    args = parser.parse_args()
    if args.part:
        child(args)
        return
    load_before = os.getloadavg()
    started = time.time()
    out: dict[str, Any] = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count()}
    tmp = Path(tempfile.mkdtemp(prefix="bench-clickhouse-"))
    try:
        for part in args.only.split(","):
            print(f"[{time.strftime('%H:%M:%S')}] {part} ...", flush=True)
            out[part] = run_child(part, args, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if "sink" in out:
        s = out["sink"]
        print(f"\n(a) sink, {s['batches']} batches of {s['batch']:,}")
        print(f"    {'what':<36}{'rows/s':>10}{'bare rows/s':>13}{'ratio':>7}{'bare cols/s':>13}{'ratio':>7}")
        for name, kind in (("changes (+ membership rows, + MV)", "changes"), ("profiles", "profiles")):
            w, b, c = (s[f"writer_{kind}"]["rows_per_s"], s[f"bare_{kind}"]["rows_per_s"],
                       s[f"bare_columns_{kind}"]["rows_per_s"])
            print(f"    {name:<36}{w:>10,}{b:>13,}{w / b:>7.2f}{c:>13,}{w / c:>7.2f}"
                  f"   per CPU s: {s[f'writer_{kind}']['rows_per_cpu_s']:,} vs "
                  f"{s[f'bare_columns_{kind}']['rows_per_cpu_s']:,}")
        print(f"    writer rows missing from the bare copies: {s['writer_rows_not_in_bare']}")
    if "cohort" in out:
        print(f"\n(b) live cohort of {TARGET_MEMBERS:,} members ({out['cohort']['total_s']} s in all), p50 / p99 ms")
        names = (("cohort", "cohort()"), ("previous_cohort", "previous"), ("cohort_no_anonymous_ids", "no anon"),
                 ("cohort_page_100", "page 100"), ("count", "count"), ("members_only", "members SQL"))
        print(f"    {'memberships':>12}{'optimized':>10}" + "".join(f"{label:>16}" for _, label in names))
        for st in out["cohort"]["steps"]:
            print(f"    {st['memberships']:>12,}{str(st.get('after_optimize', False)):>10}"
                  + "".join(f"{st[key]['p50_ms']:>9} /{st[key]['p99_ms']:>5}" for key, _ in names))
    out["load_before"] = load_before
    out["load_after"] = os.getloadavg()
    out["wall_s"] = round(time.time() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=2, default=str))
    print(f"\nwritten {args.out} ({out['wall_s']} s; load {load_before[0]:.2f} -> {out['load_after'][0]:.2f})")


if __name__ == "__main__":
    main()
