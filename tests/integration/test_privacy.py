"""No raw email anywhere the product writes (issue 8 item 6): after a mixed run with emails in
identify events, receipts and malformed messages, every topic the pipeline writes (outputs,
internal topics, the tables' changelogs) and every ClickHouse table is scanned for the raw
addresses, in any case. Inputs are the producers' own and are not scanned."""

import json
import time
from itertools import islice

from kafka import KafkaConsumer, TopicPartition

from pipeline.broker import topics as t
from pipeline.generate import traffic
from pipeline.identity import hash_email
from tests.integration.faults import Feeder, Input, Worker, sql, wait_done


def test_no_raw_email_in_any_topic_or_table(broker, unique, tmp_path):
    start = int(time.time() * 1000) - 30 * 86_400_000
    messages = [Input(m.topic, m.key, m.value)
                for m in islice(traffic(customers=60, seed=4, start_ms=start, step_ms=60_000, extended=True), 1500)]
    emails = {r["email"] for r in (json.loads(m.value) for m in messages) if isinstance(r.get("email"), str)}
    assert len(emails) > 10
    # malformed messages carrying an address must not leak it through the dead letters either
    leaky = [f'{{"event_id": "bad{i}", "email": "Leaky.Person{i}@Example.org", "type": "teleport"'.encode()
             for i in range(5)]
    messages += [Input("clickstream", None, value) for value in leaky]
    emails |= {f"Leaky.Person{i}@Example.org" for i in range(5)}
    needles = {e.lower().encode() for e in emails} | {e.encode() for e in emails}

    with Worker(broker, tmp_path, unique, clock="wall") as worker:
        feeder = Feeder(worker)
        feeder.send(enumerate(messages))
        feeder.flush()
        run_id = feeder.send_markers(0)  # wall clock: the watermark plays no part
        feeder.close()
        wait_done(worker, run_id, timeout=240)
        # (segment-definitions holds definitions and sentinels only, no customer data)
        names = [t.CUSTOMER_EVENTS, t.FOLDED_EVENTS, t.SEGMENT_CHANGES, t.PROFILE_UPDATES, t.DEAD_LETTERS, t.CONTROL]
        scanned = 0
        topics = [worker.topic(n) for n in names] + [f"app-{unique}-{c}-changelog" for c in ("profiles", "aliases")]
        for topic in topics:
            consumer = KafkaConsumer(bootstrap_servers=broker.bootstrap, consumer_timeout_ms=500)
            partitions = consumer.partitions_for_topic(topic) or set()
            assert partitions, topic
            consumer.assign([TopicPartition(topic, p) for p in partitions])
            consumer.seek_to_beginning()
            for record in consumer:
                blob = (record.key or b"") + (record.value or b"") + b"".join(v or b"" for _, v in record.headers or ())
                scanned += 1
                assert not any(n in blob.lower() for n in needles), (topic, blob[:300])
            consumer.close()
        assert scanned > 1000
        worker.stop()
    tables = [r["name"] for r in sql(worker, "SHOW TABLES FROM segments")]
    assert {"customer_profiles", "events", "dead_letters", "segment_changes"} <= set(tables)
    for table in tables:
        if table.endswith("_mv"):
            continue
        dump = json.dumps(sql(worker, f"SELECT * FROM segments.{table}")).lower()
        assert not any(n.decode() in dump for n in needles), table
    hashes = {r["email_hash"] for r in sql(worker, "SELECT DISTINCT email_hash FROM segments.events "
                                                   "WHERE email_hash IS NOT NULL")}
    assert hashes and hashes <= {hash_email(e) for e in emails}  # kept, but only as hashes
