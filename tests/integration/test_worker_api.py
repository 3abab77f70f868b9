"""The HTTP API served by a real worker (issue 7 item 2, issue 8 item 7): health and readiness
open, everything else behind the bearer token, data from the worker's own state and ClickHouse."""

import json
import time

from kafka import KafkaProducer

from pipeline.codecs import decode_change
from tests.integration.workers import http_get, running_worker, topic_consumer, worker_log

TOKEN = "s3cret-token-for-tests"
SEGMENTS = """segments:
  - id: buyers
    where: orders_count >= 1
  - id: big_buyers
    where: orders_count >= 1 AND lifetime_value > 100
"""


def test_worker_serves_the_api(broker, unique, tmp_path):
    with running_worker(broker, tmp_path, unique, SEGMENTS, api_token=TOKEN) as (worker, env, prefix):
        port = int(env["PIPELINE_HTTP_PORT"])
        consumer = topic_consumer(broker, f"{prefix}segment-changes")
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        purchase = {"transaction_id": f"tx-{unique}", "customer_id": "api-1", "total": 40.0,
                    "occurred_at": int(time.time() * 1000)}
        producer.send(f"{prefix}pos", key=b"api-1", value=json.dumps(purchase).encode())
        producer.flush()
        producer.close()
        changes, deadline = [], time.monotonic() + 120
        while not changes and time.monotonic() < deadline:
            assert worker.poll() is None, worker_log(tmp_path)
            changes = [decode_change(m.value) for m in consumer]
        consumer.close()
        assert changes, worker_log(tmp_path)

        assert http_get(port, "/health")[0] == 200
        deadline = time.monotonic() + 60
        while http_get(port, "/ready")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.5)
        assert http_get(port, "/ready")[0] == 200

        status, body = http_get(port, "/profiles/api-1")
        assert status == 401 and TOKEN.encode() not in body
        assert http_get(port, "/profiles/api-1", "wrong")[0] == 401
        status, body = http_get(port, "/profiles/api-1", TOKEN)
        assert status == 200, body
        profile = json.loads(body)
        assert profile["orders_count"] == 1 and profile["segments"] == ["buyers"]

        status, body = http_get(port, "/profiles/api-1/explain/big_buyers", TOKEN)
        explained = json.loads(body)
        assert status == 200 and explained["result"] is False
        assert [t["holds"] for t in explained["terms"]] == [True, False]

        deadline = time.monotonic() + 60  # the sink writes ClickHouse in batches
        members = []
        while not members and time.monotonic() < deadline:
            status, body = http_get(port, "/cohorts/buyers", TOKEN)
            assert status == 200, body
            members = json.loads(body)["members"]
            time.sleep(0.5)
        assert [m["customer_id"] for m in members] == ["api-1"]
        assert http_get(port, "/cohorts/nope", TOKEN)[0] == 404
        status, body = http_get(port, "/segments", TOKEN)
        assert {s["id"]: s["size"] for s in json.loads(body)["segments"]} == {"buyers": 1, "big_buyers": 0}

        status, body = http_get(port, "/metrics")
        assert status == 200 and b"pipeline_events_in_total" in body and b"pipeline_segment_changes_total" in body
        assert b"pipeline_consumer_lag{" in body and b"pipeline_timers_pending" in body
        assert http_get(port, "/openapi.json", TOKEN)[0] == 200
    assert TOKEN not in worker_log(tmp_path)
