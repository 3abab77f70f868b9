"""The worker's web dashboard (issue 7 item 3), loaded by a real headless Chromium.

A real worker on the session broker gets purchases, a refund and two malformed messages through
Kafka; once ClickHouse has them, Chromium loads ``/dashboard?token=...`` from the worker, runs its
script (which fetches ``/dashboard/data`` with the bearer header) and dumps the DOM; the numbers
on the page are compared with ClickHouse's own answers, asked independently: through the worker's
``/segments`` and ``/cohorts`` routes while it runs, and with ``pipeline sql`` on its data directory
after it stops (one process holds a chDB data directory at a time). A screenshot is saved under the
test's tmp_path and copied to ``benchmarks/results/dashboard.png``.

Chromium comes from Debian's ``chromium`` and ``chromium-driver`` packages: ``.ci/run`` installs
them, and ``chromium_binary`` does when they are missing and it can (root and apt-get), else the
browser test is skipped with the reason.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from pathlib import Path

import pytest
from kafka import KafkaProducer

from pipeline.api import dashboard_data
from pipeline.sinks.clickhouse import ClickHouseWriter
from tests.integration.workers import http_get, running_worker, worker_log

ROOT = Path(__file__).resolve().parents[2]
SCREENSHOT_COPY = ROOT / "benchmarks" / "results" / "dashboard.png"
CHROMIUM_PACKAGES = ("chromium", "chromium-driver")
TOKEN = "dashboard-t0ken-for-tests"
SEGMENTS = """segments:
  - id: buyers
    where: orders_count >= 1
  - id: big_buyers
    where: lifetime_value > 100
  - id: repeat_buyers
    where: orders_count >= 2
  - id: whales
    where: lifetime_value > 100000
"""


# --- Chromium -------------------------------------------------------------------------------------

def chromium_binary() -> str:
    """The path of Debian's ``chromium``, installed with apt-get when missing (CI runs as root with
    access to Debian's package registry); skips the test when that is impossible."""
    found = shutil.which("chromium")
    if found:
        return found
    if shutil.which("apt-get") is None:
        pytest.skip("Chromium is not installed and this machine has no apt-get to install Debian's "
                    f"{' and '.join(CHROMIUM_PACKAGES)} packages")
    if os.geteuid() != 0:
        pytest.skip("Chromium is not installed and installing Debian's chromium packages needs root: "
                    f"run `apt-get install -y {' '.join(CHROMIUM_PACKAGES)}` as root")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update"], ["apt-get", "install", "-y", *CHROMIUM_PACKAGES]):
        try:
            result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1200)
        except subprocess.TimeoutExpired:
            pytest.skip(f"Chromium could not be installed: `{' '.join(command)}` took more than 20 minutes")
        if result.returncode != 0:
            pytest.skip(f"Chromium could not be installed: `{' '.join(command)}` exited {result.returncode}: "
                        f"{(result.stderr or result.stdout)[-800:]}")
    found = shutil.which("chromium")
    if not found:
        pytest.skip("apt-get installed the chromium packages but there is no `chromium` on PATH")
    return found


@pytest.fixture(scope="session")
def chromium():
    return chromium_binary()


def run_chromium(binary: str, profile: Path, url: str, *args: str) -> subprocess.CompletedProcess:
    """Headless Chromium on ``url``; ``--virtual-time-budget`` lets the page's script run (and its
    fetches complete) before the DOM is dumped or the screenshot taken."""
    command = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--no-first-run", "--no-default-browser-check", f"--user-data-dir={profile}",
               "--virtual-time-budget=10000", *args, url]
    result = subprocess.run(command, capture_output=True, timeout=180)
    assert result.returncode == 0, result.stderr.decode(errors="replace")[-3000:]
    return result


class DashboardDom(HTMLParser):
    """The numbers the dashboard shows, read from its DOM by the stable hooks it documents."""

    def __init__(self) -> None:
        super().__init__()
        self.sizes: dict[str, str] = {}
        self.dead: dict[str, str] = {}
        self.changes: list[dict[str, str]] = []
        self.series: dict[str, dict[str, str]] = {}
        self.points: dict[str, list[tuple[str, str]]] = {}
        self.body: dict[str, str] = {}
        self.text_of: dict[str, str] = {}  # element id -> text
        self._capture: tuple[str, str] | None = None  # (kind, key) of the element whose text is next

    def handle_starttag(self, tag, attrs):
        a = {name: value or "" for name, value in attrs}
        classes = set(a.get("class", "").split())
        if tag == "body":
            self.body = a
        elif tag == "td" and "size" in classes:
            self._capture = ("size", a["data-segment"])
        elif tag == "td" and "dead-count" in classes:
            self._capture = ("dead", a["data-error-class"])
        elif tag == "tr" and "change" in classes:
            self.changes.append({"segment_id": a["data-segment"], "customer_id": a["data-customer"],
                                 "change": a["data-change"], "changed_at": a["data-changed-at"]})
        elif tag == "path" and "series" in classes:
            self.series[a["data-segment"]] = a
        elif tag == "circle" and "data-segment" in a:
            self.points.setdefault(a["data-segment"], []).append((a["data-hour"], a["data-size"]))
        elif "id" in a and a["id"] in ("sizes-total", "dead-letters-total", "status"):
            self._capture = ("id", a["id"])

    def handle_data(self, data):
        if self._capture is None:
            return
        kind, key = self._capture
        target = {"size": self.sizes, "dead": self.dead, "id": self.text_of}[kind]
        target[key] = target.get(key, "") + data

    def handle_endtag(self, tag):
        if tag in ("td", "span"):
            self._capture = None


# --- HTTP and ClickHouse --------------------------------------------------------------------------

def get(port, path, token=TOKEN):
    return http_get(port, path, token)


def sql(data_dir: Path, query: str) -> list[dict]:
    """ClickHouse's own answer, from a separate process on the stopped worker's data directory."""
    result = subprocess.run([sys.executable, "-m", "pipeline", "sql", query, "--data-dir", str(data_dir),
                             "--format", "json"], capture_output=True, text=True, timeout=180, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout)


def members_of(port, segment_id) -> list[str]:
    """Every member of a segment, walking /cohorts page by page."""
    members, path = [], f"/cohorts/{segment_id}?limit=2"
    while path:
        status, body = get(port, path)
        assert status == 200, body
        page = json.loads(body)
        members += [m["customer_id"] for m in page["members"]]
        path = page["next"]
    return members


# --- the tests ------------------------------------------------------------------------------------

def test_dashboard_in_headless_chromium_shows_what_clickhouse_holds(broker, unique, tmp_path, chromium):
    now = int(time.time() * 1000)
    pos = [  # (customer, total, kind): buyers 3, big_buyers d-2 (d-3 entered, then left on a refund),
        ("d-1", 40.0, "purchase"), ("d-2", 150.0, "purchase"), ("d-3", 250.0, "purchase"),  # repeat d-1
        ("d-1", 30.0, "purchase"), ("d-3", 200.0, "refund"),
    ]
    expected_sizes = {"buyers": 3, "big_buyers": 1, "repeat_buyers": 1, "whales": 0}
    expected_changes = 7  # buyers x3, big_buyers d-2 and d-3, repeat_buyers d-1, big_buyers d-3 exited
    with running_worker(broker, tmp_path, unique, SEGMENTS, api_token=TOKEN) as (worker, env, prefix):
        port = int(env["PIPELINE_HTTP_PORT"])
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        for i, (customer, total, kind) in enumerate(pos):
            event = {"transaction_id": f"dash-{unique}-{i}", "customer_id": customer, "total": total, "kind": kind,
                     "occurred_at": now - (len(pos) - i) * 1000}
            producer.send(f"{prefix}pos", key=customer.encode(), value=json.dumps(event).encode())
        producer.send(f"{prefix}pos", key=b"bad", value=b"{this is not json")
        producer.send(f"{prefix}clickstream", key=b"bad", value=json.dumps(
            {"event_id": f"dash-{unique}-anon", "type": "page_view", "occurred_at": now}).encode())  # no identifier
        producer.flush()
        producer.close()

        deadline, data = time.monotonic() + 180, {}
        while time.monotonic() < deadline:
            assert worker.poll() is None, worker_log(tmp_path)
            status, body = get(port, "/dashboard/data")
            if status == 200:
                data = json.loads(body)
                if (data["sizes"] == expected_sizes and len(data["recent_changes"]) == expected_changes
                        and sum(data["dead_letters"].values()) == 2):
                    break
            time.sleep(1)
        assert data.get("sizes") == expected_sizes, (data, worker_log(tmp_path))
        assert len(data["recent_changes"]) == expected_changes and sum(data["dead_letters"].values()) == 2, data

        # ClickHouse through the routes that are not the dashboard's
        status, body = get(port, "/segments")
        assert status == 200, body
        api_sizes = {s["id"]: s["size"] for s in json.loads(body)["segments"]}
        cohorts = {segment_id: sorted(members_of(port, segment_id)) for segment_id in expected_sizes}
        assert cohorts == {"buyers": ["d-1", "d-2", "d-3"], "big_buyers": ["d-2"], "repeat_buyers": ["d-1"],
                           "whales": []}

        # the page without a token is refused; with ?token= the browser renders it
        assert get(port, "/dashboard", token=None)[0] == 401
        url = f"http://127.0.0.1:{port}/dashboard?token={TOKEN}"
        dom_html = run_chromium(chromium, tmp_path / "chromium", url, "--dump-dom").stdout.decode()
        screenshot = tmp_path / "dashboard.png"
        run_chromium(chromium, tmp_path / "chromium", url, f"--screenshot={screenshot}", "--window-size=1280,900")
    assert TOKEN not in worker_log(tmp_path)

    (tmp_path / "dashboard.html").write_text(dom_html)
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000
    SCREENSHOT_COPY.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(screenshot, SCREENSHOT_COPY)
    print(f"\ndashboard screenshot: {screenshot} (copied to {SCREENSHOT_COPY})")

    dom = DashboardDom()
    dom.feed(dom_html)
    assert dom.body.get("data-state") == "ok", (dom.text_of.get("status"), dom_html[-2000:])
    assert int(dom.body["data-updates"]) >= 1
    assert TOKEN not in dom_html  # the script took it out of the address bar; the page never had it

    # ClickHouse's own answers, from another process once the worker let go of the data directory
    data_dir = Path(env["PIPELINE_DATA_DIR"])
    db = "segments"
    ch_sizes = {r["segment_id"]: r["n"] for r in sql(data_dir, f"SELECT segment_id, countIf(is_member = 1) AS n "
                                                               f"FROM {db}.segment_membership FINAL GROUP BY 1")}
    ch_dead = {r["error_class"]: r["n"] for r in sql(data_dir, f"SELECT error_class, count() AS n "
                                                               f"FROM {db}.dead_letters FINAL GROUP BY 1")}
    ch_history = {r["segment_id"]: r["n"] for r in sql(data_dir, f"SELECT segment_id, sum(delta) AS n "
                                                                 f"FROM {db}.segment_size_history FINAL GROUP BY 1")}
    ch_changes = sql(data_dir, f"SELECT segment_id, customer_id, toString(change) AS change, changed_at "
                               f"FROM {db}.segment_changes FINAL ORDER BY changed_at DESC")

    shown_sizes = {segment_id: int(text) for segment_id, text in dom.sizes.items()}
    assert shown_sizes == {**dict.fromkeys(expected_sizes, 0), **ch_sizes} == api_sizes == expected_sizes
    assert shown_sizes == {segment_id: len(members) for segment_id, members in cohorts.items()}
    assert int(dom.text_of["sizes-total"]) == sum(ch_sizes.values())

    shown_dead = {error_class: int(text) for error_class, text in dom.dead.items()}
    assert shown_dead == ch_dead and sum(ch_dead.values()) == 2, (shown_dead, ch_dead)
    assert int(dom.text_of["dead-letters-total"]) == 2

    assert len(dom.changes) == len(ch_changes) == expected_changes  # fewer than 20: all of them shown
    key = ("segment_id", "customer_id", "change")
    assert Counter(tuple(c[k] for k in key) for c in dom.changes) == Counter(tuple(c[k] for k in key)
                                                                             for c in ch_changes)
    assert ("big_buyers", "d-3", "exited") in {tuple(c[k] for k in key) for c in dom.changes}
    shown_times = [datetime.fromisoformat(c["changed_at"]) for c in dom.changes]
    assert shown_times == sorted(shown_times, reverse=True)  # newest first

    # the chart: one line per segment, ending at the live size, whose last hourly point is the running
    # sum of every delta in segment_size_history
    assert set(dom.series) == set(expected_sizes)
    for segment_id, size in expected_sizes.items():
        assert int(dom.series[segment_id]["data-last-size"]) == size
        if segment_id in ch_history:
            assert int(dom.points[segment_id][-1][1]) == ch_history[segment_id] == size, segment_id
        else:
            assert segment_id not in dom.points and size == 0


def _change(customer, segment, change, at, version):
    return {"customer_id": customer, "segment_id": segment, "change": change, "changed_at": at,
            "profile_version": version, "cause": f"e-{customer}-{version}"}


def test_dashboard_data_reads_clickhouse(chdb_dsn, chdb_client, unique):
    """``dashboard_data`` on real ClickHouse: FINAL (a redelivered batch counts once), running sums
    of the hourly deltas, the history window, newest changes first and their limit."""
    database = f"t_{unique}"
    writer = ClickHouseWriter(chdb_dsn, database)
    now = datetime(2026, 9, 21, 10, 30, tzinfo=UTC)
    hour = 3600 * 1000
    base = int(now.timestamp() * 1000)
    changes = [
        _change("a", "buyers", "entered", base - 30 * hour, 1),  # before a 24-hour window
        _change("b", "buyers", "entered", base - 5 * hour, 1),
        _change("c", "buyers", "entered", base - 5 * hour + 60_000, 1),
        _change("b", "buyers", "exited", base - 2 * hour, 2),
        _change("c", "vip", "entered", base - 60_000, 2),
    ]
    writer.write(changes=changes)
    writer.write(changes=changes)  # redelivered after a crash
    dead = [{"source_topic": "pos", "source_partition": 0, "source_offset": offset, "error_class": cls,
             "error_message": "bad", "payload": "x", "received_at": base} for offset, cls in
            [(1, "decode"), (2, "decode"), (3, "schema")]]
    writer.write(dead_letters=dead)
    writer.write(dead_letters=dead[:1])  # redelivered

    data = dashboard_data(chdb_client, database, recent=3, history_hours=24, now=now)
    assert data["sizes"] == {"buyers": 2, "vip": 1}
    iso = lambda ms: datetime.fromtimestamp(ms / 1000, tz=UTC).replace(minute=0).isoformat()  # noqa: E731
    window_start = (now.replace(minute=0) - timedelta(hours=23)).isoformat()
    assert data["history"] == {
        "buyers": [[window_start, 1], [iso(base - 5 * hour), 3], [iso(base - 2 * hour), 2]],
        "vip": [[iso(base - 60_000), 1]],
    }
    assert [(c["customer_id"], c["segment_id"], c["change"]) for c in data["recent_changes"]] == [
        ("c", "vip", "entered"), ("b", "buyers", "exited"), ("c", "buyers", "entered")]
    assert data["recent_changes"][0]["changed_at"] == datetime.fromtimestamp((base - 60_000) / 1000, tz=UTC).isoformat()
    assert data["dead_letters"] == {"decode": 2, "schema": 1}


def test_chromium_missing_without_apt_or_root_skips_with_the_reason(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(pytest.skip.Exception, match="no apt-get"):
        chromium_binary()
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/apt-get" if name == "apt-get" else None)
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(pytest.skip.Exception, match="needs root"):
        chromium_binary()
