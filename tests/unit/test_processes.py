"""limit_malloc_arenas: glibc's thread arenas are capped in the process that calls it (issue 8, soak)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

# Eight threads each allocate through glibc's malloc (objects above CPython's 512-byte small-object
# limit) at the same time; then the process counts its glibc thread arenas from /proc/self/smaps.
SCRIPT = textwrap.dedent("""
    import sys, threading
    from pipeline.memdebug import anonymous_mappings
    from pipeline.processes import limit_malloc_arenas
    if sys.argv[1] == "limit":
        limit_malloc_arenas(2)
    barrier = threading.Barrier(8)
    def work():
        barrier.wait()
        keep = [bytes(2000) for _ in range(2000)]
        barrier.wait()
    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads: t.start()
    for t in threads: t.join()
    print(anonymous_mappings()["thread_arenas"])
""")


def thread_arenas(mode: str) -> int:
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], env=env, capture_output=True, text=True, timeout=60,
                         check=True)
    return int(out.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc arenas and /proc/self/smaps")
def test_arenas_are_capped() -> None:
    # with the cap: the main arena plus at most one thread arena; without it glibc makes one per
    # contending thread (the baseline shows that the script does make glibc create arenas)
    assert thread_arenas("limit") <= 1
    assert thread_arenas("default") >= 3


def test_explicit_setting_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.processes import limit_malloc_arenas

    monkeypatch.setenv("MALLOC_ARENA_MAX", "4")
    assert limit_malloc_arenas(2) is False
    assert os.environ["MALLOC_ARENA_MAX"] == "4"
