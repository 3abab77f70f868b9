"""Embedded ClickHouse (chDB) in a child process, behind a proxy with the client methods we use.

Why: in the worker, clickhouse-connect serializes every insert in Python, holding the GIL, in
the writer's thread (about a tenth of the worker's py-spy samples, issue 9), and chDB's native
memory is counted in the worker's RSS with nothing to tell it apart (issue 8). Here chDB and
that serialization run in a child process: the worker only pickles the columns it already built
and waits on a pipe (no GIL held while it waits), and the child's RSS is chDB's.

The child is a fresh interpreter (``python -m pipeline.sinks.chdb_process``: no copy of the
parent's threads, RocksDB or broker sockets, and unlike multiprocessing's spawn no re-import of
the parent's main script), owns the one chDB engine of its data path, and serves ``query``,
``command``, ``insert`` and the client settings one request at a time over a socket pair wrapped
in a ``multiprocessing.connection.Connection`` (pickled arguments and results).
Results come back as clickhouse-connect's own objects (``QueryResult`` rebuilt from the
child's column blocks, ``QuerySummary``); errors as the exceptions clickhouse-connect raised
(``DatabaseError`` with its ``code`` and ``name``, ...). The child exits on ``close()``, when
the pipe reaches end of file (its parent died, even by SIGKILL) and, as a backstop, when it
is re-parented. It ignores SIGINT and SIGTERM: a Ctrl-C or a stop signal sent to the whole
process group must not take ClickHouse away from a worker that is still flushing its last
batch; the worker's exit closes it.
"""

from __future__ import annotations

import atexit
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import weakref
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

START_TIMEOUT_S = 120.0  # importing and starting chDB takes 1-3 s; a cold, loaded machine much more
ORPHAN_GRACE_S = 10.0  # a re-parented child finishing a request gets this long before it is ended
_PROTOCOL = pickle.HIGHEST_PROTOCOL
_SOURCE_ROOT = str(Path(__file__).resolve().parents[2])  # the directory holding the pipeline package

_live: weakref.WeakSet[ChdbProcessClient] = weakref.WeakSet()


def _child_lost(detail: str) -> Exception:
    from clickhouse_connect.driver.exceptions import OperationalError

    return OperationalError(f"the chDB child process is gone ({detail})")


class ChdbProcessClient:
    """A clickhouse-connect client for a ``chdb://`` DSN whose engine runs in a child process.

    Thread-safe: one request at a time (a lock), as chDB's own handle serializes them anyway.
    If the child dies (killed, out of memory), the call in flight raises ``OperationalError``
    and the next call starts a new child: callers that retry (the worker's writer) recover.
    """

    def __init__(self, options: dict[str, Any], *, lock_wait_s: float = 0.0) -> None:
        """``options``: clickhouse_connect.get_client's arguments (``dsn``, ...), used in the child.
        ``lock_wait_s``: how long the child retries while another process holds the data path
        (0: fail at once, as an in-process engine would)."""
        self.options = dict(options)
        self.lock_wait_s = lock_wait_s
        self.dsn = str(options.get("dsn", ""))
        self._lock = threading.Lock()
        self._conn: Connection | None = None
        self._process: Any = None
        self._owner = 0
        self._settings: dict[str, Any] = {}  # replayed on a new child
        with self._lock:
            self._start()
        _live.add(self)

    # --- the client surface the code base uses ------------------------------------------------

    def query(self, query: str | None = None, parameters: Any = None, settings: dict[str, Any] | None = None,
              **kwargs: Any) -> Any:
        """As ``Client.query``: a ``QueryResult`` (its rows read in the child, in blocks)."""
        from clickhouse_connect.datatypes.registry import get_from_name
        from clickhouse_connect.driver.query import QueryResult

        names, type_names, oriented, summary, query_id, blocks = self._call(
            "query", (query,), {"parameters": parameters, "settings": settings, **kwargs})
        return QueryResult(block_gen=(block for block in blocks), column_names=names,
                           column_types=tuple(get_from_name(n) for n in type_names), column_oriented=oriented,
                           query_id=query_id, summary=summary)

    def command(self, cmd: str, parameters: Any = None, data: Any = None, settings: dict[str, Any] | None = None,
                **kwargs: Any) -> Any:
        """As ``Client.command``: the value, or a ``QuerySummary``."""
        return self._call("command", (cmd,), {"parameters": parameters, "data": data, "settings": settings,
                                              **kwargs})

    def insert(self, table: str | None = None, data: Any = None, **kwargs: Any) -> Any:
        """As ``Client.insert`` (``column_names``, ``column_type_names``, ``column_oriented``, ...):
        the data is pickled here and serialized for ClickHouse in the child."""
        return self._call("insert", (table, data), kwargs)

    def set_client_setting(self, key: str, value: Any) -> None:
        self._call("set_client_setting", (key, value), {})
        self._settings[key] = value

    def get_client_setting(self, key: str) -> Any:
        return self._call("get_client_setting", (key,), {})

    @property
    def pid(self) -> int | None:
        """The child's process id (its RSS is chDB's memory), None before it starts."""
        return None if self._process is None else self._process.pid

    def close(self) -> None:
        """Stop the child (it closes chDB first); idempotent."""
        with self._lock:
            self._stop()
        _live.discard(self)

    # --- the child's lifetime -------------------------------------------------------------------

    def _start(self) -> None:
        parent, child = socket.socketpair()
        env = dict(os.environ)
        # the same pipeline code as this process, wherever it was imported from
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [_SOURCE_ROOT, env.get("PYTHONPATH")]))
        try:
            process = subprocess.Popen(
                [sys.executable, "-m", __name__, str(child.fileno()), str(os.getpid())], pass_fds=[child.fileno()],
                stdin=subprocess.DEVNULL, env=env)
        finally:
            child.close()  # only the child holds its end: its death reads as end of file here
        conn = Connection(parent.detach())
        try:
            conn.send_bytes(pickle.dumps((self.options, self.lock_wait_s), protocol=_PROTOCOL))
            if not conn.poll(START_TIMEOUT_S):
                raise _child_lost(f"no answer within {START_TIMEOUT_S:.0f} s of its start")
            ok, value = pickle.loads(conn.recv_bytes())
        except BaseException as exc:
            conn.close()
            _reap(process, 5)
            if isinstance(exc, (EOFError, OSError)):
                raise _child_lost(f"exited at start, code {process.returncode}") from exc
            raise
        if not ok:
            conn.close()
            _reap(process, 5)
            raise value
        self._conn, self._process, self._owner = conn, process, os.getpid()
        log.info("chDB for %s runs in child process %s", self.dsn, process.pid)
        for key, setting in self._settings.items():
            self._request("set_client_setting", (key, setting), {})

    def _stop(self) -> None:
        conn, process = self._conn, self._process
        self._conn = self._process = None
        if conn is None or self._owner != os.getpid():
            return  # a forked copy: the child belongs to the process that started it
        try:
            conn.send_bytes(pickle.dumps(("close", (), {}), protocol=_PROTOCOL))
            conn.recv_bytes()
        except (EOFError, OSError):
            pass
        conn.close()
        if not _reap(process, 30):
            log.warning("chDB child process %s did not stop within 30 s: killed", process.pid)

    def _call(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        with self._lock:
            if self._conn is None or self._owner != os.getpid():
                self._conn = self._process = None
                self._start()
            return self._request(method, args, kwargs)

    def _request(self, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        assert self._conn is not None and self._process is not None
        payload = pickle.dumps((method, args, kwargs), protocol=_PROTOCOL)
        try:
            self._conn.send_bytes(payload)
            data = self._conn.recv_bytes()
        except (EOFError, OSError) as exc:
            process, self._conn, self._process = self._process, None, None
            _reap(process, 5)
            raise _child_lost(f"exit code {process.returncode}; a new one starts on the next call") from exc
        except BaseException:
            # interrupted between the request and its reply (a timeout, Ctrl-C): that reply would
            # answer the next request. This child is dropped (it sees the end of file and exits,
            # or is killed if busy) and the next call starts a new one.
            conn, process, self._conn, self._process = self._conn, self._process, None, None
            conn.close()
            _reap(process, 5)
            raise
        ok, value = pickle.loads(data)
        if not ok:
            raise value
        return value


def _reap(process: subprocess.Popen[bytes], timeout: float) -> bool:
    """Wait for the child to exit; kill it after ``timeout`` (False then)."""
    try:
        process.wait(timeout)
        return True
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return False


@atexit.register
def _close_all() -> None:
    """Close the children at exit, so that chDB closes its files cleanly (a process that dies
    otherwise still ends them: they see the end of file)."""
    for client in list(_live):
        try:
            client.close()
        except Exception:  # noqa: BLE001 - exiting anyway
            log.debug("closing a chDB child failed", exc_info=True)


# --- the child ------------------------------------------------------------------------------------

def main(argv: list[str]) -> None:
    """``python -m pipeline.sinks.chdb_process FD PARENT_PID``: serve on the socket FD."""
    fd, parent_pid = int(argv[0]), int(argv[1])
    serve(Connection(fd), parent_pid)


def serve(conn: Connection, parent_pid: int) -> None:
    """The child's main loop: read the client's options, open chDB, answer requests until
    ``close`` or end of file."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Thread(target=_watch_parent, args=(parent_pid,), daemon=True, name="parent-watch").start()
    try:
        options, lock_wait_s = pickle.loads(conn.recv_bytes())
        client = _open(options, lock_wait_s)
    except (EOFError, OSError):
        return  # the parent is gone already
    except Exception as exc:  # noqa: BLE001 - reported to the parent, which raises it
        conn.send_bytes(_error(exc))
        return
    conn.send_bytes(pickle.dumps((True, os.getpid()), protocol=_PROTOCOL))
    try:
        while True:
            try:
                method, args, kwargs = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                return  # the parent is gone
            if method == "close":
                client.close()
                client = None
                conn.send_bytes(pickle.dumps((True, None), protocol=_PROTOCOL))
                return
            try:
                reply = pickle.dumps((True, _handle(client, method, args, kwargs)), protocol=_PROTOCOL)
            except Exception as exc:  # noqa: BLE001 - every error goes back to the caller
                reply = _error(exc)
            try:
                conn.send_bytes(reply)
            except OSError:
                return  # the parent is gone or dropped this child
    finally:
        if client is not None:
            client.close()


def _open(options: dict[str, Any], lock_wait_s: float) -> Any:
    """The chDB client; waits up to ``lock_wait_s`` while another process still holds the data
    path (a worker killed and restarted at once: its old child finishes the request in hand
    before it sees the end of file). chDB's error then names no cause (BAD_ARGUMENTS; the lock
    is only printed on stderr), so the lock is tested here, on the file ClickHouse locks."""
    import clickhouse_connect

    status = Path(str(options.get("dsn", ""))[len("chdb://"):].split("?")[0]) / "status"
    deadline = time.monotonic() + lock_wait_s
    while True:
        if time.monotonic() < deadline and _locked(status):
            time.sleep(0.2)
            continue
        try:
            return clickhouse_connect.get_client(**options)
        except Exception:
            if time.monotonic() >= deadline or not _locked(status):
                raise
            time.sleep(0.2)


def _locked(status: Path) -> bool:
    """Whether another process holds ClickHouse's lock on ``status`` (an flock)."""
    import fcntl

    try:
        fd = os.open(status, os.O_RDWR)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def _handle(client: Any, method: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if method == "query":
        result = client.query(*args, **kwargs)
        with result.column_block_stream as stream:
            blocks = list(stream)
        return (result.column_names, tuple(t.name for t in result.column_types), result.column_oriented,
                result.summary, result.query_id, blocks)
    if method in ("command", "insert", "set_client_setting", "get_client_setting"):
        return getattr(client, method)(*args, **kwargs)
    raise AttributeError(f"the chDB child does not serve {method!r}")


def _error(exc: BaseException) -> bytes:
    """The exception as raised, pickled (clickhouse-connect's keep their code and name), with
    the child's traceback as a note; an exception that does not pickle becomes an
    OperationalError carrying its type and message."""
    try:
        exc.add_note("in the chDB child process " + str(os.getpid()) + ":\n" + "".join(
            traceback.format_exception(exc)).rstrip())
        data = pickle.dumps((False, exc), protocol=_PROTOCOL)
        pickle.loads(data)
        return data
    except Exception:  # noqa: BLE001 - unpicklable: a stand-in with the same message
        from clickhouse_connect.driver.exceptions import OperationalError

        return pickle.dumps((False, OperationalError(f"{type(exc).__name__}: {exc}")), protocol=_PROTOCOL)


def _watch_parent(parent_pid: int) -> None:
    """Backstop for the pipe's end of file: a child whose parent is gone (re-parented) while it
    is busy with a long request ends after a grace period."""
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    time.sleep(ORPHAN_GRACE_S)
    os._exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
