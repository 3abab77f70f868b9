"""Pure parts of `pipeline insights` (NPS buckets, lift) and the CLI's time parsing."""

from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest
import typer
from hypothesis import given
from hypothesis import strategies as st

from pipeline.cli import parse_time
from pipeline.insights import lift_rows, nps_summary


def test_nps_buckets_mean_and_score():
    scores = [0, 3, 6, 6, 7, 8, 9, 10, 10, 10]
    summary = nps_summary(Counter(scores))
    assert (summary.responses, summary.detractors, summary.passives, summary.promoters) == (10, 4, 2, 4)
    assert summary.mean == pytest.approx(6.9)
    assert summary.score == pytest.approx(0.0)
    assert summary.histogram[10] == 3 and summary.histogram[1] == 0 and len(summary.histogram) == 11


def test_nps_of_nobody():
    summary = nps_summary({})
    assert summary.responses == 0 and summary.mean is None and summary.score is None


@given(st.lists(st.integers(0, 10), min_size=1, max_size=200))
def test_nps_agrees_with_counting_the_scores(scores):
    summary = nps_summary(Counter(scores))
    assert summary.detractors == sum(1 for s in scores if s <= 6)
    assert summary.passives == sum(1 for s in scores if 7 <= s <= 8)
    assert summary.promoters == sum(1 for s in scores if s >= 9)
    assert summary.mean == pytest.approx(sum(scores) / len(scores))
    assert summary.score == pytest.approx(100 * (summary.promoters - summary.detractors) / len(scores))


def test_nps_refuses_out_of_range():
    with pytest.raises(ValueError):
        nps_summary({11: 1})


def test_lift_is_share_in_cohort_over_share_overall_highest_first():
    rows = lift_rows("interest", {"hiking": (6, 20), "reading": (1, 40), "styling": (0, 5)},
                     cohort_base=10, overall_base=100)
    assert [r.value for r in rows] == ["hiking", "reading", "styling"]
    hiking = rows[0]
    assert (hiking.cohort_share, hiking.overall_share) == (pytest.approx(0.6), pytest.approx(0.2))
    assert hiking.lift == pytest.approx(3.0)
    assert rows[1].lift == pytest.approx(0.1 / 0.4)
    assert rows[2].lift == 0.0


def test_lift_without_base_or_with_inconsistent_counts():
    rows = lift_rows("motivation", {"price": (0, 0)}, cohort_base=0, overall_base=0)
    assert rows[0].lift is None and rows[0].cohort_share == 0.0
    with pytest.raises(ValueError):
        lift_rows("motivation", {"price": (3, 2)}, cohort_base=5, overall_base=5)


def test_parse_time_iso_with_offset_z_naive_and_epoch_ms():
    assert parse_time("2026-03-01T12:00:00Z", "--at") == datetime(2026, 3, 1, 12, tzinfo=UTC)
    plus_two = parse_time("2026-03-01T14:00:00+02:00", "--at")
    assert plus_two == datetime(2026, 3, 1, 12, tzinfo=UTC) and plus_two.utcoffset() == timedelta(hours=2)
    naive = parse_time("2026-03-01 12:00", "--at")
    assert naive.tzinfo is not None and naive == datetime(2026, 3, 1, 12, tzinfo=UTC)
    assert parse_time("1772366400000", "--at") == datetime(2026, 3, 1, 12, tzinfo=UTC)


@pytest.mark.parametrize("bad", ["yesterday", "2026-13-01", "", "12:00 tomorrow"])
def test_parse_time_refuses_with_a_usage_error(bad):
    with pytest.raises(typer.Exit) as caught:
        parse_time(bad, "--at")
    assert caught.value.exit_code == 2
