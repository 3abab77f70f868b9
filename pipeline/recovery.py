"""Complete table recovery on brokers that under-report a partition's end (the embedded Tansu).

faust restores a table by reading each changelog partition up to the end offset that
ListOffsets gives (``Recovery._build_highwaters``), then declares the worker recovered. Tansu
0.6 answers ListOffsets(latest) with the base offset of the partition's last record batch + 1,
not its last offset + 1: with a last batch of 40 records at offsets 80..119 it says 81. The
high watermark in its Fetch responses is right (120). A worker restarted on memory://, or
taking partitions over on a fresh RocksDB data dir, was therefore ready without the records of
each changelog's last batch (benchmarks/README.md, "Profiles: size, fold rate, recovery").

The fix corrects the number, nothing else: after faust asked for the ends, one Fetch per
changelog partition from the reported end (a short-lived consumer, no group, same brokers and
credentials as faust's) reads the high watermark, and faust recovers up to the larger of the
two. On a broker that reports ends correctly the two agree and nothing changes. Nothing is
written to the changelogs, so there is no reserved key to hide from customers.

faust offers no hook for the highwater: ``Recovery._build_highwaters`` (faust-streaming 0.15.3)
is overridden in a subclass, installed through faust's public ``TableManager`` setting
(``faust.App(..., TableManager=CompleteTableManager)``). Recheck the override on a faust upgrade.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from faust.tables import TableManager
from faust.tables.recovery import Recovery
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth, server_list
from faust.types import TP

log = logging.getLogger(__name__)

PROBE_TIMEOUT_SECONDS = 15.0


async def fetched_ends(bootstrap_servers: list[str], reported: Mapping[TP, int], *,
                       timeout: float = PROBE_TIMEOUT_SECONDS, **options: Any) -> dict[TP, int]:
    """The high watermark a Fetch answers for each partition, fetching from its ``reported`` end
    (at most its last batch is read). Partitions without an answer within ``timeout`` are left out."""
    from aiokafka import AIOKafkaConsumer
    from aiokafka import TopicPartition as KafkaPartition

    if not reported:
        return {}
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap_servers, enable_auto_commit=False,
                                # a correct broker has nothing past the end: do not wait for data
                                fetch_max_wait_ms=10, auto_offset_reset="earliest", **options)
    await consumer.start()
    try:
        partitions = {KafkaPartition(tp.topic, tp.partition): tp for tp in reported}
        consumer.assign(list(partitions))
        for partition, tp in partitions.items():
            consumer.seek(partition, max(reported[tp], 0))
        ends: dict[TP, int] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while len(ends) < len(partitions) and loop.time() < deadline:
            await consumer.getmany(timeout_ms=100)  # the records are not needed, the watermark is
            for partition, tp in partitions.items():
                highwater = consumer.highwater(partition)
                if highwater is not None:
                    ends[tp] = highwater
        return ends
    finally:
        await consumer.stop()


class CompleteRecovery(Recovery):
    """faust's recovery, reading every changelog partition to its real end (see the module doc)."""

    async def _build_highwaters(self, consumer: Any, tps: set[TP], destination: Any, title: str) -> None:
        await super()._build_highwaters(consumer, tps, destination, title)
        if not tps or self.app.in_transaction:  # transactional: faust reads up to the last stable offset
            return
        conf = self.app.conf
        # faust keeps end - 1 (or -1 for an unknown end) as the offset of the last record to read
        reported = {tp: max(destination[tp], -1) + 1 for tp in tps}
        ends = await fetched_ends(server_list(conf.broker_consumer, 9092), reported,
                                  timeout=min(PROBE_TIMEOUT_SECONDS, conf.broker_request_timeout / 2),
                                  **credentials_to_aiokafka_auth(conf.broker_credentials, conf.ssl_context))
        short = {tp: (reported[tp], end) for tp, end in ends.items() if end > reported[tp]}
        for tp, (_, end) in short.items():
            destination[tp] = end - 1
        if short:
            log.info("%s changelog ends corrected from the fetch high watermark (ListOffsets under-reports): %s",
                     title, ", ".join(f"{tp.topic}[{tp.partition}] {was} -> {end}"
                                      for tp, (was, end) in sorted(short.items())))
        unanswered = sorted(set(tps) - set(ends))
        if unanswered:
            log.warning("%s changelog partitions without a fetch high watermark, recovered up to ListOffsets only: %s",
                        title, ", ".join(f"{tp.topic}[{tp.partition}]" for tp in unanswered))


class CompleteTableManager(TableManager):
    """faust's table manager with ``CompleteRecovery`` (``faust.App(..., TableManager=...)``)."""

    @property
    def recovery(self) -> Recovery:
        if self._recovery is None:
            self._recovery = CompleteRecovery(self.app, self, beacon=self.beacon, loop=self.loop)
        return self._recovery
