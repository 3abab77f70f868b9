"""The store scan the tick uses to check profiles (after an assignment or a new definition set),
on the memory store of a real app: each partition's profiles come back once, in key order, chunk
by chunk, and a profile added during a scan does not disturb it."""

from pipeline.app import PartitionedStore, create_app, partition_for_key
from pipeline.segments.definitions import load_segments
from tests.agents.harness import agent_settings

PARTITIONS = 4


def test_a_scan_returns_each_profile_of_the_partition_once_in_key_order(tmp_path):
    settings = agent_settings(tmp_path, partitions=PARTITIONS)
    app = create_app(settings, load_segments(None), live_definitions=False)
    table = app.tables["profiles"]
    keys = [f"c{i:04d}".encode() for i in range(500)]
    for key in keys:
        table.data[key] = b"v" + key
    store = PartitionedStore(table)
    for partition in range(PARTITIONS):
        want = sorted(k for k in table.data.keys() if partition_for_key(k, PARTITIONS) == partition)
        got: list[bytes] = []
        after = None
        while True:
            chunk = store.scan(partition, PARTITIONS, after, 7)
            got += [k for k, _ in chunk]
            assert all(v == table.data[k] for k, v in chunk)
            if len(chunk) < 7:
                break
            after = chunk[-1][0]
            table.data[b"new-" + after] = b"x"  # folded meanwhile: no need to check it in this scan
        assert got == want
        assert len(want) > 50
