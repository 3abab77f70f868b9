"""Identity resolution and erasure end to end, through `pipeline replay` on the real broker,
worker and chDB (issue 4 items 1 and 5): an anonymous visitor's history folds into the customer
it turns out to be, later events under any of its identifiers land there, two CRM customers on a
shared device never merge, and an erasure removes the customer everywhere."""

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)
HOUR = timedelta(hours=1)
EMAIL = "Ann.Lee@Example.com"

SEGMENTS = """segments:
  - id: carted
    where: cart_adds_count >= 1
  - id: carted_and_bought
    where: cart_adds_count >= 1 AND orders_count >= 1
  - id: visitors
    where: events_count >= 1
"""


def at(hours: float) -> str:
    return (T0 + hours * HOUR).isoformat()


def pipeline(*args, env):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, timeout=300,
                          env=env)


def sql(query, data, env):
    run = pipeline("sql", query, "--data-dir", str(data), "--format", "json", env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout)


def replay(tmp, name, clicks, crm, pos, env):
    files = []
    for source, records in (("clickstream", clicks), ("crm", crm), ("pos", pos)):
        path = tmp / f"{name}-{source}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        files += ["--source", source, str(path)]
    data = tmp / name
    run = pipeline("replay", *files, "--segments", str(tmp / "segments.yaml"), "--data-dir", str(data), "--json",
                   env=env)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(run.stdout), data


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("identity")
    (tmp / "segments.yaml").write_text(SEGMENTS)
    return tmp, {**os.environ, "PIPELINE_LOG_LEVEL": "warning", "PIPELINE_STORE": "memory://"}


ANON_CLICKS = [
    {"event_id": "v1", "anonymous_id": "A", "type": "product_view", "category": "cookware", "occurred_at": at(0)},
    {"event_id": "v2", "anonymous_id": "A", "type": "add_to_cart", "category": "cookware", "occurred_at": at(1)},
]
IDENTIFY = {"event_id": "i1", "type": "identify", "customer_id": "C1", "anonymous_id": "A", "email": EMAIL,
            "occurred_at": at(2)}
LATER_ANON = {"event_id": "v3", "anonymous_id": "A", "type": "page_view", "occurred_at": at(3)}
PURCHASE_BY_EMAIL = {"transaction_id": "t1", "email": " ann.lee@example.COM ", "total": 30.0, "occurred_at": at(4),
                     "items": [{"sku": "pan", "category": "cookware", "quantity": 1, "unit_price": 30.0}]}
SHARED_DEVICE = [
    {"event_id": "d1", "type": "identify", "customer_id": "C2", "anonymous_id": "D", "occurred_at": at(1)},
    {"event_id": "d2", "type": "identify", "customer_id": "C3", "anonymous_id": "D", "occurred_at": at(2)},
]


@pytest.fixture(scope="module")
def merged(env):
    tmp, environment = env
    summary, data = replay(tmp, "merged", ANON_CLICKS + [LATER_ANON], [IDENTIFY, *SHARED_DEVICE],
                           [PURCHASE_BY_EMAIL], environment)
    return summary, data, environment


def test_anonymous_history_folds_into_the_customer(merged):
    _, data, env = merged
    profiles = {p["customer_id"]: p for p in sql(
        "SELECT customer_id, events_count, cart_adds_count, orders_count, anonymous_ids "
        "FROM segments.customer_profiles "
        "FINAL", data, env)}
    # The anonymous profile is gone; everything it saw, and everything after, is C1's.
    assert "anon:A" not in profiles
    assert profiles["C1"]["events_count"] == 5  # two anonymous clicks, identify, later click, purchase by email
    assert profiles["C1"]["cart_adds_count"] == 1 and profiles["C1"]["orders_count"] == 1
    assert "A" in profiles["C1"]["anonymous_ids"]
    members = json.loads(pipeline("cohort", "carted_and_bought", "--data-dir", str(data), "--format", "json",
                                  env=env).stdout)
    assert [m["customer_id"] for m in members] == ["C1"]


def test_memberships_move_with_cause_merge(merged):
    _, data, env = merged
    rows = sql("SELECT customer_id, segment_id, toString(change) AS change, cause FROM segments.segment_changes "
               "FINAL WHERE segment_id = 'carted' ORDER BY customer_id, profile_version", data, env)
    assert [(r["customer_id"], r["change"], r["cause"]) for r in rows] == [
        ("C1", "entered", "merge"), ("anon:A", "entered", "v2"), ("anon:A", "exited", "merge")]
    sizes = {r["segment_id"]: r["n"] for r in sql(
        "SELECT segment_id, countIf(is_member = 1) AS n FROM segments.segment_membership FINAL GROUP BY segment_id",
        data, env)}
    assert sizes["carted"] == 1  # no customer stays a member twice


def test_two_crm_customers_on_one_device_never_merge(merged):
    _, data, env = merged
    profiles = {p["customer_id"]: p["events_count"] for p in sql(
        "SELECT customer_id, events_count FROM segments.customer_profiles FINAL", data, env)}
    assert profiles["C2"] == 1 and profiles["C3"] == 1


def test_no_raw_email_anywhere(merged):
    _, data, env = merged
    for table in ("customer_profiles", "segment_changes", "segment_membership", "dead_letters"):
        dump = json.dumps(sql(f"SELECT * FROM segments.{table}", data, env)).lower()
        assert "ann.lee@example.com" not in dump and "example.com" not in dump, table


def test_erasure_removes_the_customer_and_later_events_start_afresh(env):
    tmp, environment = env
    erase = {"event_id": "x1", "type": "erasure_request", "customer_id": "C1", "occurred_at": at(5)}
    # On the same topic and key as the erasure, so it is processed after it whatever the interleaving.
    after = {"event_id": "k9", "type": "consent", "marketing": True, "customer_id": "C1", "occurred_at": at(6)}
    summary, data = replay(tmp, "erased", ANON_CLICKS + [LATER_ANON], [IDENTIFY, erase, after], [PURCHASE_BY_EMAIL],
                           environment)
    profiles = {p["customer_id"]: p for p in sql(
        "SELECT customer_id, events_count, orders_count, anonymous_ids FROM segments.customer_profiles FINAL", data,
        environment)}
    assert set(profiles) == {"C1"}  # no anonymous or email profile survived the erasure
    assert (profiles["C1"]["events_count"], profiles["C1"]["orders_count"], profiles["C1"]["anonymous_ids"]) == (
        1, 0, [])  # the old identifier starts from nothing
    changes = sql("SELECT customer_id, segment_id, toString(change) AS change, cause FROM segments.segment_changes "
                  "FINAL ORDER BY customer_id, profile_version, segment_id", data, environment)
    assert changes == [{"customer_id": "C1", "segment_id": "visitors", "change": "entered", "cause": "k9"}]
    assert summary["sizes"] == {"visitors": 1}  # the erased rows are gone, not just marked exited


def test_events_are_kept_and_erased_with_their_customer(merged, env):
    _, data, environment = merged
    keys = {r["customer_id"] for r in sql("SELECT DISTINCT customer_id FROM segments.events", data, environment)}
    assert {"C1", "anon:A"} <= keys  # each event under the profile it was folded into
    tmp, _ = env
    erased = tmp / "erased"
    assert sql("SELECT customer_id, event_id FROM segments.events FINAL ORDER BY event_id", erased, environment) == [
        {"customer_id": "C1", "event_id": "k9"}]  # only the event after the erasure
