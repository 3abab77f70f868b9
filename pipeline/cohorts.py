"""Read side: live cohorts, segment sizes and read-only SQL on the product's tables."""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

READ_ONLY = re.compile(r"^\s*(SELECT|WITH|SHOW|DESCRIBE|DESC|EXPLAIN|EXISTS)\b", re.IGNORECASE)


def _aware(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _aware_column(values: Sequence[Any]) -> Sequence[Any]:
    """A DateTime column as aware datetimes (already so when the client honoured tz_mode)."""
    if values and isinstance(values[0], datetime) and values[0].tzinfo is None:
        return [_aware(v) for v in values]
    return values


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MILLISECOND = timedelta(milliseconds=1)


def cohort(client: Any, database: str, segment_id: str, *, anonymous_ids: bool = True, limit: int | None = None,
           after: tuple[datetime, str] | None = None) -> list[dict[str, Any]]:
    """The current members of a segment, oldest first (member since, then customer id): dicts of
    ``customer_id``, ``since`` (aware UTC), ``anonymous_ids`` and ``profile_version``.

    ``limit`` and ``after`` (the ``(since, customer_id)`` of the last member of the previous page)
    give one keyset page: only that page is read, sorted and joined. ``anonymous_ids=False`` skips
    the profile join (the list is then ``[]``): the members alone are one read of
    ``segment_membership`` by its ordering key.
    """
    parameters: dict[str, Any] = {"segment": segment_id}
    page = ""
    if after is not None:
        since, customer_id = after
        aware = since if since.tzinfo is not None else since.replace(tzinfo=UTC)
        parameters.update(after_ms=(aware - _EPOCH) // _MILLISECOND, after_id=customer_id)
        page += " AND (since, customer_id) > (fromUnixTimestamp64Milli(%(after_ms)s, 'UTC'), %(after_id)s)"
    if limit is not None:
        parameters["limit"] = int(limit)
        page += " ORDER BY since, customer_id LIMIT %(limit)s"
    members = f"""SELECT customer_id, since, profile_version FROM {database}.segment_membership FINAL
WHERE segment_id = %(segment)s AND is_member = 1{page}"""
    if not anonymous_ids:
        query = f"{members}{'' if limit is not None else ' ORDER BY since, customer_id'}"
    else:
        # The profile side of the join is built into a hash table: for a page, only its members'
        # profiles are read (a primary-key lookup); for the whole cohort, every profile's
        # (customer_id, anonymous_ids) under FINAL, which measured cheaper than filtering it.
        only_page = f" WHERE customer_id IN (SELECT customer_id FROM ({members}))" if limit is not None else ""
        query = f"""SELECT m.customer_id, m.since, m.profile_version, p.anonymous_ids
FROM ({members}) AS m
LEFT JOIN (SELECT customer_id, anonymous_ids FROM {database}.customer_profiles FINAL{only_page}) AS p
  ON p.customer_id = m.customer_id
ORDER BY m.since, m.customer_id"""
    # columns, aware datetimes converted by clickhouse-connect in C, one dict literal per member:
    # per-row tuples, per-cell tz fixes and list copies were most of this function's time
    columns = client.query(query, parameters=parameters, tz_mode="aware").result_columns
    if not columns or not columns[0]:
        return []
    ids, since_column, versions = columns[0], _aware_column(columns[1]), columns[2]
    anon = columns[3] if anonymous_ids else [[] for _ in ids]
    return [{"customer_id": c, "since": s, "anonymous_ids": a, "profile_version": v}
            for c, s, a, v in zip(ids, since_column, anon, versions, strict=True)]


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
