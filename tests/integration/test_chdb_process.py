"""Embedded ClickHouse in a child process (pipeline/sinks/chdb_process.py), with real chDB.

Each test owns its data path and its child: with chDB out of the test process, one process can
hold several paths. Every child started here is closed (or killed) before the test ends.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from clickhouse_connect.driver.exceptions import DatabaseError, OperationalError, ProgrammingError

from pipeline.sinks.chdb_process import ChdbProcessClient
from pipeline.sinks.clickhouse import ClickHouseWriter, connect, migrate

WAIT_S = 60.0  # a bound on waiting for a process to go, not a timing claim


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def _wait_gone(pid: int) -> bool:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if not _alive(pid):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture
def client(tmp_path: Path):
    proxy = ChdbProcessClient({"dsn": f"chdb://{tmp_path / 'ch'}"})
    yield proxy
    pid = proxy.pid
    proxy.close()
    assert pid is None or _wait_gone(pid)


def test_insert_query_command_round_trip(client: ChdbProcessClient):
    assert client.pid is not None and client.pid != os.getpid() and _alive(client.pid)
    client.command("CREATE DATABASE IF NOT EXISTS t")
    client.command("CREATE TABLE t.x (id UInt32, name String, at DateTime64(3, 'UTC'), tags Array(String)) "
                   "ENGINE = MergeTree ORDER BY id")
    summary = client.insert("t.x", [[1, 2], ["a", "b"], [1_000, 2_000], [["p"], []]],
                            column_names=["id", "name", "at", "tags"],
                            column_type_names=["UInt32", "String", "DateTime64(3, 'UTC')", "Array(String)"],
                            column_oriented=True)
    assert summary.written_rows == 2
    client.insert("t.x", [[3, "c", datetime(2026, 1, 1, tzinfo=UTC), ["q", "r"]]],
                  column_names=["id", "name", "at", "tags"])
    result = client.query("SELECT id, name, at, tags FROM t.x WHERE id >= %(low)s ORDER BY id",
                          parameters={"low": 1}, tz_mode="aware")
    assert result.column_names == ("id", "name", "at", "tags")
    assert [t.name for t in result.column_types] == ["UInt32", "String", "DateTime64(3, 'UTC')", "Array(String)"]
    assert result.result_rows == [(1, "a", datetime(1970, 1, 1, 0, 0, 1, tzinfo=UTC), ["p"]),
                                  (2, "b", datetime(1970, 1, 1, 0, 0, 2, tzinfo=UTC), []),
                                  (3, "c", datetime(2026, 1, 1, tzinfo=UTC), ["q", "r"])]
    columns = client.query("SELECT id, name FROM t.x ORDER BY id").result_columns
    assert [list(c) for c in columns] == [[1, 2, 3], ["a", "b", "c"]]
    assert list(client.query("SELECT id FROM t.x WHERE id = 2").named_results()) == [{"id": 2}]
    assert client.query("SELECT id FROM t.x WHERE id > 10").result_rows == []
    assert client.command("SELECT count() FROM t.x") == 3
    client.set_client_setting("max_threads", 1)
    assert client.get_client_setting("max_threads") == "1"


def test_errors_come_back_as_clickhouse_connect_exceptions(client: ChdbProcessClient):
    with pytest.raises(DatabaseError) as raised:
        client.query("SELECT no_such_column")
    assert raised.value.code == 47 and "no_such_column" in str(raised.value)
    with pytest.raises(DatabaseError):
        client.command("INSERT INTO no_such_db.t VALUES (1)")
    assert client.command("SELECT 1") == 1  # the child serves on after an error


def test_a_call_interrupted_before_its_reply_does_not_shift_the_replies(client: ChdbProcessClient):
    """A timeout or Ctrl-C while waiting for a reply: that reply must not answer the next call."""
    class Interrupted(Exception):
        pass

    def interrupt(signum: int, frame: object) -> None:
        raise Interrupted

    previous = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.5)
        with pytest.raises(Interrupted):
            client.query("SELECT sleep(3)")
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    assert client.command("SELECT 42") == 42
    assert client.query("SELECT 'next'").result_rows == [("next",)]


def test_the_product_writer_and_migrations_through_the_child(tmp_path: Path):
    dsn = f"chdb://{tmp_path / 'ch'}"
    proxy = connect(dsn, process=True)
    try:
        assert isinstance(proxy, ChdbProcessClient) and connect(dsn) is proxy
        writer = ClickHouseWriter(dsn, "segments")
        assert writer.client is proxy
        assert migrate(proxy, "segments") == []  # applied by writer.client already
        at = 1_767_268_800_000
        writer.write(changes=[{"customer_id": "c1", "segment_id": "vip", "change": "entered", "changed_at": at,
                               "profile_version": 1, "cause": "e1"}])
        writer.delete_customers(["nobody"], until_ms=at, tables=["segment_membership"])
        rows = proxy.query("SELECT customer_id, since FROM segments.segment_membership FINAL "
                           "WHERE is_member = 1", tz_mode="aware").result_rows
        assert rows == [("c1", datetime(2026, 1, 1, 12, tzinfo=UTC))]
    finally:
        proxy.close()


def test_a_killed_child_is_replaced_on_the_next_call(client: ChdbProcessClient):
    client.command("CREATE TABLE default.kept (n UInt8) ENGINE = MergeTree ORDER BY n")
    client.insert("default.kept", [[7]], column_names=["n"])
    first = client.pid
    assert first is not None
    os.kill(first, signal.SIGKILL)
    assert _wait_gone(first)
    with pytest.raises(OperationalError, match="child process is gone"):
        client.command("SELECT 1")
    assert client.command("SELECT sum(n) FROM default.kept") == 7  # a new child on the same data
    assert client.pid not in (None, first)


def test_a_new_child_waits_for_the_old_owner_of_the_path(tmp_path: Path):
    """A worker killed and restarted at once: its old child may still hold the data path."""
    options = {"dsn": f"chdb://{tmp_path / 'ch'}"}
    old = ChdbProcessClient(options)
    with pytest.raises(ProgrammingError, match="Unable to open the chdb engine"):  # no wait by default
        ChdbProcessClient(options)
    started: list[ChdbProcessClient] = []
    opener = threading.Thread(target=lambda: started.append(ChdbProcessClient(options, lock_wait_s=WAIT_S)))
    opener.start()
    time.sleep(2.0)  # let the new child find the path locked (not a timing assertion)
    old.close()
    opener.join(WAIT_S)
    assert started, "the new child never opened the path"
    try:
        assert started[0].command("SELECT 1") == 1
    finally:
        started[0].close()


def test_several_data_paths_in_one_process(tmp_path: Path):
    one, two = (ChdbProcessClient({"dsn": f"chdb://{tmp_path / name}"}) for name in ("a", "b"))
    try:
        one.command("CREATE TABLE default.only_here (n UInt8) ENGINE = MergeTree ORDER BY n")
        assert one.command("EXISTS TABLE default.only_here") == 1
        assert two.command("EXISTS TABLE default.only_here") == 0
    finally:
        one.close()
        two.close()


PARENT = textwrap.dedent("""
    import json, sys, time
    from pipeline.sinks.clickhouse import connect
    client = connect(sys.argv[1])
    print(json.dumps({"child": getattr(client, "pid", None), "type": type(client).__name__}), flush=True)
    if sys.argv[2] == "wait":
        time.sleep(600)
""")


def _parent(dsn: str, mode: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-c", PARENT, dsn, mode], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, **env})


def test_the_child_exits_when_its_parent_is_killed(tmp_path: Path):
    parent = _parent(f"chdb://{tmp_path / 'ch'}", "wait")
    try:
        assert parent.stdout is not None
        child = json.loads(parent.stdout.readline())["child"]
        assert _alive(child)
        parent.kill()
        parent.wait(WAIT_S)
        assert _wait_gone(child), "the chDB child outlived its SIGKILLed parent"
    finally:
        parent.kill()
        parent.wait(WAIT_S)


def test_the_child_exits_with_its_parent_and_the_setting_turns_it_off(tmp_path: Path):
    parent = _parent(f"chdb://{tmp_path / 'ch'}", "exit")
    out, _ = parent.communicate(timeout=WAIT_S * 2)
    shown = json.loads(out.splitlines()[0])
    assert parent.returncode == 0 and shown["type"] == "ChdbProcessClient"
    assert _wait_gone(shown["child"])
    inside = _parent(f"chdb://{tmp_path / 'ch2'}", "exit", PIPELINE_CLICKHOUSE_PROCESS="false")
    out, _ = inside.communicate(timeout=WAIT_S * 2)
    assert inside.returncode == 0 and json.loads(out.splitlines()[0]) == {"child": None, "type": "ChdbClient"}
