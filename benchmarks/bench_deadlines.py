"""Cost of ``next_check_at`` (pipeline/segments/deadlines.py) per call, as the worker pays it: once per
changed profile, right after the event is folded and evaluated (``processor.schedule``).

Realistic profiles: ``traffic(extended=True)`` (a few hundred customers, 60 days of event time ending an
hour before "now", as bench_pipeline.py produces it) through ``pipeline.decode.decode`` and
``pipeline.processor.step`` at a fixed wall-clock ``now``; after every event the profile is copied, and
``next_check_at(profile, segments, now)`` is then timed on every copy, with (a) the built-in segments
(pipeline/segments/default.yaml) and (b) the 50 benchmark segments (benchmarks/segments_50.yaml).
Prints µs per call (mean, p50, p99) and writes JSON.

``--baseline REV`` also times the ``next_check_at`` of a git revision on the same calls (the whole
``pipeline`` package of that revision, exported with ``git archive`` into a temporary directory as a
package of another name, so its compiler comes with it) and checks that both give the same instant on
every call.

    .venv/bin/python benchmarks/bench_deadlines.py [--customers 300] [--events 4000] [--baseline 2e8891d]
"""

from __future__ import annotations

import argparse
import atexit
import copy
import importlib
import io
import json
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import ModuleType
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


def time_calls(variants: dict[str, tuple[NextCheck, Sequence[Segment]]], states: Sequence[ProfileState],
               now_ms: int, repeat: int) -> dict[str, tuple[list[float], list[int | None]]]:
    """Per variant (a function and its segments): µs per call (the best of ``repeat`` runs per call) and
    the answers. The variants take turns call by call, so a change of the machine's load hits them alike."""
    config = Config()
    answers = {name: [fn(s, segments, now_ms, half_life_days=config.half_life_days, sweep_ms=config.sweep_ms)
                      for s in states] for name, (fn, segments) in variants.items()}  # warm the plan caches
    best = {name: [float("inf")] * len(states) for name in variants}
    clock = time.perf_counter_ns
    for _ in range(repeat):
        for i, state in enumerate(states):
            for name, (fn, segments) in variants.items():
                started = clock()
                fn(state, segments, now_ms, half_life_days=config.half_life_days, sweep_ms=config.sweep_ms)
                best[name][i] = min(best[name][i], (clock() - started) / 1000)
    return {name: (best[name], answers[name]) for name in variants}


def summary(us: list[float]) -> dict[str, float]:
    ordered = sorted(us)
    return {"mean": round(statistics.fmean(us), 1), "p50": round(ordered[len(ordered) // 2], 1),
            "p99": round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))], 1)}


def load_package(rev: str) -> str:
    """Import the ``pipeline`` package as of git revision ``rev`` next to the current one: exported into a
    temporary directory (removed at exit) as ``pipeline_<rev>``, its absolute imports renamed to match.
    Returns the package name. Its objects are duck-typed alike (profiles, events, segments of either tree
    work with the other's functions where the fields are the same)."""
    name = "pipeline_" + re.sub(r"\W", "_", rev)
    if name in sys.modules:
        return name
    archive = subprocess.run(["git", "archive", rev, "pipeline"], cwd=HERE.parent, check=True,
                             capture_output=True).stdout
    root = Path(tempfile.mkdtemp(prefix="bench-baseline-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root, filter="data")
    (root / "pipeline").rename(root / name)
    for path in (root / name).rglob("*.py"):
        text = path.read_text()
        text = re.sub(r"\bfrom pipeline([. ])", rf"from {name}\1", text)
        text = re.sub(r"\bimport pipeline\b", f"import {name}", text)
        path.write_text(text.replace('"pipeline.', f'"{name}.'))
    (root / "schemas").symlink_to(HERE.parent / "schemas")  # the package finds its schemas next to itself
    sys.path.insert(0, str(root))
    importlib.import_module(name)
    return name


def baseline_module(rev: str, module: str) -> ModuleType:
    """``module`` (e.g. "processor", "segments.deadlines") of the ``pipeline`` package at ``rev``."""
    return importlib.import_module(f"{load_package(rev)}.{module}")


def load_revision(rev: str) -> NextCheck:
    fn: NextCheck = baseline_module(rev, "segments.deadlines").next_check_at
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
        # each tree evaluates its own compiled segments (the baseline's compiler is its own)
        own = {variant: (baseline_module(args.baseline, "segments.definitions").load_segments(path)
                         if variant.startswith("baseline") else segments) for variant in variants}
        answers: dict[str, list[int | None]] = {}
        timed = time_calls({variant: (fn, own[variant]) for variant, fn in variants.items()}, states, now_ms,
                           args.repeat)
        for variant, (us, answers[variant]) in timed.items():
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
