"""The README's analyst SQL, run exactly as written on the tables of a real `pipeline replay` (issue 6 item 6).

The queries are read from README.md (each ```sql block after a ``<!-- sql:NAME -->`` marker), run
through `pipeline sql … --format json` (chDB holds one data directory per process, so always in a
CLI subprocess), and each answer is checked against one computed here in Python from
`pipeline cohort … --format json`, the change log (`segment_changes FINAL`) and a dump of the
profiles.
"""

import json
import os
import re
import subprocess
import sys
from collections import Counter, defaultdict
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SQL_BLOCK = re.compile(r"<!-- sql:([a-z0-9-]+) -->\n```sql\n(.*?)\n```", re.DOTALL)
HOUR_MS = 3_600_000


def readme_queries(path: Path = ROOT / "README.md") -> dict[str, str]:
    return dict(SQL_BLOCK.findall(path.read_text()))


def pipeline(*args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=ROOT)


def ms(text: str) -> int:
    return int(datetime.fromisoformat(text).timestamp() * 1000)


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    """150 synthetic customers, 3,000 events twenty minutes apart ending now (so some changes are today):
    ~42 days, longer than recent_buyers' 30-day window, so some of its members leave by time alone
    (exits by merge alone depend on how identity commands interleave with the events: none in some runs)."""
    tmp = tmp_path_factory.mktemp("analyst")
    env = {**os.environ, "PIPELINE_LOG_LEVEL": "warning"}
    env.pop("PIPELINE_SEGMENTS_PATH", None)  # the built-in segments the README's queries name
    made = pipeline("generate", "--customers", "150", "--count", "3000", "--seed", "3", "--step-ms", "1200000",
                    "--out", str(tmp / "in"), env=env)
    assert made.returncode == 0, made.stderr[-2000:]
    sources = [arg for source in ("clickstream", "pos", "crm", "surveys")
               for arg in ("--source", source, str(tmp / "in" / f"{source}.jsonl"))]
    data = tmp / "data"
    run = pipeline("replay", *sources, "--data-dir", str(data), "--json", env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(run.stdout), data, env


def sql(query: str, data: Path, env) -> list[dict]:
    run = pipeline("sql", query, "--data-dir", str(data), "--format", "json", env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)


def cohort(segment: str, data: Path, env) -> list[dict]:
    run = pipeline("cohort", segment, "--data-dir", str(data), "--format", "json", env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)


@pytest.fixture(scope="module")
def change_log(replayed):
    _, data, env = replayed
    return sql("SELECT customer_id, segment_id, toString(change) AS change, toUnixTimestamp64Milli(changed_at) AS at, "
               "profile_version, cause FROM segments.segment_changes FINAL", data, env)


def members_from_log(change_log, segment: str) -> dict[str, int]:
    """customer -> since: members whose last change of the segment (by time, then version) is an entry."""
    last: dict[str, dict] = {}
    for row in sorted((r for r in change_log if r["segment_id"] == segment),
                      key=lambda r: (int(r["at"]), int(r["profile_version"]))):
        last[row["customer_id"]] = row
    return {c: int(r["at"]) for c, r in last.items() if r["change"] == "entered"}


def test_the_readme_has_every_query():
    assert sorted(readme_queries()) == ["entered-today", "live-cohort", "overlap", "size-over-time", "why"]


def test_live_cohort(replayed, change_log):
    _, data, env = replayed
    rows = sql(readme_queries()["live-cohort"], data, env)
    members = cohort("recent_buyers", data, env)
    assert rows, "recent_buyers should have members"
    assert [(r["customer_id"], r["since"]) for r in rows] == [(m["customer_id"], m["since"]) for m in members]
    assert {r["customer_id"]: ms(r["since"]) for r in rows} == members_from_log(change_log, "recent_buyers")


def test_entered_today(replayed, change_log):
    _, data, env = replayed
    for _ in range(2):  # once more if UTC midnight passed during the query
        before = datetime.now(UTC).date()
        rows = sql(readme_queries()["entered-today"], data, env)
        if datetime.now(UTC).date() == before:
            break
    midnight = int(datetime(before.year, before.month, before.day, tzinfo=UTC).timestamp() * 1000)
    expected = sorted((r["segment_id"], int(r["at"]), r["customer_id"], r["cause"]) for r in change_log
                      if r["change"] == "entered" and int(r["at"]) >= midnight)
    got = [(r["segment_id"], ms(r["changed_at"]), r["customer_id"], r["cause"]) for r in rows]
    assert got == expected
    if datetime.now(UTC) - datetime.combine(before, datetime.min.time(), UTC) > timedelta(hours=2):
        assert got, "the input ends now, twenty minutes per event: some entries fall today"


def test_size_over_time(replayed, change_log):
    summary, data, env = replayed
    rows = sql(readme_queries()["size-over-time"], data, env)
    deltas: Counter[int] = Counter()
    for r in change_log:
        if r["segment_id"] == "recent_buyers":
            deltas[int(r["at"]) // HOUR_MS * HOUR_MS] += 1 if r["change"] == "entered" else -1
    expected, running = [], 0
    for hour in sorted(deltas):
        running += deltas[hour]
        expected.append((hour, deltas[hour], running))
    assert [(ms(r["hour"]), int(r["net_change"]), int(r["members"])) for r in rows] == expected
    assert any(delta < 0 for _, delta, _ in expected), "recent_buyers has exits"
    assert any(r["segment_id"] == "recent_buyers" and r["change"] == "exited" and r["cause"] == "time"
               for r in change_log), "recent_buyers has time-driven exits"
    assert running == summary["sizes"]["recent_buyers"] == len(cohort("recent_buyers", data, env))


def test_overlap(replayed):
    _, data, env = replayed
    (row,) = sql(readme_queries()["overlap"], data, env)
    high_value = {m["customer_id"] for m in cohort("high_value", data, env)}
    promoters = {m["customer_id"] for m in cohort("promoters", data, env)}
    both = high_value & promoters
    assert both, "the synthetic data has high-value promoters"
    assert (int(row["high_value"]), int(row["promoters"]), int(row["in_both"])) == (
        len(high_value), len(promoters), len(both))
    assert row["jaccard"] == pytest.approx(len(both) / len(high_value | promoters), abs=0.0006)


def test_the_why(replayed):
    _, data, env = replayed
    rows = sql(readme_queries()["why"], data, env)
    members = {m["customer_id"] for m in cohort("high_value", data, env)}
    profiles = sql("SELECT customer_id, surveys_count, survey_interests FROM segments.customer_profiles FINAL",
                   data, env)
    respondents = [p for p in profiles if int(p["surveys_count"]) >= 1]
    in_cohort = [p for p in respondents if p["customer_id"] in members]
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for p in respondents:
        for interest in set(p["survey_interests"]):
            counts[interest][1] += 1
            counts[interest][0] += p["customer_id"] in members
    assert in_cohort and len(counts) >= 3
    assert {r["interest"]: [int(r["cohort_count"]), int(r["overall_count"])] for r in rows} == dict(counts)
    for r in rows:
        cohort_count, overall_count = counts[r["interest"]]
        assert r["cohort_share"] == pytest.approx(cohort_count / len(in_cohort), abs=0.0006)
        assert r["overall_share"] == pytest.approx(overall_count / len(respondents), abs=0.0006)
        exact_lift = (cohort_count / len(in_cohort)) / (overall_count / len(respondents))
        assert r["lift"] == pytest.approx(exact_lift, abs=0.02)  # from shares rounded to 3 places
    assert [r["lift"] for r in rows] == sorted((r["lift"] for r in rows), reverse=True)
