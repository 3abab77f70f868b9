import pytest

from pipeline.cohorts import run_sql
from pipeline.errors import PipelineError


@pytest.mark.parametrize("query", ["DROP TABLE segments.segment_changes", "INSERT INTO t VALUES (1)",
                                   "SELECT 1; DROP TABLE t", "ALTER TABLE t DELETE WHERE 1"])
def test_only_read_only_statements_reach_clickhouse(query):
    with pytest.raises(PipelineError, match="read-only"):
        run_sql(None, query)
