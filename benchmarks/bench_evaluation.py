"""Cost of one profile update (fold + segment evaluation + diff) with 10, 100 and 1,000 segments
defined, evaluating every segment against only those the event can affect (incremental), in one
run, on the same events. Prints a table and writes JSON.

    .venv/bin/python benchmarks/bench_evaluation.py [--events 3000]

``--baseline REV``: instead, the profile stage's per-event work as the worker does it (``step``, then
``schedule`` with the evaluated row) on the same decoded events, this tree against the ``pipeline`` package
of git revision REV (bench_deadlines.load_package), the two taking turns every 500 events; CPU time
(``process_time``) with the garbage collector off while timing; ``--clock event`` (now = each event's time)
or ``wall`` (now 1 ms apart, as a live worker); the changes and next check of every event compared.

    .venv/bin/python benchmarks/bench_evaluation.py --baseline 451f3a5 [--clock wall] [--events 20000]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

from pipeline.decode import decode
from pipeline.events import DeadLetter
from pipeline.generate import CATEGORIES, INTERESTS, traffic
from pipeline.identity import routing_key
from pipeline.processor import step
from pipeline.segments.definitions import load_segments, parse_segments

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_deadlines import baseline_module  # noqa: E402  (a sibling script, not a package)

DAY_MS = 86_400_000

TEMPLATES = [
    "orders_count >= {n}", "lifetime_value > {v}", "spend_30d > {v}", "orders_90d = 0 AND orders_count >= {n}",
    "category_affinity['{c}'] >= 0.{d}", "has(survey_interests, '{i}')", "nps <= {k}", "nps >= {k}",
    "page_views_count >= {n} AND cart_adds_count = 0", "top_category = '{c}' AND orders_365d >= {n}",
    "dateDiff('day', last_seen_at, now()) <= {n}", "email_opens_count >= {n}", "open_tickets_count >= 1",
    "sessions_count >= {n} AND preferred_channel = 'online'", "surveys_count >= 1 AND nps IS NULL",
]


def segments_yaml(count: int, seed: int = 1) -> str:
    rng = random.Random(seed)
    lines = ["segments:"]
    for i in range(count):
        where = rng.choice(TEMPLATES).format(n=rng.randint(1, 5), v=rng.randint(10, 900), c=rng.choice(CATEGORIES),
                                             d=rng.randint(1, 9), i=rng.choice(list(INTERESTS.values())),
                                             k=rng.randint(0, 10))
        lines += [f"  - id: s{i:04d}", f"    where: \"{where}\""]
    return "\n".join(lines) + "\n"


def stage_events(count: int, now_ms: int, days: int = 180, customers: int = 2000) -> list[tuple[str, Any]]:
    """(key, event) pairs decoded from generated traffic spanning ``days`` up to ``now_ms`` (as bench_profiles)."""
    out: list[tuple[str, Any]] = []
    for message in traffic(customers=customers, seed=9, start_ms=now_ms - days * DAY_MS - 60_000,
                           step_ms=days * DAY_MS // count, extended=True):
        event = decode(message.topic, message.value, now_ms=now_ms)
        if isinstance(event, DeadLetter):
            continue
        key = routing_key(customer_id=event.customer_id, loyalty_id=event.loyalty_id, email_hash=event.email_hash,
                          anonymous_id=event.anonymous_id)
        if key:
            out.append((key, event))
        if len(out) >= count:
            break
    return out


def compare_stage(rev: str, count: int, clock: str, segments_file: Path | None, chunk: int = 500) -> dict[str, Any]:
    """step + schedule per event, this tree against ``rev``, in turns; µs per event and answers that differ."""
    import pipeline.processor as current

    baseline = baseline_module(rev, "processor")
    trees: dict[str, tuple[ModuleType, Any]] = {
        f"baseline {rev}": (baseline, baseline_module(rev, "segments.definitions").load_segments(segments_file)),
        "current": (current, load_segments(segments_file)),
    }
    now0 = 1_790_000_000_000
    events = stage_events(count, now0)
    cpu = {name: {"step": 0.0, "schedule": 0.0} for name in trees}
    states: dict[str, dict[str, Any]] = {name: {} for name in trees}
    answers: dict[str, list[Any]] = {name: [] for name in trees}
    load_before = os.getloadavg()
    gc.disable()
    try:
        for turn, lo in enumerate(range(0, len(events), chunk)):
            order = list(trees.items()) if turn % 2 == 0 else list(trees.items())[::-1]
            for name, (processor, segments) in order:
                gc.collect()
                config, held, log, spent = processor.Config(), states[name], answers[name], cpu[name]
                for i in range(lo, min(lo + chunk, len(events))):
                    key, event = events[i]
                    now = event.occurred_at if clock == "event" else now0 + i
                    started = time.process_time()
                    result = processor.step(held.get(key), key, event, now, segments, config)
                    middle = time.process_time()
                    held[key] = result.state
                    due = None
                    if not result.duplicate:
                        due = processor.schedule(result.state, now, segments, config, row=result.evaluated)
                    spent["schedule"] += time.process_time() - middle
                    spent["step"] += middle - started
                    log.append((tuple((c.segment_id, c.change) for c in result.changes), due))
    finally:
        gc.enable()
    first, second = answers.values()
    rows = {name: {part: round(value / len(events) * 1e6, 1) for part, value in spent.items()}
            for name, spent in cpu.items()}
    for row in rows.values():
        row["both"] = round(row["step"] + row["schedule"], 1)
    return {"events": len(events), "clock": clock, "segments": str(segments_file or "default"), "us_per_event": rows,
            "differ": sum(a != b for a, b in zip(first, second, strict=True)),
            "load_before": load_before, "load_after": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "evaluation.json")
    parser.add_argument("--baseline", metavar="REV", help="compare the profile stage's loop with this git revision")
    parser.add_argument("--clock", choices=("event", "wall"), default="event")
    parser.add_argument("--segments-file", type=Path, default=Path(__file__).parent / "segments_50.yaml",
                        help="with --baseline: the segment set (default benchmarks/segments_50.yaml)")
    args = parser.parse_args()
    if args.baseline:
        found = compare_stage(args.baseline, args.events, args.clock, args.segments_file)
        print(f"{found['events']:,} events, {found['clock']} clock, {found['segments']}; CPU µs per event "
              f"(load average {found['load_before'][0]:.1f} -> {found['load_after'][0]:.1f})")
        print(f"{'variant':<22}{'step':>9}{'schedule':>10}{'both':>9}")
        for name, row in found["us_per_event"].items():
            print(f"{name:<22}{row['step']:>9}{row['schedule']:>10}{row['both']:>9}")
        base, current = found["us_per_event"].values()
        print(f"{'current / baseline':<22}{current['step'] / base['step']:>9.3f}"
              f"{current['schedule'] / base['schedule']:>10.3f}{current['both'] / base['both']:>9.3f}")
        print(f"events whose changes or next check differ: {found['differ']} of {found['events']:,}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.with_name(f"evaluation-vs-{args.baseline}-{args.clock}.json").write_text(json.dumps(found, indent=2))
        return
    now_ms = int(time.time() * 1000)
    events = []
    for message in traffic(customers=200, seed=5, start_ms=now_ms - 86_400_000 * 60, step_ms=1000):
        result = decode(message.topic, message.value, now_ms=now_ms)
        if not isinstance(result, DeadLetter):
            events.append(result)
        if len(events) >= args.events:
            break
    results = []
    for count in (10, 100, 1000):
        segments = parse_segments(segments_yaml(count))
        row = {"segments": count}
        for mode, incremental in (("full", False), ("incremental", True)):
            states: dict[str, object] = {}
            started = time.perf_counter()
            for event in events:
                key = event.customer_id or ""
                result = step(states.get(key), key, event, event.occurred_at, segments,  # type: ignore[arg-type]
                              incremental=incremental)
                states[key] = result.state
            row[f"{mode}_us_per_update"] = round((time.perf_counter() - started) / len(events) * 1e6, 1)
        row["speedup"] = round(row["full_us_per_update"] / row["incremental_us_per_update"], 2)
        results.append(row)
    print(f"{'segments':>9}{'full µs/update':>16}{'incremental µs/update':>23}{'speed-up':>10}")
    for r in results:
        print(f"{r['segments']:>9}{r['full_us_per_update']:>16}{r['incremental_us_per_update']:>23}{r['speedup']:>10}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"events": len(events), "results": results}, indent=2))


if __name__ == "__main__":
    main()
