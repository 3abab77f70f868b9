import random

from hypothesis import given
from hypothesis import strategies as st

from pipeline.timers import TimerIndex


def test_pop_due_returns_only_current_instants_in_order():
    index = TimerIndex()
    index.put(0, b"a", 30)
    index.put(0, b"b", 10)
    index.put(0, b"c", 20)
    index.put(0, b"b", 25)  # rescheduled: the old instant must not fire
    index.put(1, b"z", 5)
    assert index.pop_due(0, 24) == [(b"c", 20)]
    assert index.pop_due(0, 100) == [(b"b", 25), (b"a", 30)]
    assert index.pop_due(0, 1000) == []
    assert index.next_due(1) == 5 and len(index) == 1


def test_cancel_and_drop():
    index = TimerIndex()
    index.put(0, b"a", 10)
    index.put(0, b"a", None)
    assert index.pop_due(0, 100) == []
    index.put(2, b"x", 1)
    index.drop(2)
    assert index.pop_due(2, 100) == [] and index.partitions() == {0}


@given(st.lists(st.tuples(st.sampled_from([b"a", b"b", b"c", b"d"]), st.one_of(st.none(), st.integers(0, 50))),
                max_size=300), st.integers(0, 60))
def test_matches_a_plain_dict(operations, now):
    index = TimerIndex()
    model: dict[bytes, int] = {}
    for key, due in operations:
        index.put(0, key, due)
        if due is None:
            model.pop(key, None)
        else:
            model[key] = due
    expected = sorted(((k, d) for k, d in model.items() if d <= now), key=lambda kd: (kd[1], kd[0]))
    assert sorted(index.pop_due(0, now), key=lambda kd: (kd[1], kd[0])) == expected
    assert len(index) == len(model) - len(expected)


def test_tick_cost_does_not_depend_on_profiles_not_due():
    index = TimerIndex()
    rng = random.Random(1)
    for i in range(100_000):
        index.put(0, f"k{i}".encode(), 1_000_000 + rng.randint(0, 10**9))
    index.put(0, b"due", 5)
    assert index.pop_due(0, 10) == [(b"due", 5)]  # a heap pop, not a scan of 100k keys
