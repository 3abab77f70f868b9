"""Child processes the product starts (the embedded broker, workers): stopping them for sure."""

from __future__ import annotations

import signal
import subprocess
from typing import Any


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
