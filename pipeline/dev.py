"""`pipeline dev`: embedded broker + one worker (child process, chDB) + synthetic traffic +
live segment sizes, counted from the segment-changes topic, until Ctrl-C."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

from rich.console import Console
from rich.live import Live
from rich.table import Table

from pipeline.broker.embedded import EmbeddedBroker
from pipeline.broker.topics import SEGMENT_CHANGES, ensure_topics, product_topics
from pipeline.codecs import decode_change
from pipeline.control import control_kind
from pipeline.generate import traffic
from pipeline.processes import stop_process
from pipeline.settings import Settings, environment_for_child


def _view(sizes: Counter[str], produced: int, changes: int, started: float) -> Table:
    table = Table(title=f"live segments — {produced} events in, {changes} changes out, "
                        f"{time.monotonic() - started:.0f} s (Ctrl-C to stop)")
    table.add_column("segment")
    table.add_column("members", justify="right")
    for segment, size in sorted(sizes.items()):
        table.add_row(segment, str(size))
    return table


def run_dev(settings: Settings, *, rate: float = 200.0, customers: int = 500, seed: int = 7) -> None:
    from kafka import KafkaConsumer, KafkaProducer, TopicPartition

    console = Console()
    data_dir = Path(settings.data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    with EmbeddedBroker(data_dir) as broker:
        child_settings = settings.model_copy(update={"broker": broker.url})
        ensure_topics([broker.bootstrap], product_topics(child_settings), settings.partitions)
        log = open(data_dir / "worker.log", "ab")
        worker = subprocess.Popen([sys.executable, "-m", "pipeline", "worker"],
                                  env=environment_for_child(child_settings), stdout=log, stderr=subprocess.STDOUT,
                                  start_new_session=True)
        console.print(f"broker {broker.bootstrap}, worker pid {worker.pid}, logs in {data_dir}/")
        if settings.http_port:
            console.print(f"dashboard and API: http://{settings.http_host}:{settings.http_port}/ "
                          "(docs/api.md)", highlight=False)
        producer = KafkaProducer(bootstrap_servers=broker.bootstrap, linger_ms=20)
        consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, consumer_timeout_ms=100)
        changes_topic = settings.topic(SEGMENT_CHANGES)
        consumer.assign([TopicPartition(changes_topic, p) for p in range(settings.partitions)])
        consumer.seek_to_beginning()
        sizes: Counter[str] = Counter()
        produced = changes = 0
        started = last_line = time.monotonic()
        # Event time advances with the wall clock (one step per message at the requested rate).
        messages = traffic(customers=customers, seed=seed, start_ms=int(time.time() * 1000),
                           step_ms=max(1, int(1000 / rate)))
        try:
            with Live(_view(sizes, 0, 0, started), console=console, refresh_per_second=2) as live:
                while not stop:
                    tick = time.monotonic()
                    for _ in range(max(1, int(rate / 5))):
                        message = next(messages)
                        producer.send(settings.topic(message.topic), key=message.key, value=message.value)
                        produced += 1
                    producer.flush()
                    for record in consumer:
                        if control_kind(record.headers) is not None or record.value is None:
                            continue  # markers; tombstones of erased customers (their exits came first)
                        change = decode_change(record.value)
                        sizes[change["segment_id"]] += 1 if change["change"] == "entered" else -1
                        changes += 1
                    if worker.poll() is not None:
                        console.print(f"[red]the worker exited ({worker.returncode}); see {data_dir}/worker.log")
                        break
                    live.update(_view(sizes, produced, changes, started))
                    if not console.is_terminal and time.monotonic() - last_line >= 2:
                        # Piped output: Live redraws nothing, so print one line of sizes instead.
                        last_line = time.monotonic()
                        print("sizes: " + " ".join(f"{k}={v}" for k, v in sorted(sizes.items())), flush=True)
                    time.sleep(max(0.0, 0.2 - (time.monotonic() - tick)))
        except KeyboardInterrupt:
            pass
        finally:
            console.print("stopping…")
            producer.close()
            consumer.close()
            stop_process(worker)
            log.close()
