"""Memory attribution of a running worker (issue 8, soak finding): debug only, off by default.

    PIPELINE_DEBUG_MEMORY=/tmp/mem.jsonl [PIPELINE_DEBUG_TRACEMALLOC=1] \\
        python -m pipeline.memdebug worker

runs ``pipeline worker`` unchanged, plus a daemon thread that appends one JSON object per
``PIPELINE_DEBUG_MEMORY_SECONDS`` (default 20) to the file: the process's resident memory split
into anonymous and file-backed pages (/proc), glibc's heap (``mallinfo2``: in use vs free but
kept), Python's allocated blocks, every RocksDB store's memtables, block cache and table readers
(RocksDB properties), and the chDB engine's own accounting (``system.metrics`` MemoryTracking,
mark and primary-index caches, parts). With ``PIPELINE_DEBUG_TRACEMALLOC=N`` (frames) it also
traces Python allocations and records the 15 source lines whose memory grew most since the
first sample. Tracing slows the worker several times: use it in its own run, not for figures.

Nothing here is imported by the product; it finds the worker's objects (the faust app, the chDB
clients) from the outside so that the worker runs exactly as in production.
"""

from __future__ import annotations

import ctypes
import gc
import json
import os
import re
import sys
import threading
import time
import tracemalloc
from pathlib import Path
from typing import Any

OUT_VAR = "PIPELINE_DEBUG_MEMORY"
TRACEMALLOC_VAR = "PIPELINE_DEBUG_TRACEMALLOC"
INTERVAL_VAR = "PIPELINE_DEBUG_MEMORY_SECONDS"
# experiment only: malloc_trim(0) after every sample, to measure how much of glibc's free-but-held
# memory the kernel gets back (RSS before and after are recorded)
TRIM_VAR = "PIPELINE_DEBUG_MALLOC_TRIM"

ROCKSDB_PROPERTIES = ("rocksdb.cur-size-all-mem-tables", "rocksdb.block-cache-usage",
                      "rocksdb.estimate-table-readers-mem", "rocksdb.estimate-num-keys",
                      "rocksdb.total-sst-files-size", "rocksdb.num-immutable-mem-table")
CHDB_METRICS = ("MemoryTracking", "MarkCacheBytes", "MarkCacheFiles", "PrimaryIndexCacheBytes",
                "PrimaryIndexCacheFiles", "UncompressedCacheBytes", "QueryCacheBytes", "PageCacheBytes",
                "MemoryTrackingUncorrected")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


def _proc_kib(path: str, names: tuple[str, ...]) -> dict[str, int]:
    out: dict[str, int] = {}
    try:
        with open(path) as handle:
            for line in handle:
                key, _, rest = line.partition(":")
                if key in names:
                    out[key] = int(rest.split()[0])
    except OSError:
        pass
    return out


def process_memory(pid: int | str = "self") -> dict[str, float]:
    """Resident memory in MiB: total, anonymous (heap, arenas, mmaps) and file-backed (code)."""
    status = _proc_kib(f"/proc/{pid}/status", ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"))
    return {f"{k}_mib": round(v / 1024, 1) for k, v in status.items()}


def _smaps_entries(pid: int | str = "self") -> list[tuple[int, int, str, str, int]]:
    """(start, end, perms, name, anonymous KiB) of every mapping in /proc/PID/smaps."""
    entries: list[tuple[int, int, str, str, int]] = []
    try:
        with open(f"/proc/{pid}/smaps") as handle:
            for line in handle:
                head = line.split(None, 1)[0]
                if "-" in head and not head.endswith(":"):  # a mapping's first line
                    fields = line.split()
                    start, end = (int(x, 16) for x in head.split("-"))
                    entries.append((start, end, fields[1], fields[5] if len(fields) > 5 else "", 0))
                elif head == "Anonymous:" and entries:
                    start, end, perms, name, _ = entries[-1]
                    entries[-1] = (start, end, perms, name, int(line.split()[1]))
    except OSError:
        return []
    return entries


GLIBC_HEAP_MAX = 64 * 1024 * 1024  # HEAP_MAX_SIZE of a glibc thread arena on 64-bit


def anonymous_mappings(pid: int | str = "self", top: int = 8) -> dict[str, Any]:
    """Resident anonymous memory (MiB) by kind of mapping, from /proc/PID/smaps: the brk heap (glibc's
    main arena), glibc thread arenas (a read-write mapping at a 64 MiB boundary followed by its
    PROT_NONE reserve up to 64 MiB: smaps shows the two parts as separate mappings, so classifying by
    size alone put every thread arena into "other"), and the rest (CPython's 1 MiB object arenas,
    large malloc blocks, the chDB engine's jemalloc extents: adjacent anonymous mappings with the same
    permissions are merged by the kernel, so these are not separable by size). ``top`` lists the
    largest other mappings by address: which of them grow over time is the most direct evidence."""
    entries = _smaps_entries(pid)
    if not entries:
        return {}
    out = {"heap_mib": 0.0, "thread_arenas_mib": 0.0, "other_anon_mib": 0.0, "thread_arenas": 0}
    others: list[tuple[int, int, int]] = []
    for i, (start, end, _perms, name, kib) in enumerate(entries):
        if not kib:
            continue
        if name == "[heap]":
            out["heap_mib"] += kib / 1024
            continue
        if name:
            continue  # stacks, files and named mappings are not allocator memory
        nxt = entries[i + 1] if i + 1 < len(entries) else None
        reserve_end = nxt[1] if nxt and nxt[0] == end and nxt[2].startswith("---") else end
        if start % GLIBC_HEAP_MAX == 0 and reserve_end - start == GLIBC_HEAP_MAX:
            out["thread_arenas_mib"] += kib / 1024
            out["thread_arenas"] += 1
        else:
            out["other_anon_mib"] += kib / 1024
            others.append((kib, start, end))
    result: dict[str, Any] = {k: round(v, 1) for k, v in out.items()}
    result["top_other"] = [{"at": hex(start), "size_mib": round((end - start) / 2**20, 1),
                            "anon_mib": round(kib / 1024, 1)} for kib, start, end in sorted(others, reverse=True)[:top]]
    return result


def glibc_heap() -> dict[str, float]:
    """glibc malloc (Python's large objects, RocksDB): bytes in use vs free but held, in MiB."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallinfo2.restype = _MallInfo2
        info = libc.mallinfo2()
    except (OSError, AttributeError):
        return {}
    mib = 1024 * 1024
    return {"malloc_in_use_mib": round(info.uordblks / mib, 1), "malloc_free_held_mib": round(info.fordblks / mib, 1),
            "malloc_mmapped_mib": round(info.hblkhd / mib, 1), "malloc_arena_mib": round(info.arena / mib, 1)}


def trim_heap() -> int:
    """``malloc_trim(0)``: give free heap pages back to the system (1 if some were released)."""
    try:
        return int(ctypes.CDLL("libc.so.6").malloc_trim(0))
    except (OSError, AttributeError):
        return 0


JEMALLOC_LINE = re.compile(r"Allocated: (\d+), active: (\d+), metadata: (\d+).*?resident: (\d+), mapped: (\d+), "
                           r"retained: (\d+)")


def jemalloc_summary(client: Any) -> dict[str, float]:
    """The chDB engine's allocator (ClickHouse's jemalloc, linked into chDB's library with its own
    symbols, not the process's malloc): allocated, active, metadata, resident, mapped and retained
    MiB from ``system.jemalloc_stats`` (malloc_stats_print). Resident is what it holds in RSS."""
    text = str(client.query("SELECT stats FROM system.jemalloc_stats").result_rows[0][0])
    match = JEMALLOC_LINE.search(text)
    if not match:
        return {}
    names = ("allocated", "active", "metadata", "resident", "mapped", "retained")
    return {f"jemalloc_{n}_mib": round(int(v) / 2**20, 1) for n, v in zip(names, match.groups(), strict=True)}


def _faust_apps() -> list[Any]:
    import faust

    return [o for o in gc.get_objects() if isinstance(o, faust.App)]


def rocksdb_memory(apps: list[Any]) -> dict[str, Any]:
    """Per table, the RocksDB properties summed over its partitions' databases."""
    out: dict[str, Any] = {}
    for app in apps:
        for name, table in list(app.tables.items()):
            dbs = getattr(table.data, "_dbs", None)
            if not dbs:
                continue
            sums = dict.fromkeys(ROCKSDB_PROPERTIES, 0)
            for db in list(dbs.values()):
                for prop in ROCKSDB_PROPERTIES:
                    try:
                        sums[prop] += int(db.property_int_value(prop) or 0)
                    except Exception:  # noqa: BLE001 - a database closed by a rebalance meanwhile
                        pass
            out[name] = {"dbs": len(dbs), **{p.removeprefix("rocksdb."): v for p, v in sums.items()}}
    return out


def chdb_memory() -> dict[str, Any]:
    """The chDB engine's own accounting, through the worker's shared client (its lock serializes
    this query with the sink's inserts)."""
    from pipeline.sinks import clickhouse

    clients = list(clickhouse._clients.values())  # noqa: SLF001 - the worker's own connections
    if not clients:
        return {}
    client = clients[0]
    names = ", ".join(f"'{m}'" for m in CHDB_METRICS)
    out: dict[str, Any] = {}
    # chDB in a child process of its own (pipeline/sinks/chdb_process.py): its memory, by mapping
    child = getattr(client, "pid", None)
    if isinstance(child, int):
        out["process"] = {"pid": child, **process_memory(child), **anonymous_mappings(child)}
    try:
        out.update(jemalloc_summary(client))
        out.update({k: int(v) for k, v in client.query(
            f"SELECT metric, value FROM system.metrics WHERE metric IN ({names})").result_rows})
        rows = client.query("SELECT count(), sum(rows), sum(primary_key_bytes_in_memory_allocated), "
                            "sum(bytes_on_disk) FROM system.parts WHERE active").result_rows
        out["active_parts"], out["part_rows"], out["primary_key_bytes"], out["bytes_on_disk"] = map(int, rows[0])
        out["parts_all"] = int(client.query("SELECT count() FROM system.parts").result_rows[0][0])
        out["user_query_log_rows"] = int(client.query("SELECT count() FROM system.user_query_log").result_rows[0][0])
    except Exception as exc:  # noqa: BLE001 - report, never break the worker
        out["error"] = str(exc)[:200]
    return out


class Sampler:
    def __init__(self, path: Path, interval: float, frames: int, trim: bool = False) -> None:
        self.trim = trim
        self.path = path
        self.interval = interval
        self.frames = frames
        self.started = time.time()
        self.baseline: tracemalloc.Snapshot | None = None
        self.apps: list[Any] = []

    def sample(self) -> dict[str, Any]:
        if not self.apps:
            self.apps = _faust_apps()
        row: dict[str, Any] = {"t_s": round(time.time() - self.started, 1), **process_memory(), **glibc_heap(),
                               **anonymous_mappings(), "python_blocks": sys.getallocatedblocks()}
        row["rocksdb"] = rocksdb_memory(self.apps)
        row["chdb"] = chdb_memory()
        if tracemalloc.is_tracing():
            current, peak = tracemalloc.get_traced_memory()
            row["traced_mib"] = round(current / 2**20, 1)
            snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
            if self.baseline is None:
                self.baseline = snapshot
            else:
                row["traced_growth"] = [
                    {"where": str(s.traceback).splitlines()[0] if s.traceback else "?",
                     "kib": round(s.size_diff / 1024, 1), "count": s.count_diff}
                    for s in snapshot.compare_to(self.baseline, "lineno")[:15]]
        if self.trim:
            row["trimmed"] = trim_heap()
            row["after_trim"] = {**process_memory(), **glibc_heap()}
        return row

    def run(self) -> None:
        while True:
            time.sleep(self.interval)
            try:
                row = self.sample()
            except Exception as exc:  # noqa: BLE001 - a debug aid must not take the worker down
                row = {"t_s": round(time.time() - self.started, 1), "error": repr(exc)[:300]}
            with open(self.path, "a") as handle:
                handle.write(json.dumps(row) + "\n")


def install() -> bool:
    """Start sampling if ``PIPELINE_DEBUG_MEMORY`` names a file; False (and nothing done) otherwise."""
    out = os.environ.get(OUT_VAR)
    if not out:
        return False
    frames = int(os.environ.get(TRACEMALLOC_VAR, "0") or 0)
    if frames > 0:
        tracemalloc.start(frames)
    sampler = Sampler(Path(out), float(os.environ.get(INTERVAL_VAR, "20") or 20), frames,
                      trim=os.environ.get(TRIM_VAR, "") not in ("", "0"))
    threading.Thread(target=sampler.run, name="memdebug", daemon=True).start()
    return True


if __name__ == "__main__":
    install()
    from pipeline.cli import main

    sys.argv = ["pipeline", *sys.argv[1:]]
    main()
