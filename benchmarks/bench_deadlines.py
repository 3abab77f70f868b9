"""Cost of ``next_check_at`` (pipeline/segments/deadlines.py) per call, as the worker pays it: once per
changed profile, right after the event is folded and evaluated (``processor.schedule``).

Realistic profiles: ``traffic(extended=True)`` (a few hundred customers, 60 days of event time ending an
hour before "now", as bench_pipeline.py produces it) through ``pipeline.decode.decode`` and
``pipeline.processor.step`` at a fixed wall-clock ``now``; after every event the profile is copied, and
``next_check_at(profile, segments, now)`` is then timed on every copy, with (a) the built-in segments
(pipeline/segments/default.yaml) and (b) the 50 benchmark segments (benchmarks/segments_50.yaml).
Prints µs per call (mean, p50, p99) and writes JSON.

``--baseline REV`` also times the ``deadlines.py`` of a git revision on the same calls (loaded from
``git show REV:pipeline/segments/deadlines.py`` as a separate module) and checks that both give the
same instant on every call.

    .venv/bin/python benchmarks/bench_deadlines.py [--customers 300] [--events 4000] [--baseline 2e8891d]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pipeline.decode import decode
from pipeline.events import DeadLetter
from pipeline.generate import traffic
from pipeline.identity import routing_key
from pipeline.processor import Config, step
from pipeline.profile import DAY_MS, ProfileState
from pipeline.segments import deadlines
from pipeline.segments.definitions import Segment, load_segments

HERE = Path(__file__).parent
SETS = {"default": None, "segments_50": HERE / "segments_50.yaml"}
NextCheck = Callable[..., int | None]


def profiles(customers: int, events: int, seed: int, now_ms: int) -> list[ProfileState]:
    """A copy of the changed profile after each event (what schedule() sees), oldest first."""
    step_ms = 60 * DAY_MS // events
    start_ms = now_ms - events * step_ms - 3_600_000
    states: dict[str, ProfileState] = {}
    snapshots: list[ProfileState] = []
    config = Config()
    for message in traffic(customers=customers, seed=seed, start_ms=start_ms, step_ms=step_ms, extended=True):
        if len(snapshots) >= events:
            break
        event = decode(message.topic, message.value, now_ms=now_ms)
        if isinstance(event, DeadLetter):
            continue
        key = routing_key(customer_id=event.customer_id, loyalty_id=event.loyalty_id, email_hash=event.email_hash,
                          anonymous_id=event.anonymous_id)
        if key is None:
            continue
        result = step(states.get(key), key, event, now_ms, [], config)
        if result.duplicate:
            continue
        states[key] = result.state
        snapshots.append(copy.deepcopy(result.state))
    return snapshots


def time_calls(fn: NextCheck, states: Sequence[ProfileState], segments: Sequence[Segment], now_ms: int,
               repeat: int) -> tuple[list[float], list[int | None]]:
    """µs per call (the best of ``repeat`` runs per call) and the answers."""
    config = Config()
    answers = [fn(s, segments, now_ms, half_life_days=config.half_life_days, sweep_ms=config.sweep_ms)
               for s in states]  # warm the plan caches
    best = [float("inf")] * len(states)
    clock = time.perf_counter_ns
    for _ in range(repeat):
        for i, state in enumerate(states):
            started = clock()
            fn(state, segments, now_ms, half_life_days=config.half_life_days, sweep_ms=config.sweep_ms)
            best[i] = min(best[i], (clock() - started) / 1000)
    return best, answers


def summary(us: list[float]) -> dict[str, float]:
    ordered = sorted(us)
    return {"mean": round(statistics.fmean(us), 1), "p50": round(ordered[len(ordered) // 2], 1),
            "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1)}


def load_revision(rev: str) -> NextCheck:
    text = subprocess.run(["git", "show", f"{rev}:pipeline/segments/deadlines.py"], cwd=HERE.parent, check=True,
                          capture_output=True, text=True).stdout
    path = Path(tempfile.mkdtemp()) / "deadlines_baseline.py"
    path.write_text(text)
    spec = importlib.util.spec_from_file_location("deadlines_baseline", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["deadlines_baseline"] = module
    spec.loader.exec_module(module)
    fn: NextCheck = module.next_check_at
    return fn


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--customers", type=int, default=300)
    parser.add_argument("--events", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=9)
    parser.add_argument("--repeat", type=int, default=3, help="runs per call; the fastest counts")
    parser.add_argument("--baseline", metavar="REV", help="also time deadlines.py as of this git revision")
    parser.add_argument("--now", type=int, default=1_790_000_000_000,
                        help="the wall clock of the run, epoch ms (fixed: the same profiles every run)")
    parser.add_argument("--out", type=Path, default=HERE / "results" / "deadlines.json")
    args = parser.parse_args()
    now_ms = args.now
    states = profiles(args.customers, args.events, args.seed, now_ms)
    variants: dict[str, NextCheck] = {}
    if args.baseline:
        variants[f"baseline {args.baseline}"] = load_revision(args.baseline)
    variants["current"] = deadlines.next_check_at
    results: list[dict[str, Any]] = []
    print(f"{len(states)} calls (profiles after each event, {args.customers} customers), best of {args.repeat}")
    print(f"{'segments':<13}{'variant':<22}{'mean µs':>10}{'p50 µs':>10}{'p99 µs':>10}")
    for name, path in SETS.items():
        segments = load_segments(path)
        answers: dict[str, list[int | None]] = {}
        for variant, fn in variants.items():
            us, answers[variant] = time_calls(fn, states, segments, now_ms, args.repeat)
            stats = summary(us)
            results.append({"segments": name, "variant": variant, "calls": len(states), **stats})
            print(f"{name:<13}{variant:<22}{stats['mean']:>10}{stats['p50']:>10}{stats['p99']:>10}")
        if len(answers) == 2:
            first, second = answers.values()
            differ = sum(a != b for a, b in zip(first, second, strict=True))
            print(f"{'':<13}answers that differ from the baseline: {differ} of {len(states)}")
            results[-1]["differ_from_baseline"] = differ
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"now_ms": now_ms, "results": results}, indent=2))


if __name__ == "__main__":
    main()
