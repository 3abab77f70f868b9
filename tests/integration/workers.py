"""A real `pipeline worker` child process on the session's embedded broker, for tests."""

import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager

from kafka import KafkaConsumer, TopicPartition

from pipeline.broker.embedded import free_port
from pipeline.processes import stop_process


@contextmanager
def running_worker(broker, tmp_path, unique, segments_yaml: str, partitions: int = 2, **settings):
    """Start a worker with its own topic prefix, app id and data dir; yield (process, env, prefix)."""
    prefix = f"t{unique}-"
    segments = tmp_path / "segments.yaml"
    segments.write_text(segments_yaml)
    env = {**os.environ, "PIPELINE_BROKER": broker.url, "PIPELINE_TOPIC_PREFIX": prefix,
           "PIPELINE_APP_ID": f"app-{unique}", "PIPELINE_DATA_DIR": str(tmp_path / "data"),
           "PIPELINE_STORE": "memory://", "PIPELINE_PARTITIONS": str(partitions),
           "PIPELINE_SEGMENTS_PATH": str(segments), "PIPELINE_LOG_LEVEL": "warning",
           "PIPELINE_HTTP_PORT": str(free_port()),
           **{f"PIPELINE_{k.upper()}": str(v) for k, v in settings.items()}}
    log_file = open(tmp_path / "worker.log", "wb")
    worker = subprocess.Popen([sys.executable, "-m", "pipeline", "worker"], env=env, stdout=log_file,
                              stderr=subprocess.STDOUT)
    try:
        yield worker, env, prefix
    finally:
        stop_process(worker)
        log_file.close()


def topic_consumer(broker, topic: str, partitions: int = 2, timeout: float = 60.0) -> KafkaConsumer:
    """A consumer assigned to every partition of ``topic`` from the beginning (no consumer group:
    groups wait out rebalances on the embedded broker, DESIGN §3); waits for the topic to exist."""
    consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, consumer_timeout_ms=1000)
    deadline = time.monotonic() + timeout
    while not consumer.partitions_for_topic(topic) and time.monotonic() < deadline:
        time.sleep(0.5)
    consumer.assign([TopicPartition(topic, p) for p in range(partitions)])
    consumer.seek_to_beginning()
    return consumer


def worker_log(tmp_path) -> str:
    return (tmp_path / "worker.log").read_text(errors="replace")[-3000:]


def http_get(port, path, token=None):
    """(status, body) of GET http://127.0.0.1:port/path, with a bearer token if given; status 0 when
    nothing listens yet."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()
    except urllib.error.URLError as error:
        return 0, str(error.reason).encode()
