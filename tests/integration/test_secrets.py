"""Secrets come from settings and never appear in logs or error messages (issue 8 item 7):
the ClickHouse password, the API token and the Kafka SASL password."""

import json
import os
import subprocess
import sys
import time

from kafka import KafkaProducer

from pipeline.broker.embedded import free_port
from tests.integration.workers import running_worker, worker_log

CLICKHOUSE_PASSWORD = "hunter2-ch-secret"
TOKEN = "tok-3c9e-secret"
SASL_PASSWORD = "sasl-pw-secret-77"


def test_worker_logs_no_secret_while_clickhouse_fails(broker, unique, tmp_path):
    dsn = f"http://pipeline:{CLICKHOUSE_PASSWORD}@127.0.0.1:{free_port()}/segments"  # nothing listens there
    segments = "segments:\n  - id: buyers\n    where: orders_count >= 1\n"
    with running_worker(broker, tmp_path, unique, segments, clickhouse_url=dsn, api_token=TOKEN,
                        log_level="info") as (worker, _, prefix):
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
        purchase = {"transaction_id": f"t-{unique}", "customer_id": "s1", "total": 5.0,
                    "occurred_at": int(time.time() * 1000)}
        producer.send(f"{prefix}pos", key=b"s1", value=json.dumps(purchase).encode())
        producer.flush()
        producer.close()
        deadline = time.monotonic() + 120
        while "ClickHouse insert failed" not in worker_log(tmp_path) and time.monotonic() < deadline:
            assert worker.poll() is None, worker_log(tmp_path)
            time.sleep(0.5)
        log = (tmp_path / "worker.log").read_text(errors="replace")
    assert "ClickHouse insert failed" in log, log[-3000:]
    assert CLICKHOUSE_PASSWORD not in log and TOKEN not in log


def test_a_sasl_password_is_not_in_the_error(broker):
    env = {**os.environ, "PIPELINE_BROKER": broker.url, "PIPELINE_BROKER_SECURITY_PROTOCOL": "SASL_PLAINTEXT",
           "PIPELINE_BROKER_SASL_USERNAME": "pipeline", "PIPELINE_BROKER_SASL_PASSWORD": SASL_PASSWORD,
           "PIPELINE_HTTP_PORT": "0"}
    run = subprocess.run([sys.executable, "-m", "pipeline", "worker"], capture_output=True, text=True, timeout=120,
                         env=env)  # the embedded broker speaks no SASL: the worker must refuse to start
    assert run.returncode != 0
    assert SASL_PASSWORD not in run.stdout + run.stderr
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
