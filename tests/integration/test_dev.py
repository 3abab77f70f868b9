"""`pipeline dev` (make run): live segment sizes on screen, a clean stop on Ctrl-C (SIGINT)."""

import os
import re
import signal
import subprocess
import sys
import time

from pipeline.processes import stop_process


def test_dev_shows_sizes_and_stops_cleanly(tmp_path):
    env = {**os.environ, "PIPELINE_DATA_DIR": str(tmp_path / "var"), "PIPELINE_STORE": "memory://",
           "PIPELINE_HTTP_PORT": "0",
           "COLUMNS": "120"}
    dev = subprocess.Popen([sys.executable, "-m", "pipeline", "dev", "--rate", "300"], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        _check(dev)
    finally:
        stop_process(dev, sig=signal.SIGINT, timeout=90)  # a failed check must not leave the stack running


def _check(dev):
    output = ""
    deadline = time.monotonic() + 120
    os.set_blocking(dev.stdout.fileno(), False)
    while time.monotonic() < deadline and not re.search(r" buyers=[1-9]", output):
        chunk = dev.stdout.read()
        output += (chunk or b"").decode("utf-8", "replace")
        assert dev.poll() is None, output[-3000:]
        time.sleep(0.5)
    assert re.search(r" buyers=[1-9]", output), output[-3000:]
    worker_pid = int(re.search(r"worker pid (\d+)", output).group(1))
    broker_port = re.search(r"broker 127\.0\.0\.1:(\d+)", output).group(1)
    dev.send_signal(signal.SIGINT)
    dev.wait(90)
    assert dev.returncode == 0
    assert not os.path.exists(f"/proc/{worker_pid}")
    leftovers = subprocess.run(["pgrep", "-f", f"tansu.*{broker_port}"], capture_output=True, text=True)
    assert leftovers.stdout.strip() == ""
