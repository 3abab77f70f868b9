"""first_gap: where a partition's fetched offsets skip some (pipeline/broker/batches.py)."""

from hypothesis import given
from hypothesis import strategies as st

from pipeline.broker.batches import first_gap


def test_contiguous_offsets_have_no_gap():
    assert first_gap([5, 6, 7], 5) is None
    assert first_gap([5, 6, 7], None) is None
    assert first_gap([], 3) is None


def test_a_skip_at_the_head_or_inside_is_found():
    assert first_gap([8, 9], 5) == (0, 5)  # the fetch began past the expected offset
    assert first_gap([5, 6, 9, 10], 5) == (2, 7)
    assert first_gap([5, 6, 9, 10], None) == (2, 7)


def test_a_step_back_is_no_gap():
    assert first_gap([3, 4, 5], 9) is None  # a seek back or a redelivery


@given(st.integers(0, 10_000), st.lists(st.integers(1, 5), min_size=1, max_size=30))
def test_the_gap_found_is_the_first_missing_offset(start, steps):
    offsets = [start]
    for step in steps:
        offsets.append(offsets[-1] + step)
    gap = first_gap(offsets, start)
    holes = [i for i in range(1, len(offsets)) if offsets[i] != offsets[i - 1] + 1]
    if not holes:
        assert gap is None
    else:
        i = holes[0]
        assert gap == (i, offsets[i - 1] + 1)


def test_where_names_each_partition_s_offsets():
    from types import SimpleNamespace

    from pipeline.broker.batches import where

    records = [SimpleNamespace(topic="a", partition=0, offset=o) for o in (5, 6, 7)] + [
        SimpleNamespace(topic="b", partition=2, offset=9)]
    assert where(records) == "a[0]@5..7, b[2]@9..9"
