"""The product's Prometheus metrics, on a registry of their own.

Each ``Metrics`` has its own ``CollectorRegistry`` (never prometheus_client's global one), so
tests and several apps in one process do not collide. The worker creates one, the agents call
its methods, and ``GET /metrics`` (``pipeline.api``) serves ``render()``.

Names carry a namespace prefix (default ``pipeline``): ``pipeline_events_in_total{topic}``,
``pipeline_dead_letters_total{source,error_class}``, ``pipeline_duplicates_total``,
``pipeline_segment_changes_total{segment,change}``, ``pipeline_identity_conflicts_total``,
``pipeline_merges_total``, ``pipeline_consumer_lag{topic,partition}``, ``pipeline_timers_pending``,
``pipeline_profiles_in_store``, ``pipeline_evaluation_seconds``, ``pipeline_sink_batch_seconds``,
``pipeline_sink_batch_rows``.

Gauges that are cheaper to read at scrape time than to keep up to date (lag, pending timers,
profiles in the store) can be refreshed by callbacks registered with ``on_scrape``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

log = logging.getLogger(__name__)

# Per-batch evaluation takes from microseconds (one event) to seconds (a full batch).
EVALUATION_BUCKETS = (0.0001, 0.0005, 0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
SINK_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
SINK_ROWS_BUCKETS = (1, 10, 50, 100, 500, 1000, 2500, 5000, 10000, 25000, 50000, 100000)


class Metrics:
    """The product's counters, gauges and histograms, with one method per thing that happens."""

    def __init__(self, *, namespace: str = "pipeline", registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._refreshers: list[Callable[[Metrics], None]] = []
        ns, reg = namespace, self.registry
        self.events_in = Counter("events_in", "Input messages read, per topic.", ["topic"], namespace=ns,
                                 registry=reg)
        self.dead_letters = Counter("dead_letters", "Messages sent to dead-letters, per source topic and error "
                                    "class.", ["source", "error_class"], namespace=ns, registry=reg)
        self.duplicates = Counter("duplicates", "Events dropped as duplicates (event_id seen before).",
                                  namespace=ns, registry=reg)
        self.segment_changes = Counter("segment_changes", "Segment changes sent, per segment and change "
                                       "(entered/exited).", ["segment", "change"], namespace=ns, registry=reg)
        self.identity_conflicts = Counter("identity_conflicts", "Identity links refused as conflicting.",
                                          namespace=ns, registry=reg)
        self.merges = Counter("merges", "Profiles merged into another one.", namespace=ns, registry=reg)
        self.consumer_lag = Gauge("consumer_lag", "Messages behind the end of each assigned partition.",
                                  ["topic", "partition"], namespace=ns, registry=reg)
        self.timers_pending = Gauge("timers_pending", "Time-driven re-evaluations scheduled in the timer index.",
                                    namespace=ns, registry=reg)
        self.profiles_in_store = Gauge("profiles_in_store", "Profiles held by this worker's store.",
                                       namespace=ns, registry=reg)
        self.evaluation_seconds = Histogram("evaluation_seconds", "Time spent folding and evaluating segments "
                                            "(per batch or per event).", namespace=ns, registry=reg,
                                            buckets=EVALUATION_BUCKETS)
        self.sink_batch_seconds = Histogram("sink_batch_seconds", "Duration of one ClickHouse batch write, "
                                            "retries included.", namespace=ns, registry=reg,
                                            buckets=SINK_SECONDS_BUCKETS)
        self.sink_batch_rows = Histogram("sink_batch_rows", "Rows in one ClickHouse batch write.", namespace=ns,
                                         registry=reg, buckets=SINK_ROWS_BUCKETS)
        # Costs that scale with the number of batches rather than of events show up as small batches
        # (benchmarks/bench_latency.py); the profile stage's batches are evaluation_seconds_count.
        self.stage_batches = Counter("stage_batches", "Batches handled per batched stage.", ["stage"], namespace=ns,
                                     registry=reg)
        self.stage_records = Counter("stage_records", "Records in the batches of each batched stage.", ["stage"],
                                     namespace=ns, registry=reg)

    # counters ------------------------------------------------------------------------

    def event_in(self, topic: str, count: int = 1) -> None:
        """``count`` messages were read from input ``topic`` (ingest agent, per batch)."""
        if count:
            self.events_in.labels(topic=topic).inc(count)

    def dead_letter(self, source: str, error_class: str) -> None:
        """A message of ``source`` (topic) became a dead letter of ``error_class``."""
        self.dead_letters.labels(source=source, error_class=error_class).inc()

    def duplicate(self, count: int = 1) -> None:
        if count:
            self.duplicates.inc(count)

    def segment_change(self, segment: str, change: str) -> None:
        self.segment_changes.labels(segment=segment, change=change).inc()

    def segment_changes_sent(self, changes: Iterable[Any]) -> None:
        """Count ``SegmentChange`` records (anything with ``segment_id`` and ``change``)."""
        for change in changes:
            self.segment_change(change.segment_id, change.change)

    def identity_conflict(self) -> None:
        self.identity_conflicts.inc()

    def merge(self) -> None:
        self.merges.inc()

    # gauges --------------------------------------------------------------------------

    def set_consumer_lag(self, topic: str, partition: int, lag: int) -> None:
        """Lag of one partition: end offset minus next offset to read. Never negative (the
        embedded broker under-reports end offsets, DESIGN §3)."""
        self.consumer_lag.labels(topic=topic, partition=str(partition)).set(max(0, lag))

    def forget_partition(self, topic: str, partition: int) -> None:
        """Drop the lag series of a partition this worker no longer holds (after a rebalance)."""
        try:
            self.consumer_lag.remove(topic, str(partition))
        except KeyError:
            pass

    def set_timers_pending(self, count: int) -> None:
        self.timers_pending.set(count)

    def set_profiles_in_store(self, count: int) -> None:
        self.profiles_in_store.set(count)

    # histograms ----------------------------------------------------------------------

    def evaluation(self, seconds: float) -> None:
        self.evaluation_seconds.observe(seconds)

    @contextmanager
    def time_evaluation(self) -> Iterator[None]:
        """``with metrics.time_evaluation(): ...`` around a batch's fold and evaluation."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.evaluation(time.perf_counter() - start)

    def sink_batch(self, seconds: float, rows: int) -> None:
        """One ClickHouse batch of ``rows`` rows was written in ``seconds``."""
        self.sink_batch_seconds.observe(seconds)
        self.sink_batch_rows.observe(rows)

    def stage_batch_counter(self, stage: str) -> Callable[[int], None]:
        """A callback counting one handled batch of ``size`` records of a batched ``stage``."""
        batches, records = self.stage_batches.labels(stage=stage), self.stage_records.labels(stage=stage)

        def on_batch(size: int) -> None:
            batches.inc()
            records.inc(size)
        return on_batch

    # exposition ----------------------------------------------------------------------

    def on_scrape(self, refresh: Callable[[Metrics], None]) -> None:
        """Call ``refresh(self)`` before every ``render()`` (e.g. to set lag from the consumer)."""
        self._refreshers.append(refresh)

    def render(self) -> tuple[bytes, str]:
        """The Prometheus text exposition and its content type."""
        for refresh in self._refreshers:
            try:
                refresh(self)
            except Exception:  # noqa: BLE001 - a failing refresher must not break the scrape
                log.exception("metrics refresh %r failed", refresh)
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
