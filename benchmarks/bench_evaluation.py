"""Cost of one profile update (fold + segment evaluation + diff) with 10, 100 and 1,000 segments
defined, evaluating every segment against only those the event can affect (incremental), in one
run, on the same events. Prints a table and writes JSON.

    .venv/bin/python benchmarks/bench_evaluation.py [--events 3000]
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

from pipeline.decode import decode
from pipeline.events import DeadLetter
from pipeline.generate import CATEGORIES, INTERESTS, traffic
from pipeline.processor import step
from pipeline.segments.definitions import parse_segments

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--events", type=int, default=3000)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "evaluation.json")
    args = parser.parse_args()
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
