"""The profile agent on its own: customer-events records in, what it sends and stores out.

Each test builds the product's app (``create_app``, memory store, event-time clock so that
instants are the events' own) and drives ``fold_profiles`` through faust's ``test_context()``.
Identity commands the agent sends to ``customer-events`` are fed back to it (``loop_back``), as
the broker would deliver them.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

from pipeline import codecs, profile_encoding
from pipeline.broker import topics as t
from pipeline.control import Marker
from pipeline.linking import HOPS_HEADER, MAX_HOPS, OP_HEADER
from tests.agents.harness import FoldAgent, agent_settings, ingested, ms, run


def purchase(event_id: str, at: str, total: float = 20.0, **ids: str) -> dict:
    return {"event_id": event_id, "transaction_id": event_id, "occurred_at": at, "store_id": "s1",
            "channel": "store", "kind": "purchase", "total": total, "currency": "EUR",
            "items": [{"sku": "b1", "category": "books", "quantity": 1, "unit_price": total}], **ids}


def nps(event_id: str, at: str, score: int, **ids: str) -> dict:
    return {"event_id": event_id, "response_id": event_id, "survey_id": "nps-q1", "source": "nps",
            "occurred_at": at, "nps": score, **ids}


def click(event_id: str, at: str, kind: str = "page_view", **ids: str) -> dict:
    return {"event_id": event_id, "occurred_at": at, "type": kind, "session_id": "s-1", "url": "/cookware",
            "product_id": "p1", "category": "cookware", "price": 30.0, **ids}


def moves(changes: list[dict]) -> list[tuple[str, str, str, str]]:
    return [(c["customer_id"], c["change"], c["segment_id"], c["cause"]) for c in changes]


def test_a_purchase_enters_segments_sends_the_profile_and_stores_it(settings):
    async def scenario() -> None:
        async with FoldAgent(settings) as fold:
            await fold.event("pos", purchase("tx1", "2026-03-01T10:00:00Z", customer_id="C1"))

            assert moves(fold.changes()) == [("C1", "entered", "buyers", "tx1"),
                                             ("C1", "entered", "recent_buyers", "tx1")]
            assert {(c["changed_at"], c["profile_version"]) for c in fold.changes()} == {
                (ms("2026-03-01T10:00:00+00:00"), 1)}
            assert all(r.key == b"C1" for r in fold.sent(t.SEGMENT_CHANGES))

            [update] = fold.sent(t.PROFILE_UPDATES)
            row = codecs.decode_profile(update.value)
            assert (update.key, row["orders_count"], row["lifetime_value"], row["segments"], row["version"]) == (
                b"C1", 1, 20.0, ["buyers", "recent_buyers"], 1)
            [folded] = fold.sent(t.FOLDED_EVENTS)
            assert [e["event_id"] for e in codecs.decode_profile(folded.value)] == ["tx1"]

            state = fold.profile("C1")
            assert state is not None
            assert (state.version, sorted(state.segments), state.orders_count) == (1, ["buyers", "recent_buyers"], 1)
            # one changelog message for the table, holding what the table holds, sent only once every
            # output was acknowledged (a crash in between redelivers the event, never loses its changes)
            [changelog] = fold.changelog("profiles")
            assert changelog.key == b"C1" and profile_encoding.decode(changelog.value) == state
            outputs = [i for i, r in enumerate(fold.producer.sent) if r.topic.startswith(settings.topic_prefix)]
            assert len(outputs) == 4 and not changelog.unacknowledged & set(outputs)
    run(scenario())


def test_a_redelivered_event_is_ignored(settings):
    async def scenario() -> None:
        async with FoldAgent(settings) as fold:
            await fold.event("pos", purchase("tx1", "2026-03-01T10:00:00Z", customer_id="C1"))
            before = list(fold.producer.sent)
            await fold.event("pos", purchase("tx1", "2026-03-01T10:00:00Z", customer_id="C1"))

            assert fold.producer.sent == before  # no change, no profile update, no changelog message
            state = fold.profile("C1")
            assert state is not None and (state.version, state.events_count, state.orders_count) == (1, 1, 1)
    run(scenario())


def test_an_event_moves_a_customer_from_one_segment_to_another(settings):
    async def scenario() -> None:
        async with FoldAgent(settings) as fold:
            await fold.event("surveys", nps("r1", "2026-03-01T10:00:00Z", 10, customer_id="C1"))
            await fold.event("surveys", nps("r2", "2026-03-08T10:00:00Z", 3, customer_id="C1"))

            assert moves(fold.changes()) == [("C1", "entered", "promoters", "r1"),
                                             ("C1", "exited", "promoters", "r2"),
                                             ("C1", "entered", "detractors", "r2")]
            assert [c["profile_version"] for c in fold.changes()] == [1, 2, 2]
            state = fold.profile("C1")
            assert state is not None and list(state.segments) == ["detractors"] and state.version == 2
            assert [codecs.decode_profile(r.value)["segments"] for r in fold.sent(t.PROFILE_UPDATES)] == [
                ["promoters"], ["detractors"]]
    run(scenario())


def test_a_window_that_passed_exits_at_its_instant_before_the_next_event(settings):
    async def scenario() -> None:
        async with FoldAgent(settings) as fold:
            await fold.event("pos", purchase("tx1", "2026-03-01T10:00:00Z", customer_id="C1"))
            await fold.event("clickstream", click("c1", "2026-04-15T10:00:00Z", customer_id="C1"))

            exits = [c for c in fold.changes() if c["change"] == "exited"]
            # 30 days after the order the window (now - 30 d, now] no longer holds it
            assert [(c["segment_id"], c["cause"], c["changed_at"]) for c in exits] == [
                ("recent_buyers", "time", ms("2026-03-31T10:00:00+00:00"))]
            assert fold.changes().index(exits[0]) == 2  # after the two entries, nothing in between
            state = fold.profile("C1")
            assert state is not None and sorted(state.segments) == ["buyers"]
            assert state.page_views_count == 1 and state.events_count == 2
    run(scenario())


def test_an_identify_links_the_anonymous_profile_and_merges_it(settings):
    async def scenario() -> None:
        async with FoldAgent(settings) as fold:
            await fold.event("clickstream", click("c1", "2026-03-01T10:00:00Z", "add_to_cart", anonymous_id="A"))
            assert moves(fold.changes()) == [("anon:A", "entered", "cart_abandoners", "c1")]

            await fold.event("crm", {"event_id": "i1", "occurred_at": "2026-03-02T10:00:00Z", "type": "identify",
                                     "customer_id": "C1", "anonymous_id": "A"})
            [link] = fold.sent(t.CUSTOMER_EVENTS)
            assert link.key == b"anon:A" and link.headers[OP_HEADER] == b"link"
            assert await fold.loop_back() == 2  # the link, then the merge it sends to C1

            assert moves(fold.changes()[1:]) == [("anon:A", "exited", "cart_abandoners", "merge"),
                                                 ("C1", "entered", "cart_abandoners", "merge")]
            alias = fold.alias("anon:A")
            assert alias is not None and alias.to == "C1"
            assert fold.profile("anon:A") is None
            survivor = fold.profile("C1")
            assert survivor is not None
            assert (survivor.anonymous_ids, survivor.cart_adds_count, survivor.events_count) == (["A"], 1, 2)
            tombstones = [r for r in fold.sent(t.PROFILE_UPDATES) if r.value is None]
            assert [(r.key, r.headers[OP_HEADER]) for r in tombstones] == [(b"anon:A", b"merge")]

            # a later anonymous event follows the alias to the customer
            await fold.event("clickstream", click("c2", "2026-03-03T10:00:00Z", anonymous_id="A"))
            forwarded = fold.sent(t.CUSTOMER_EVENTS)[-1]
            assert (forwarded.key, forwarded.headers[HOPS_HEADER]) == (b"C1", b"1")
            assert await fold.loop_back() == 1
            assert fold.profile("anon:A") is None
            survivor = fold.profile("C1")
            assert survivor is not None and survivor.page_views_count == 1 and survivor.events_count == 3
    run(scenario())


def test_a_shared_identifier_never_merges_two_crm_customers(settings):
    async def scenario() -> None:
        async with FoldAgent(settings) as fold:
            for event_id, customer in (("i1", "C1"), ("i2", "C2")):
                await fold.event("crm", {"event_id": event_id, "occurred_at": "2026-03-02T10:00:00Z",
                                         "type": "identify", "customer_id": customer, "anonymous_id": "D"})
            assert await fold.loop_back() == 2  # the two links; the second is refused, nothing follows

            alias = fold.alias("anon:D")
            assert alias is not None and alias.to == "C1"
            assert [fold.profile(c) is not None for c in ("C1", "C2")] == [True, True]
            assert [r.headers[OP_HEADER] for r in fold.sent(t.CUSTOMER_EVENTS)] == [b"link", b"link"]
            assert not any(c["cause"] == "merge" for c in fold.changes())
    run(scenario())


def test_an_identity_chain_past_the_hop_limit_is_dead_lettered(settings):
    async def scenario() -> None:
        async with FoldAgent(settings) as fold:
            await fold.event("crm", {"event_id": "i1", "occurred_at": "2026-03-02T10:00:00Z", "type": "identify",
                                     "customer_id": "C1", "anonymous_id": "A"})
            await fold.loop_back()
            click_event = fold.sent(t.FOLDED_EVENTS)  # nothing of the next event may be folded
            key, value, _ = ingested("clickstream", click("c1", "2026-03-03T10:00:00Z", anonymous_id="A"))
            assert key == b"anon:A"
            await fold.put(key, value, headers={HOPS_HEADER: str(MAX_HOPS).encode()})

            [dead] = fold.sent(t.DEAD_LETTERS)
            assert (dead.key, dead.value, dead.headers["error_class"]) == (b"C1", value, b"identity_chain")
            assert fold.sent(t.CUSTOMER_EVENTS)[-1].headers.get(OP_HEADER) == b"link"  # not forwarded
            assert fold.sent(t.FOLDED_EVENTS) == click_event
            state = fold.profile("C1")
            assert state is not None and state.page_views_count == 0
    run(scenario())


def test_an_erasure_exits_every_segment_and_forgets_the_customer(settings):
    async def scenario() -> None:
        async with FoldAgent(settings) as fold:
            await fold.event("pos", purchase("tx1", "2026-03-01T10:00:00Z", customer_id="C1", loyalty_id="L1"))
            await fold.loop_back()  # loyalty:L1 -> C1
            await fold.event("crm", {"event_id": "e1", "occurred_at": "2026-03-05T10:00:00Z",
                                     "type": "erasure_request", "customer_id": "C1"})
            erased_at = ms("2026-03-05T10:00:00+00:00")

            assert moves(fold.changes()[2:]) == [("C1", "exited", "buyers", "erasure"),
                                                 ("C1", "exited", "recent_buyers", "erasure")]
            for topic in (t.PROFILE_UPDATES, t.SEGMENT_CHANGES, t.FOLDED_EVENTS):
                last = fold.sent(topic)[-1]
                assert (last.key, last.value, last.headers.get(OP_HEADER)) == (b"C1", None, b"erase"), topic
            assert fold.profile("C1") is None
            alias = fold.alias("C1")
            assert alias is not None and alias.erased_at == erased_at
            assert fold.changelog("profiles")[-1].value is None
            # the identifiers that led to it are erased too
            erase = fold.sent(t.CUSTOMER_EVENTS)[-1]
            assert (erase.key, erase.headers[OP_HEADER]) == (b"loyalty:L1", b"erase")
            await fold.loop_back()
            loyalty = fold.alias("loyalty:L1")
            assert loyalty is not None and loyalty.erased_at == erased_at

            # an event from before the erasure, arriving late, does not bring the customer back
            before = len(fold.producer.sent)
            await fold.event("pos", purchase("tx0", "2026-03-04T10:00:00Z", customer_id="C1"))
            assert len(fold.producer.sent) == before and fold.profile("C1") is None
    run(scenario())


def test_a_batch_sends_one_profile_update_and_one_changelog_message_per_customer(tmp_path):
    async def scenario() -> None:
        async with FoldAgent(agent_settings(tmp_path, batch_size=3)) as fold:
            await fold.event("pos", purchase("tx1", "2026-03-01T10:00:00Z", customer_id="C1"), settle=False)
            await fold.event("pos", purchase("tx2", "2026-03-02T10:00:00Z", 600.0, customer_id="C1"), settle=False)
            await fold.event("pos", purchase("tx3", "2026-03-03T10:00:00Z", customer_id="C2"), settle=False)
            await fold.settle()

            assert moves(fold.changes()) == [("C1", "entered", "buyers", "tx1"),
                                             ("C1", "entered", "recent_buyers", "tx1"),
                                             ("C1", "entered", "high_value", "tx2"),
                                             ("C2", "entered", "buyers", "tx3"),
                                             ("C2", "entered", "recent_buyers", "tx3")]
            updates = {r.key: codecs.decode_profile(r.value) for r in fold.sent(t.PROFILE_UPDATES)}
            assert len(fold.sent(t.PROFILE_UPDATES)) == 2
            assert (updates[b"C1"]["version"], updates[b"C1"]["orders_count"]) == (2, 2)
            assert sorted(r.key for r in fold.changelog("profiles")) == [b"C1", b"C2"]
            c1 = fold.profile("C1")
            assert c1 is not None and (c1.version, c1.lifetime_value) == (2, 620.0)
    run(scenario())



def test_on_the_wall_clock_an_event_is_evaluated_when_it_entered_the_topic(tmp_path):
    async def scenario() -> None:
        async with FoldAgent(agent_settings(tmp_path, clock="wall")) as fold:
            now = int(time.time() * 1000)
            occurred, received = now - 3 * DAY_MS, now - 2 * DAY_MS  # handled now, a redelivery say
            await fold.event("pos", purchase("tx1", _iso(occurred), customer_id="C1"), received_ms=received)

            assert {(c["segment_id"], c["changed_at"]) for c in fold.changes()} == {
                ("buyers", received), ("recent_buyers", received)}
            state = fold.profile("C1")
            assert state is not None and state.updated_at == received and state.last_seen_at == occurred
    run(scenario())


def test_a_replay_marker_leaves_the_profile_stage_after_the_transitions_due_by_its_watermark(tmp_path):
    async def scenario() -> None:
        async with FoldAgent(agent_settings(tmp_path, partitions=2)) as fold:
            await fold.event("pos", purchase("tx1", "2026-03-01T10:00:00Z", customer_id="C1"))
            # the end marker of a replay read from one input partition, forwarded by ingest to
            # every customer-events partition (pipeline.control)
            marker = Marker("run-1", watermark=ms("2026-04-15T10:00:00+00:00"), origins=1, partitions=2,
                            origin="pos:0")
            for partition in range(2):
                await fold.put(b"", marker.encode(), headers=dict(marker.headers()), partition=partition)
            await fold.loop_back()  # the rounds between profile partitions, until none is busy

            ends = fold.markers(t.SEGMENT_CHANGES)
            assert sorted(r.partition for r in ends) == [0, 1]
            assert {Marker.decode(r.value).run_id for r in ends} == {"run-1"}
            [exit_] = [r for r in fold.sent(t.SEGMENT_CHANGES) if codecs.decode_change(r.value)["change"] == "exited"]
            change = codecs.decode_change(exit_.value)
            assert (change["segment_id"], change["cause"], change["changed_at"]) == (
                "recent_buyers", "time", ms("2026-03-31T10:00:00+00:00"))
            [end] = [r for r in ends if r.partition == exit_.partition]
            sent = fold.producer.sent
            assert sent.index(exit_) < sent.index(end)  # a subscriber sees the exit before the end
            for topic in (t.PROFILE_UPDATES, t.FOLDED_EVENTS):
                assert sorted(r.partition for r in fold.markers(topic)) == [0, 1], topic
    run(scenario())


DAY_MS = 86_400_000


def _iso(epoch_ms: int) -> str:
    return datetime.fromtimestamp(epoch_ms / 1000, UTC).isoformat()


def test_a_batch_whose_send_failed_is_folded_again_not_skipped(settings):
    """A send the broker refused fails the batch before any state is written: the agent folds the
    same batch again from the stored state (left to faust, it would restart on the next batch and
    the failed one could be committed unfolded: docs/reliability.md defect 5)."""
    from aiokafka.errors import KafkaError

    async def scenario() -> None:
        async with FoldAgent(settings) as fold:
            send = fold.producer.send
            failures = [1]

            async def refuse_once(*args, **kwargs):
                if failures[0]:
                    failures[0] -= 1
                    raise KafkaError("the broker refused the produce (injected)")
                return await send(*args, **kwargs)

            fold.producer.send = refuse_once
            await fold.event("pos", purchase("tx1", "2026-03-01T10:00:00Z", customer_id="C1"))
            await fold.event("pos", purchase("tx2", "2026-03-02T10:00:00Z", customer_id="C1"))

            assert failures == [0]  # the fault happened
            assert moves(fold.changes()) == [("C1", "entered", "buyers", "tx1"),
                                             ("C1", "entered", "recent_buyers", "tx1")]
            state = fold.profile("C1")
            assert state is not None and state.events_count == 2 and state.version == 2
            assert [u.key for u in fold.sent(t.PROFILE_UPDATES)] == [b"C1", b"C1"]

    run(scenario())
