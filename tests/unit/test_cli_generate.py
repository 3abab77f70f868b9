"""pipeline.generate: determinism, the basic stream's contract, and the extended stream's identities,
refunds and correlations (checked on the generated events, decoded by the real decoder)."""

import json
from collections import defaultdict
from itertools import islice

from pipeline.decode import decode
from pipeline.events import DeadLetter
from pipeline.generate import SOURCES, traffic, write_jsonl
from pipeline.identity import routing_key

START = 1_767_225_600_000  # 2026-01-01
NOW = START + 10**10


def take(n, **kwargs):
    return list(islice(traffic(start_ms=START, **kwargs), n))


def test_same_seed_same_events_other_seed_other_events():
    for extended in (False, True):
        a = take(800, customers=40, seed=5, step_ms=1000, extended=extended)
        assert a == take(800, customers=40, seed=5, step_ms=1000, extended=extended)
        assert a != take(800, customers=40, seed=6, step_ms=1000, extended=extended)


def test_basic_stream_keeps_its_shape():
    """dev.py and the fault tests rely on it: customer ids only, key = customer id, step_ms apart."""
    messages = take(2000, customers=30, seed=1, step_ms=250)
    times = []
    for m in messages:
        record = json.loads(m.value)
        assert set(record) & {"anonymous_id", "email"} == set()
        assert m.key == record["customer_id"].encode()
        times.append(record["occurred_at"])
    assert times == [START + 250 * (i + 1) for i in range(len(messages))]


def decoded(messages):
    for m in messages:
        event = decode(m.topic, m.value, now_ms=NOW)
        assert not isinstance(event, DeadLetter), (m, event)
        yield m, json.loads(m.value), event


def test_extended_stream_decodes_and_is_keyed_by_routing_key():
    kinds = set()
    for m, _, event in decoded(take(6000, customers=80, seed=3, step_ms=1000, extended=True)):
        key = routing_key(customer_id=event.customer_id, loyalty_id=event.loyalty_id, email_hash=event.email_hash,
                          anonymous_id=event.anonymous_id)
        assert m.key == key.encode()
        kinds.add((m.topic, event.type, getattr(event, "action", None)))
    types = {(topic, kind) for topic, kind, _ in kinds}
    for wanted in [("crm", "identify"), ("crm", "email"), ("crm", "support_ticket"), ("crm", "consent"),
                   ("pos", "purchase"), ("pos", "refund"), ("surveys", "survey"), ("clickstream", "search")]:
        assert wanted in types, wanted
    assert ("crm", "email", "open") in kinds and ("crm", "support_ticket", "resolved") in kinds


def test_identifiers_are_linked_by_an_identify_before_other_kinds_use_them():
    linked_anonymous = {}
    linked_email = {}
    anonymous_only_before_link = 0
    for m, _, event in decoded(take(6000, customers=80, seed=9, step_ms=1000, extended=True)):
        if m.topic == "crm" and event.type == "identify":
            assert event.customer_id and event.email_hash
            linked_email[event.email_hash] = event.customer_id
            if event.anonymous_id:
                linked_anonymous[event.anonymous_id] = event.customer_id
            continue
        if event.customer_id is None and event.anonymous_id:
            assert m.topic == "clickstream"  # only browsing is anonymous
            assert event.anonymous_id not in linked_anonymous
            anonymous_only_before_link += 1
        if event.customer_id is None and event.email_hash:
            assert m.topic == "pos" and event.email_hash in linked_email  # receipts by e-mail of known customers
        if event.customer_id and event.anonymous_id:
            assert linked_anonymous.get(event.anonymous_id) == event.customer_id
    assert anonymous_only_before_link > 0 and linked_anonymous


def test_refunds_return_an_earlier_purchase_of_the_same_customer():
    purchases = defaultdict(list)
    refunds = 0
    for m, record, event in decoded(take(8000, customers=60, seed=4, step_ms=1000, extended=True)):
        if m.topic != "pos":
            continue
        owner = event.customer_id or event.email_hash
        if event.type == "purchase":
            purchases[record.get("customer_id") or record["email"].split("@")[0]].append(event.total)
        else:
            refunds += 1
            assert event.total in purchases[owner]
            purchases[owner].remove(event.total)
    assert refunds > 0


def test_motivations_drive_spending_and_are_what_surveys_state():
    stated = defaultdict(set)
    spend = defaultdict(list)
    for m, record, event in decoded(take(20000, customers=120, seed=2, step_ms=1000, extended=True)):
        customer = record.get("customer_id") or (record.get("email") or "").split("@")[0]
        if m.topic == "surveys":
            stated[customer].update(event.motivations)
        elif m.topic == "pos" and event.type == "purchase":
            spend[customer].extend(i.unit_price for i in event.items)

    def mean_price(motivation):
        prices = [p for c, ps in spend.items() if motivation in stated[c] and len(stated[c]) <= 3 for p in ps]
        return sum(prices) / len(prices)

    assert mean_price("quality") > 1.5 * mean_price("price")


def test_write_jsonl_one_file_per_source(tmp_path):
    messages = take(500, customers=20, seed=1, step_ms=1000, extended=True)
    files = write_jsonl(messages, tmp_path / "out")
    assert set(files) == set(SOURCES)
    lines = {source: path.read_bytes().splitlines() for source, path in files.items()}
    for source in SOURCES:
        assert lines[source] == [m.value for m in messages if m.topic == source]
