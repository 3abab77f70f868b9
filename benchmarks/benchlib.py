"""Helpers shared by the benchmarks: CPU and memory of a process from /proc, the one-line result a
variant process prints when it is done, and the end markers that close a produced backlog.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from typing import Any

RESULT_PREFIX = "BENCH-RESULT "
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int | str = "self") -> float:
    """user + system CPU time of a process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as handle:
        text = handle.read()
    fields = text[text.rfind(")") + 2:].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / TICKS


def status_kib(field: str, pid: int | str = "self") -> int:
    """A ``kB`` line of /proc/<pid>/status (VmHWM: peak RSS, VmRSS: current)."""
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class Window:
    """The measured window of a variant process: wall time and own CPU at its first message and at the end."""

    def __init__(self) -> None:
        self.first_at: float | None = None
        self.first_cpu = 0.0
        self.end_at: float | None = None
        self.end_cpu = 0.0
        self.started_at = time.time()

    def first(self) -> None:
        if self.first_at is None:
            self.first_at = time.time()
            self.first_cpu = cpu_seconds()

    def end(self) -> None:
        self.end_at = time.time()
        self.end_cpu = cpu_seconds()

    def result(self, events: int, **extra: Any) -> dict[str, Any]:
        assert self.first_at is not None and self.end_at is not None
        seconds = self.end_at - self.first_at
        return {"events": events, "first_at": self.first_at, "end_at": self.end_at, "seconds": seconds,
                "events_per_s": events / seconds if seconds > 0 else None,
                "cpu_s": self.end_cpu - self.first_cpu, "cpu_total_s": cpu_seconds(),
                "startup_s": self.first_at - self.started_at, "peak_rss_kib": status_kib("VmHWM"), **extra}


def report(result: dict[str, Any]) -> None:
    """Print the variant's result as one line the driver picks out of stdout."""
    sys.stdout.write(RESULT_PREFIX + json.dumps(result) + "\n")
    sys.stdout.flush()


def send_end_markers(producer: Any, topic_of: Callable[[str], str], run_id: str, watermark: int,
                     partitions: int) -> Any:
    """One end marker (pipeline.control) into every partition of every input topic, after what the
    producer sent before; flushes and closes the producer. Returns the marker."""
    from pipeline.broker import topics as t
    from pipeline.control import Marker

    marker = Marker(run_id, watermark, len(t.INPUTS) * partitions, partitions)
    for source in t.INPUTS:
        for partition in range(partitions):
            producer.send(topic_of(source), value=marker.encode(), partition=partition, headers=marker.headers())
    producer.flush()
    producer.close()
    return marker
