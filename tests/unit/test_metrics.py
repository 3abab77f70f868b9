from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from pipeline.metrics import Metrics
from pipeline.segments.membership import SegmentChange


def samples(metrics):
    body, content_type = metrics.render()
    assert content_type.startswith("text/plain")
    found = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def test_counters_after_increments():
    m = Metrics()
    m.event_in("clickstream", 3)
    m.event_in("clickstream")
    m.event_in("pos", 2)
    m.event_in("crm", 0)  # nothing read: no series
    m.dead_letter("pos", "schema")
    m.dead_letter("pos", "schema")
    m.duplicate(2)
    m.segment_changes_sent([SegmentChange("c1", "buyers", "entered", 1, 1, "e1"),
                            SegmentChange("c2", "buyers", "entered", 1, 1, "e2"),
                            SegmentChange("c1", "lapsed", "exited", 1, 2, "time")])
    m.identity_conflict()
    m.merge()
    m.merge()
    got = samples(m)
    assert got[("pipeline_events_in_total", (("topic", "clickstream"),))] == 4
    assert got[("pipeline_events_in_total", (("topic", "pos"),))] == 2
    assert ("pipeline_events_in_total", (("topic", "crm"),)) not in got
    assert got[("pipeline_dead_letters_total", (("error_class", "schema"), ("source", "pos")))] == 2
    assert got[("pipeline_duplicates_total", ())] == 2
    assert got[("pipeline_segment_changes_total", (("change", "entered"), ("segment", "buyers")))] == 2
    assert got[("pipeline_segment_changes_total", (("change", "exited"), ("segment", "lapsed")))] == 1
    assert got[("pipeline_identity_conflicts_total", ())] == 1
    assert got[("pipeline_merges_total", ())] == 2


def test_gauges_and_histograms():
    m = Metrics()
    m.set_consumer_lag("clickstream", 0, 12)
    m.set_consumer_lag("clickstream", 1, -5)  # the embedded broker under-reports end offsets
    m.set_timers_pending(7)
    m.set_profiles_in_store(42)
    with m.time_evaluation():
        pass
    m.evaluation(0.002)
    m.sink_batch(0.3, 1500)
    got = samples(m)
    assert got[("pipeline_consumer_lag", (("partition", "0"), ("topic", "clickstream")))] == 12
    assert got[("pipeline_consumer_lag", (("partition", "1"), ("topic", "clickstream")))] == 0
    assert got[("pipeline_timers_pending", ())] == 7
    assert got[("pipeline_profiles_in_store", ())] == 42
    assert got[("pipeline_evaluation_seconds_count", ())] == 2
    assert got[("pipeline_sink_batch_seconds_sum", ())] == 0.3
    assert got[("pipeline_sink_batch_rows_count", ())] == 1
    assert got[("pipeline_sink_batch_rows_bucket", (("le", "2500.0"),))] == 1
    assert got[("pipeline_sink_batch_rows_bucket", (("le", "1000.0"),))] == 0
    m.forget_partition("clickstream", 1)
    m.forget_partition("clickstream", 9)  # never set: no error
    assert ("pipeline_consumer_lag", (("partition", "1"), ("topic", "clickstream"))) not in samples(m)


def test_each_instance_has_its_own_registry():
    a, b = Metrics(), Metrics()  # a second one would collide on a shared registry
    a.merge()
    assert samples(a)[("pipeline_merges_total", ())] == 1
    assert samples(b)[("pipeline_merges_total", ())] == 0
    assert REGISTRY.get_sample_value("pipeline_merges_total") is None  # never the global registry
    assert ("custom_merges_total", ()) in samples(Metrics(namespace="custom"))


def test_scrape_callbacks_refresh_gauges_and_a_failing_one_does_not_break_the_scrape():
    m = Metrics()
    pending = [3]
    m.on_scrape(lambda metrics: metrics.set_timers_pending(pending[0]))
    m.on_scrape(lambda metrics: 1 / 0)
    assert samples(m)[("pipeline_timers_pending", ())] == 3
    pending[0] = 5
    assert samples(m)[("pipeline_timers_pending", ())] == 5
