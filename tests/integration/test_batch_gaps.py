"""A fetch that skips records (as the embedded broker does when another connection's batch is not
yet stored: docs/reliability.md defect 5) is fetched again: the stage's handler sees every record."""

import asyncio

from aiokafka import AIOKafkaConsumer
from kafka import KafkaProducer

from pipeline.broker import batches
from pipeline.broker.batches import BatchConsumer
from pipeline.broker.topics import TopicSpec, ensure_topics

SKIPPED = range(60, 80)


class _SkippingConsumer(AIOKafkaConsumer):
    """A real aiokafka consumer whose first answer holding offsets 60-79 leaves them out, as the
    embedded broker's fetch does when it serves a later batch before an earlier one is stored."""

    skipped = False

    async def getmany(self, *partitions, timeout_ms=0, max_records=None):
        fetched = await super().getmany(*partitions, timeout_ms=timeout_ms, max_records=max_records)
        if not _SkippingConsumer.skipped:
            for tp, records in fetched.items():
                kept = [r for r in records if r.offset not in SKIPPED]
                if len(kept) < len(records):
                    fetched[tp] = kept
                    _SkippingConsumer.skipped = True
        return fetched


def _consume_all(broker, unique, monkeypatch, *, refetches):
    topic = f"gaps-{unique}"
    ensure_topics([broker.bootstrap], [TopicSpec(topic)], partitions=1)
    producer = KafkaProducer(bootstrap_servers=broker.bootstrap)
    for i in range(200):
        producer.send(topic, value=str(i).encode(), partition=0)
    producer.flush()
    producer.close()
    _SkippingConsumer.skipped = False
    monkeypatch.setattr(batches, "AIOKafkaConsumer", _SkippingConsumer)
    monkeypatch.setattr(batches, "GAP_REFETCHES", refetches)

    async def main():
        seen = []
        stage = BatchConsumer(bootstrap_servers=[broker.bootstrap], group_id=f"gaps-{unique}-{refetches}",
                              topics=[topic], max_records=50, max_wait_s=0.05)

        async def handle(records):
            seen.extend(r.offset for r in records)

        task = asyncio.create_task(stage.run(handle))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 60
        while loop.time() < deadline and (len(seen) < 200 and not (seen and seen[-1] == 199)):
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)  # anything more would come now
        await stage.stop()
        await task
        return seen, stage

    return asyncio.run(main())


def test_a_fetch_that_skipped_records_is_fetched_again(broker, unique, monkeypatch):
    seen, stage = _consume_all(broker, unique, monkeypatch, refetches=batches.GAP_REFETCHES)
    assert _SkippingConsumer.skipped
    assert sorted(seen) == list(range(200))
    assert seen == sorted(seen)  # in order, each once
    assert stage.gaps_refetched >= 1 and stage.gaps_accepted == 0


def test_without_fetching_again_the_skipped_records_are_lost(broker, unique, monkeypatch):
    """The same run with the guard off: what the guard is for (and that the fault is injected)."""
    seen, stage = _consume_all(broker, unique, monkeypatch, refetches=0)
    assert _SkippingConsumer.skipped
    assert sorted(seen) == [i for i in range(200) if i not in SKIPPED]
    assert stage.gaps_accepted == 1
