"""Read side: live cohorts, segment sizes and read-only SQL on the product's tables."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Any

READ_ONLY = re.compile(r"^\s*(SELECT|WITH|SHOW|DESCRIBE|DESC|EXPLAIN|EXISTS)\b", re.IGNORECASE)


def _aware(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def cohort(client: Any, database: str, segment_id: str) -> list[dict[str, Any]]:
    """The current members of a segment, oldest first, with their anonymous ids."""
    result = client.query(
        f"""SELECT m.customer_id, m.since, p.anonymous_ids, m.profile_version
FROM (SELECT customer_id, since, profile_version FROM {database}.segment_membership FINAL
      WHERE segment_id = %(segment)s AND is_member = 1) AS m
LEFT JOIN (SELECT customer_id, anonymous_ids FROM {database}.customer_profiles FINAL) AS p
  ON p.customer_id = m.customer_id
ORDER BY m.since, m.customer_id""",
        parameters={"segment": segment_id},
    )
    return [
        {"customer_id": row[0], "since": _aware(row[1]), "anonymous_ids": list(row[2] or []),
         "profile_version": int(row[3])}
        for row in result.result_rows
    ]


def segment_sizes(client: Any, database: str) -> dict[str, int]:
    result = client.query(
        f"SELECT segment_id, countIf(is_member = 1) FROM {database}.segment_membership FINAL GROUP BY segment_id"
    )
    return {row[0]: int(row[1]) for row in result.result_rows}


def run_sql(client: Any, query: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """A read-only query; anything but SELECT/WITH/SHOW/DESCRIBE/EXPLAIN is refused."""
    from pipeline.errors import PipelineError

    if not READ_ONLY.match(query) or ";" in query.strip().rstrip(";"):
        raise PipelineError("only one read-only statement (SELECT, WITH, SHOW, DESCRIBE, EXPLAIN) is allowed")
    result = client.query(query.strip().rstrip(";"), settings={"readonly": 1} if not _is_chdb(client) else None)
    return list(result.column_names), [tuple(_aware(v) for v in row) for row in result.result_rows]


def _is_chdb(client: Any) -> bool:
    return type(client).__name__ == "ChdbClient"
