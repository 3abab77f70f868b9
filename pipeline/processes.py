"""Child processes the product starts (the embedded broker, workers): stopping them for sure."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
from typing import Any

M_ARENA_MAX = -8  # glibc's mallopt parameter


def stop_process(process: subprocess.Popen[Any], *, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
    """Ask the process to stop with ``sig``; SIGKILL it if it has not within ``timeout``."""
    if process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(timeout)


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas for this process and, through MALLOC_ARENA_MAX, its children (the
    chDB process). glibc gives every thread that allocates an arena of its own, up to 8 per core, and
    keeps each one's freed memory: in a 47-minute soak the worker's thread arenas held 5 MiB at 1 min
    and 18-31 MiB from 10 min on with the default; in two 8-minute soaks run side by side at the same
    rate, 13.2 MiB with the default and 6.9 with 2 arenas (benchmarks/README.md, Soak). Call before
    the process starts threads (glibc fixes the limit when the first thread arena is made). An
    explicit MALLOC_ARENA_MAX is left as set. False where glibc's mallopt is missing (musl, macOS)."""
    if "MALLOC_ARENA_MAX" in os.environ:
        return False  # glibc applied the operator's value at start
    os.environ["MALLOC_ARENA_MAX"] = str(arenas)
    try:
        return bool(ctypes.CDLL(None).mallopt(M_ARENA_MAX, arenas))
    except (OSError, AttributeError):
        return False
