from pipeline.linking import Alias, Command, canonical, erased_before, on_link
from pipeline.profile import new_profile


def link(alias, to, at=100):
    return Command("link", alias, to=to, at=at, cause="e1")


def test_a_new_alias_points_at_its_customer():
    out = on_link(link("anon:A", "C1"), None, None, max_links=4)
    assert out.alias == Alias("C1") and not out.absorb and not out.send


def test_an_alias_with_a_profile_is_absorbed():
    out = on_link(link("anon:A", "C1"), None, new_profile("anon:A"), max_links=4)
    assert out.alias == Alias("C1") and out.absorb


def test_the_link_turns_round_when_the_alias_is_stronger():
    out = on_link(link("loyalty:L", "email:e"), None, new_profile("loyalty:L"), max_links=4)
    assert out.alias is None and not out.absorb
    assert [(c.op, c.key, c.to) for c in out.send] == [("link", "email:e", "loyalty:L")]


def test_two_canonicals_meeting_through_an_alias_merge_the_weaker():
    # A already belongs to email:e; an event links A to C1: email:e must join C1.
    out = on_link(link("anon:A", "C1"), Alias("email:e"), None, max_links=4)
    assert out.alias == Alias("C1", 2)
    assert [(c.op, c.key, c.to) for c in out.send] == [("link", "email:e", "C1")]
    # ... and the other way round, the customer side keeps the alias.
    out = on_link(link("anon:A", "email:e"), Alias("C1"), None, max_links=4)
    assert out.alias == Alias("C1", 2) and [(c.key, c.to) for c in out.send] == [("email:e", "C1")]


def test_two_crm_customers_never_merge_and_a_shared_device_is_capped():
    assert on_link(link("anon:D", "C3"), Alias("C2"), None, max_links=4).conflict
    assert on_link(link("anon:D", "email:z"), Alias("email:y", 4), None, max_links=4).capped
    assert on_link(link("C2", "C3"), None, new_profile("C2"), max_links=4).conflict


def test_relinking_to_the_same_customer_changes_nothing():
    out = on_link(link("anon:A", "C1"), Alias("C1", 3), None, max_links=4)
    assert out.alias is None and not out.send and not out.conflict and not out.capped


def test_erased_keys_drop_older_data_and_may_link_again():
    tomb = Alias("", erased_at=500)
    assert canonical(tomb, "anon:A") == "anon:A"
    assert erased_before(tomb, 500) and not erased_before(tomb, 501) and not erased_before(None, 1)
    out = on_link(link("anon:A", "C9", at=900), tomb, None, max_links=4)
    assert out.alias == Alias("C9", erased_at=500)


def test_commands_and_aliases_round_trip():
    command = Command("merge", "C1", source="anon:A", state={"customer_id": "anon:A"}, at=5, cause="i1")
    assert Command.decode(command.encode()) == command
    assert Alias.decode(Alias("C1", 2, 7).encode()) == Alias("C1", 2, 7)
