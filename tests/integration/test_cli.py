"""The CLI against the real embedded broker and chDB (issue 7 item 1, issue 6 items 4-5).

A module fixture writes deterministic traffic with `pipeline generate --out`, replays it with
`pipeline replay` (real broker, worker, chDB), then each read command runs in its own process
on that data dir (a process holds one chDB path) and is checked against numbers recomputed here
from the input files or from `pipeline sql --format json`. `produce` and `generate --broker`
publish to the session's embedded broker; topics are read back with assign() +
seek_to_beginning() (never consumer groups on this broker, DESIGN §3) and decoded with
pipeline.decode.decode.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources

import fastavro
import pytest
import yaml
from kafka import KafkaConsumer, TopicPartition

from pipeline import schemas
from pipeline.decode import MAGIC_SINGLE_OBJECT, decode, schema_id_of
from pipeline.events import DeadLetter
from pipeline.identity import ANONYMOUS_PREFIX, EMAIL_PREFIX, hash_email
from pipeline.registry import RegistrySchemas

SOURCES = ("clickstream", "pos", "crm", "surveys")
START = "2026-03-01T00:00:00Z"
NOW_MS = int(time.time() * 1000)


def pipeline(*args, env, timeout=300):
    return subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True,
                          timeout=timeout, env=env)


def ok(run):
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run.stdout


def sentence(run, code=1):
    """A failed command: the exit code, a message on stderr, and no stack trace."""
    assert run.returncode == code, (run.returncode, run.stdout[-2000:], run.stderr[-2000:])
    assert "Traceback" not in run.stderr and "Traceback" not in run.stdout, run.stderr
    return run.stderr


def ms(iso):
    return int(datetime.fromisoformat(iso).timestamp() * 1000)


@pytest.fixture(scope="module")
def replayed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cli")
    env = {**os.environ, "PIPELINE_LOG_LEVEL": "warning"}
    for name in ("PIPELINE_SEGMENTS_PATH", "PIPELINE_DATA_DIR", "PIPELINE_TOPIC_PREFIX", "PIPELINE_CLICKHOUSE_URL"):
        env.pop(name, None)
    args = ["generate", "--customers", "60", "--count", "1500", "--seed", "11", "--start", START,
            "--step-ms", "3600000"]
    ok(pipeline(*args, "--out", str(tmp / "gen"), env=env))
    ok(pipeline(*args, "--out", str(tmp / "again"), env=env))
    files = {source: tmp / "gen" / f"{source}.jsonl" for source in SOURCES}
    sources = [a for source, path in files.items() for a in ("--source", source, str(path))]
    data = tmp / "data"
    summary = json.loads(ok(pipeline("replay", *sources, "--data-dir", str(data), "--json", env=env)))
    records = {source: [json.loads(line) for line in path.read_text().splitlines()] for source, path in files.items()}
    return {"tmp": tmp, "env": env, "data": data, "summary": summary, "records": records, "files": files}


def sql(replayed, query):
    return json.loads(ok(pipeline("sql", query, "--data-dir", str(replayed["data"]), "--format", "json",
                                  env=replayed["env"])))


def cli_json(replayed, *args):
    return json.loads(ok(pipeline(*args, "--data-dir", str(replayed["data"]), env=replayed["env"])))


# --- generate -----------------------------------------------------------------------------------

def test_generate_is_deterministic_and_replays_without_dead_letters(replayed):
    tmp = replayed["tmp"]
    for source in SOURCES:
        assert (tmp / "gen" / f"{source}.jsonl").read_bytes() == (tmp / "again" / f"{source}.jsonl").read_bytes()
    counts = {source: len(rows) for source, rows in replayed["records"].items()}
    assert sum(counts.values()) == 1500
    summary = replayed["summary"]
    assert summary["produced"] == counts
    assert summary["dead_letters"] == {}
    times = sorted(r["occurred_at"] for rows in replayed["records"].values() for r in rows)
    assert times[0] == ms("2026-03-01T00:00:00+00:00") and times[-1] == times[0] + 1499 * 3_600_000
    assert summary["watermark"] == times[-1]


# --- profile ------------------------------------------------------------------------------------

def _anonymous_starter(replayed):
    """A customer who browsed anonymously before an identify linked them (and their e-mail)."""
    for row in replayed["records"]["crm"]:
        if row["type"] == "identify" and row.get("anonymous_id"):
            anonymous_first = any(r.get("anonymous_id") == row["anonymous_id"] and "customer_id" not in r
                                  for r in replayed["records"]["clickstream"])
            if anonymous_first:
                return row["customer_id"], row["anonymous_id"], row["email"]
    pytest.fail("the generated traffic has no anonymous browsing before an identify")


def test_profile_folds_every_identifier_of_the_customer(replayed):
    customer, anonymous_id, email = _anonymous_starter(replayed)
    mine = [(source, r) for source, rows in replayed["records"].items() for r in rows
            if r.get("customer_id") == customer or r.get("anonymous_id") == anonymous_id or r.get("email") == email]
    purchases = [r["total"] for s, r in mine if s == "pos" and r.get("kind", "purchase") == "purchase"]
    refunds = [r["total"] for s, r in mine if s == "pos" and r.get("kind") == "refund"]
    profile = cli_json(replayed, "profile", customer, "--format", "json")
    assert profile["customer_id"] == customer
    assert profile["events_count"] == len(mine)
    assert profile["orders_count"] == len(purchases)
    assert profile["lifetime_value"] == pytest.approx(sum(purchases) - sum(refunds), abs=0.011)
    assert anonymous_id in profile["anonymous_ids"]
    assert profile["page_views_count"] == sum(1 for s, r in mine if s == "clickstream" and r["type"] == "page_view")
    # the anonymous id finds the same profile; the stored row is what sql shows
    assert cli_json(replayed, "profile", anonymous_id, "--format", "json") == profile
    stored = sql(replayed, f"SELECT version, events_count FROM segments.customer_profiles FINAL "
                           f"WHERE customer_id = '{customer}'")
    assert stored == [{"version": profile["version"], "events_count": profile["events_count"]}]
    table = ok(pipeline("profile", customer, "--data-dir", str(replayed["data"]), env=replayed["env"]))
    assert customer in table and "events_count" in table


def test_profile_explain_agrees_with_the_stored_membership(replayed):
    members = {m["customer_id"] for m in cli_json(replayed, "cohort", "detractors", "--format", "json")}
    everyone = [r["customer_id"] for r in sql(replayed, "SELECT customer_id, nps FROM segments.customer_profiles "
                                                        "FINAL ORDER BY customer_id")]
    chosen = sorted(members)[:3] + [c for c in everyone if c not in members][:3]
    assert len(chosen) == 6
    for customer in chosen:
        explained = cli_json(replayed, "profile", customer, "--explain", "detractors", "--format", "json")
        profile = cli_json(replayed, "profile", customer, "--format", "json")
        assert explained["segment_id"] == "detractors" and explained["customer_id"] == customer
        assert explained["member"] == (customer in members)
        assert explained["result"] == (customer in members)
        [term] = explained["terms"]
        assert term["sql"] == "nps <= 6"
        assert term["holds"] == (profile["nps"] is not None and profile["nps"] <= 6)
        assert explained["now"] == profile["updated_at"]
    unknown = pipeline("profile", chosen[0], "--explain", "nope", "--data-dir", str(replayed["data"]),
                       env=replayed["env"])
    assert "no such segment" in sentence(unknown)


# --- insights -----------------------------------------------------------------------------------

@pytest.mark.parametrize("segment", ["high_value", "detractors"])
def test_insights_numbers_recomputed_from_sql(replayed, segment):
    got = cli_json(replayed, "insights", segment, "--format", "json")
    members = {m["customer_id"] for m in cli_json(replayed, "cohort", segment, "--format", "json")}
    rows = sql(replayed, "SELECT customer_id, nps, surveys_count, survey_interests, survey_motivations "
                         "FROM segments.customer_profiles FINAL")
    assert got["members"] == len(members) > 0
    assert got["population"] == len(rows)
    respondents = [r for r in rows if r["surveys_count"] >= 1]
    cohort_respondents = [r for r in respondents if r["customer_id"] in members]
    assert (got["respondents"], got["cohort_respondents"]) == (len(respondents), len(cohort_respondents))

    for name, group in (("nps_cohort", [r for r in rows if r["customer_id"] in members]), ("nps_overall", rows)):
        scores = [r["nps"] for r in group if r["nps"] is not None]
        nps = got[name]
        assert nps["responses"] == len(scores)
        assert nps["detractors"] == sum(s <= 6 for s in scores)
        assert nps["passives"] == sum(7 <= s <= 8 for s in scores)
        assert nps["promoters"] == sum(s >= 9 for s in scores)
        assert nps["mean"] == pytest.approx(sum(scores) / len(scores))
        assert nps["histogram"] == {str(s): scores.count(s) for s in range(11)}

    for kind, column in (("interests", "survey_interests"), ("motivations", "survey_motivations")):
        overall = Counter(v for r in respondents for v in set(r[column]))
        inside = Counter(v for r in cohort_respondents for v in set(r[column]))
        assert {row["value"] for row in got[kind]} == set(overall)
        for row in got[kind]:
            value = row["value"]
            assert (row["cohort_count"], row["overall_count"]) == (inside[value], overall[value])
            share_in = inside[value] / len(cohort_respondents)
            share_all = overall[value] / len(respondents)
            assert row["cohort_share"] == pytest.approx(share_in)
            assert row["overall_share"] == pytest.approx(share_all)
            assert row["lift"] == pytest.approx(share_in / share_all)
    table = ok(pipeline("insights", segment, "--data-dir", str(replayed["data"]), env=replayed["env"]))
    assert "lift" in table and "NPS" in table


def test_insights_plot_writes_a_png(replayed):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.skip("matplotlib is not installed (insights --plot imports it lazily; add it to the dependencies)")
    target = replayed["tmp"] / "high_value.png"
    ok(pipeline("insights", "high_value", "--plot", str(target), "--data-dir", str(replayed["data"]),
                env=replayed["env"]))
    assert target.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --- cohort --at --------------------------------------------------------------------------------

@pytest.mark.parametrize("segment", ["recent_buyers", "buyers"])
def test_cohort_at_rebuilds_past_members_from_the_change_log(replayed, segment):
    changes = sql(replayed, "SELECT customer_id, toString(change) AS change, toUnixTimestamp64Milli(changed_at) AS at, "
                            f"profile_version FROM segments.segment_changes FINAL WHERE segment_id = '{segment}'")
    assert changes
    first = min(c["at"] for c in changes)
    watermark = replayed["summary"]["watermark"]

    def expected(at_ms):
        last = {}
        for c in sorted(changes, key=lambda c: (c["at"], c["profile_version"])):
            if c["at"] <= at_ms:
                last[c["customer_id"]] = c["change"]
        return {customer for customer, change in last.items() if change == "entered"}

    def at(instant_ms):
        iso = datetime.fromtimestamp(instant_ms / 1000, tz=UTC).isoformat()
        return {m["customer_id"] for m in cli_json(replayed, "cohort", segment, "--at", iso, "--format", "json")}

    middle = first + (watermark - first) // 2
    assert at(first - 1) == set()
    assert at(middle) == expected(middle) and expected(middle)
    now = {m["customer_id"] for m in cli_json(replayed, "cohort", segment, "--format", "json")}
    assert at(watermark) == now == expected(watermark)
    if segment == "recent_buyers":  # a 30-day window: people left it between the middle and the end
        assert expected(middle) - now


def test_cohort_at_refuses_a_bad_time(replayed):
    run = pipeline("cohort", "buyers", "--at", "last tuesday", "--data-dir", str(replayed["data"]),
                   env=replayed["env"])
    assert "ISO-8601" in sentence(run, code=2)


# --- segments list, clickhouse migrate ----------------------------------------------------------

def test_segments_list_definitions_and_sizes(replayed):
    listed = cli_json(replayed, "segments", "list", "--format", "json")
    text = resources.files("pipeline.segments").joinpath("default.yaml").read_text()
    defined = yaml.safe_load(text)["segments"]
    assert [s["id"] for s in listed] == [d["id"] for d in defined]
    for row, definition in zip(listed, defined, strict=True):
        assert row["description"] == definition.get("description", "")
        assert row["requires_consent"] == definition.get("requires_consent")
        assert row["where"] == " ".join(definition["where"].split())
        assert row["size"] == len(cli_json(replayed, "cohort", row["id"], "--format", "json"))
    no_data = ok(pipeline("segments", "list", "--format", "json", "--data-dir", str(replayed["tmp"] / "empty"),
                          env=replayed["env"]))
    assert {s["size"] for s in json.loads(no_data)} == {None}


def test_clickhouse_migrate_is_idempotent(replayed, tmp_path):
    env = replayed["env"]
    fresh = tmp_path / "fresh"
    first = ok(pipeline("clickhouse", "migrate", "--data-dir", str(fresh), env=env))
    assert "applied migrations: 1" in first
    assert "nothing to apply" in ok(pipeline("clickhouse", "migrate", "--data-dir", str(fresh), env=env))
    tables = json.loads(ok(pipeline("sql", "SHOW TABLES FROM segments", "--data-dir", str(fresh), "--format", "json",
                                    env=env)))
    assert {"segment_changes", "segment_membership", "customer_profiles", "dead_letters"} <= {
        next(iter(t.values())) for t in tables}
    assert "nothing to apply" in ok(pipeline("clickhouse", "migrate", "--data-dir", str(replayed["data"]), env=env))
    (tmp_path / "a-file").write_text("x")
    assert "not a directory" in sentence(pipeline("clickhouse", "migrate", "--data-dir", str(tmp_path / "a-file"),
                                                  env=env))


def test_read_commands_fail_with_a_sentence(replayed, tmp_path):
    env, data = replayed["env"], str(replayed["data"])
    assert "no profile" in sentence(pipeline("profile", "nobody-at-all", "--data-dir", data, env=env))
    assert "no segment" in sentence(pipeline("insights", "nope", "--data-dir", data, env=env))
    missing = str(tmp_path / "nowhere")
    for args in (("profile", "c1"), ("insights", "buyers"), ("cohort", "buyers", "--at", START)):
        assert "no embedded ClickHouse data" in sentence(pipeline(*args, "--data-dir", missing, env=env))
    debug = pipeline("--debug", "profile", "c1", "--data-dir", missing, env=env)
    assert debug.returncode == 1 and "Traceback" in debug.stderr
    api = pipeline("profile", "c1", "--api", "http://127.0.0.1:9", env=env)
    assert "cannot reach the worker's API" in sentence(api)


# --- produce and generate --broker on the embedded broker ---------------------------------------

def read_topic(bootstrap, topic, expected, timeout=30.0):
    consumer = KafkaConsumer(bootstrap_servers=bootstrap, consumer_timeout_ms=500)
    deadline = time.monotonic() + timeout
    while not consumer.partitions_for_topic(topic) and time.monotonic() < deadline:
        time.sleep(0.2)
    consumer.assign([TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())])
    consumer.seek_to_beginning()
    records = []
    try:
        while len(records) < expected and time.monotonic() < deadline:
            records.extend(consumer)
    finally:
        consumer.close()
    return records


@pytest.fixture
def broker_env(broker, unique):
    env = {**os.environ, "PIPELINE_BROKER": broker.url, "PIPELINE_TOPIC_PREFIX": f"cli-{unique}-",
           "PIPELINE_PARTITIONS": "2"}
    env.pop("PIPELINE_SCHEMA_REGISTRY_URL", None)
    return env, f"cli-{unique}-"


def test_produce_jsonl_keys_each_message_by_its_customer(broker, broker_env, tmp_path):
    env, prefix = broker_env
    rows = [{"transaction_id": "t1", "occurred_at": NOW_MS - 5000, "customer_id": "c1", "total": 10.0},
            {"transaction_id": "t2", "occurred_at": NOW_MS - 4000, "anonymous_id": "dev-7", "total": 5.5},
            {"transaction_id": "t3", "occurred_at": NOW_MS - 3000, "email": "Ann@Example.com ", "total": 1.0}]
    lines = [json.dumps(r) for r in rows] + ["{broken"]
    path = tmp_path / "pos.jsonl"
    path.write_text("\n".join(lines) + "\n")
    run = pipeline("produce", "--source", "pos", str(path), "--rate", "50", env=env)
    ok(run)
    assert "1 of 4 messages will be dead-lettered" in run.stderr
    records = read_topic(broker.bootstrap, prefix + "pos", 4)
    by_value = {r.value: r.key for r in records}
    assert len(records) == 4
    assert by_value == {lines[0].encode(): b"c1", lines[1].encode(): (ANONYMOUS_PREFIX + "dev-7").encode(),
                        lines[2].encode(): (EMAIL_PREFIX + hash_email("ann@example.com")).encode(),
                        b"{broken": None}
    c1 = [r for r in records if r.key == b"c1"]
    assert decode("pos", c1[0].value, now_ms=NOW_MS + 60_000).total == 10.0


def test_produce_csv_sends_json_records(broker, broker_env, tmp_path):
    env, prefix = broker_env
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(["response_id", "survey_id", "occurred_at", "customer_id", "source", "nps", "interests",
                     "motivations"])
    writer.writerow(["r1", "nps", NOW_MS - 1000, "c9", "nps", "9", "cooking_classes;hiking", '["price"]'])
    writer.writerow(["r2", "nps", datetime.fromtimestamp((NOW_MS - 500) / 1000, tz=UTC).isoformat(), "c8",
                     "survey", "", "", ""])
    path = tmp_path / "answers.csv"
    path.write_text(buffer.getvalue())
    ok(pipeline("produce", "--source", "surveys", str(path), env=env))
    records = sorted(read_topic(broker.bootstrap, prefix + "surveys", 2), key=lambda r: r.key)
    assert [r.key for r in records] == [b"c8", b"c9"]
    c8, c9 = (decode("surveys", r.value, now_ms=NOW_MS + 60_000) for r in records)
    assert not isinstance(c9, DeadLetter) and not isinstance(c8, DeadLetter)
    assert (c9.nps, c9.interests, c9.motivations, c9.occurred_at) == (9, ["cooking_classes", "hiking"], ["price"],
                                                                      NOW_MS - 1000)
    assert (c8.nps, c8.interests, c8.survey_source) == (None, [], "survey")


def _crm_container(path, count):
    raw = schemas.raw_schema("crm")
    records = [{"event_id": f"k{i}", "occurred_at": NOW_MS - 10_000 + i, "customer_id": f"c{i % 3}",
                "anonymous_id": None, "email": None, "loyalty_id": None, "type": "consent", "traits": {},
                "marketing": i % 2 == 0, "action": None, "campaign_id": None, "ticket_id": None, "topic": None,
                "sentiment": None} for i in range(count)]
    with open(path, "wb") as handle:
        fastavro.writer(handle, fastavro.parse_schema(raw), records)
    return records


def test_produce_avro_without_registry_uses_single_object_encoding(broker, broker_env, tmp_path):
    env, prefix = broker_env
    records = _crm_container(tmp_path / "crm.avro", 7)
    ok(pipeline("produce", "--source", "crm", str(tmp_path / "crm.avro"), env=env))
    got = read_topic(broker.bootstrap, prefix + "crm", 7)
    assert len(got) == 7
    for message in got:
        assert message.value[:2] == MAGIC_SINGLE_OBJECT
        event = decode("crm", message.value, now_ms=NOW_MS + 60_000)
        assert not isinstance(event, DeadLetter), event
        assert message.key == event.customer_id.encode()
        source = next(r for r in records if r["event_id"] == event.event_id)
        assert (event.customer_id, event.marketing, event.occurred_at) == (
            source["customer_id"], source["marketing"], source["occurred_at"])


class _Registry(BaseHTTPRequestHandler):
    """A minimal Confluent-compatible Schema Registry: register and fetch by id."""

    schemas: dict[int, str] = {}
    subjects: dict[str, int] = {}

    def _answer(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        subject = self.path.split("/")[2]
        schema_id = self.subjects.setdefault(subject, 100 + len(self.subjects))
        self.schemas[schema_id] = body["schema"]
        self._answer(200, {"id": schema_id})

    def do_GET(self):  # noqa: N802
        schema_id = int(self.path.rsplit("/", 1)[1])
        if schema_id not in self.schemas:
            self._answer(404, {"error_code": 40403, "message": "Schema not found"})
        else:
            self._answer(200, {"schema": self.schemas[schema_id]})

    def log_message(self, *args):
        pass


def test_produce_avro_with_registry_uses_the_confluent_wire_format(broker, broker_env, tmp_path):
    env, prefix = broker_env
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Registry)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        _crm_container(tmp_path / "crm.avro", 5)
        ok(pipeline("produce", "--source", "crm", str(tmp_path / "crm.avro"),
                    env={**env, "PIPELINE_SCHEMA_REGISTRY_URL": url}))
        assert list(_Registry.subjects) == [f"{prefix}crm-value"]
        schema_id = _Registry.subjects[f"{prefix}crm-value"]
        got = read_topic(broker.bootstrap, prefix + "crm", 5)
        assert len(got) == 5
        resolver = RegistrySchemas(url)
        for message in got:
            assert message.value[0] == 0 and schema_id_of(message.value) == schema_id
            event = decode("crm", message.value, now_ms=NOW_MS + 60_000, resolver=resolver)
            assert not isinstance(event, DeadLetter), event
            assert message.key == event.customer_id.encode()
    finally:
        server.shutdown()


def test_produce_errors_are_sentences(broker_env, tmp_path):
    env, _ = broker_env
    path = tmp_path / "pos.jsonl"
    path.write_text(json.dumps({"transaction_id": "t1", "occurred_at": NOW_MS, "customer_id": "c1", "total": 1}))
    assert "no such file" in sentence(pipeline("produce", "--source", "pos", str(tmp_path / "nope.jsonl"), env=env))
    assert "unknown source" in sentence(pipeline("produce", "--source", "orders", str(path), env=env))
    started = time.monotonic()
    unreachable = pipeline("produce", "--source", "pos", str(path), "--broker", "kafka://127.0.0.1:9",
                           "--timeout", "3", env=env)
    assert "cannot reach the broker at 127.0.0.1:9" in sentence(unreachable)
    assert time.monotonic() - started < 30
    bad = tmp_path / "bad.jsonl"
    bad.write_text("{oops\n")
    assert "--strict" in sentence(pipeline("produce", "--source", "pos", str(bad), "--strict", env=env))


def test_generate_to_the_broker(broker, broker_env):
    env, prefix = broker_env
    run = ok(pipeline("generate", "--count", "300", "--customers", "30", "--seed", "3", "--rate", "0", env=env))
    assert "published 300 events" in run
    total = 0
    keyed: dict[str, int] = defaultdict(int)
    for source in SOURCES:
        for record in read_topic(broker.bootstrap, prefix + source, 1, timeout=10):
            event = decode(source, record.value, now_ms=int(time.time() * 1000) + 60_000)
            assert not isinstance(event, DeadLetter), event
            expected = (event.customer_id or (ANONYMOUS_PREFIX + event.anonymous_id if not event.email_hash
                                              else EMAIL_PREFIX + event.email_hash))
            assert record.key == expected.encode()
            keyed[source] += 1
            total += 1
    assert total == 300, keyed
