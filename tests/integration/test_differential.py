"""Differential test: the compiled Python predicate and ClickHouse agree on segment membership.

For profiles generated with Hypothesis (edge values included: NULLs, zeros, negatives where the
column type allows them, empty arrays and maps, non-ASCII strings, timestamps on and around unit
boundaries and around ``now``) and several ``now`` instants, every predicate below is evaluated

* in Python, by ``compile_where(text)(row, now)``, and
* in ClickHouse (chDB, the real engine in-process), by
  ``SELECT customer_id FROM db.customer_profiles FINAL WHERE <text>`` over the same rows, inserted
  with the ``customer_profiles`` DDL and ``profile_row`` (so the column types are the product's).

Any difference in membership fails the test with the predicate, the instant and the row.

How ``now()`` is bound: ClickHouse's ``now()`` is the query's wall clock, a ``DateTime`` (whole
seconds). The test rewrites each ``now()`` call in the text (found with sqlglot's ClickHouse
tokenizer, so only real calls are touched and the rest of the text is sent byte for byte) into
``toDateTime('<now, floored to the second>', 'UTC')`` — the same type and value ClickHouse's own
``now()`` would have at that instant. The Python side gets the un-truncated instant (milliseconds
included), as the pipeline's clock gives it.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlglot.dialects.clickhouse import ClickHouse
from sqlglot.tokens import TokenType

from pipeline.errors import DefinitionError
from pipeline.segments.columns import PROFILE_COLUMNS
from pipeline.segments.compiler import Compiled, compile_where
from pipeline.sinks.clickhouse import PROFILE_COLUMN_NAMES, PROFILE_TYPES, migrate, profile_row

# The instants the predicates are evaluated at: milliseconds that ClickHouse's now() drops, the end
# of a leap day, the last half-second of a year, the first instant of a month after February.
NOWS = [
    datetime(2026, 11, 23, 12, 0, 0, 0, tzinfo=UTC),
    datetime(2024, 2, 29, 23, 59, 59, 999000, tzinfo=UTC),
    datetime(2025, 12, 31, 23, 59, 59, 500000, tzinfo=UTC),
    datetime(2026, 3, 1, 0, 0, 0, 0, tzinfo=UTC),
]

DATEDIFF_UNITS = ("second", "minute", "hour", "day", "week", "month", "year")

PREDICATES = [
    # comparisons, on every column type
    "orders_count >= 1",
    "nps <= 6",
    "nps = 10 OR nps == 9",
    "nps != 7 AND nps <> 8",
    "lifetime_value > 100.5",
    "avg_order_value < spend_30d",
    "orders_30d > -1",
    "orders_count > -1",
    "orders_count = orders_30d",
    "support_sentiment >= 0",
    "top_category = 'books'",
    "loyalty_tier < 'h'",
    "loyalty_tier >= top_category",
    "unsubscribed = true",
    "unsubscribed",
    "consent_marketing",
    "consent_marketing = false",
    "NOT consent_marketing",
    "consent_marketing = 1",
    "last_seen_at >= first_seen_at",
    "first_seen_at < '2026-01-01 00:00:00'",
    "last_purchase_at >= '2024-02-29 23:59:59.999'",
    "updated_at = '2026-11-23 12:00:00'",
    "first_seen_at > '2026-02-01'",
    "(nps > 5) = (support_sentiment > 0)",
    # three-valued AND / OR / NOT
    "nps > 5 AND consent_marketing",
    "nps > 5 OR consent_marketing",
    "NOT (nps > 5 OR support_sentiment < 0)",
    "NOT (nps > 5 AND consent_marketing)",
    "NOT (nps > 5) OR NOT (support_sentiment < 0)",
    "orders_count AND nps",
    "support_sentiment OR consent_marketing",
    # IN / NOT IN
    "nps IN (9, 10)",
    "nps NOT IN (9, 10)",
    "loyalty_tier IN ('gold', 'silver')",
    "loyalty_tier NOT IN ('gold', '')",
    "orders_count IN (0, 2.5, 3)",
    "orders_30d IN (-1, 1)",
    "nps IN (9, NULL)",
    "nps NOT IN (1, NULL)",
    "lifetime_value IN (0, 10.5)",
    "first_seen_at IN ('2026-01-01 00:00:00', '2024-02-29 23:59:59.999')",
    "consent_marketing IN (1)",
    # BETWEEN
    "orders_count BETWEEN 1 AND 3",
    "nps BETWEEN 0 AND 6",
    "nps NOT BETWEEN 7 AND 8",
    "last_seen_at BETWEEN '2026-01-01 00:00:00' AND now()",
    "support_sentiment BETWEEN -0.5 AND nps",
    "orders_30d BETWEEN 3 AND 1",
    # IS [NOT] NULL, isNull, isNotNull
    "nps IS NULL",
    "last_purchase_at IS NOT NULL",
    "(nps > 5) IS NULL",
    "isNull(nps)",
    "isNotNull(consent_marketing) AND isNull(loyalty_tier)",
    "isNull(category_affinity['x'] + nps)",
    # LIKE / ILIKE (UTF-8 aware, escapes)
    "loyalty_tier LIKE 'go%'",
    "loyalty_tier LIKE '_o%'",
    "loyalty_tier NOT LIKE '%ld'",
    "loyalty_tier ILIKE 'GO%'",
    "top_category ILIKE '%é%'",
    "top_category LIKE '_'",
    "top_category LIKE '%\\%%'",
    "top_category LIKE '%\\_%'",
    "loyalty_tier LIKE ''",
    "loyalty_tier LIKE '%'",
    "loyalty_tier NOT ILIKE '%L%'",
    # arithmetic: division by zero, modulo, unsigned minus, unary minus
    "spend_30d / orders_30d > 10",
    "spend_30d / orders_30d < 10",
    "lifetime_value / 0 > 0",
    "orders_count / orders_30d < 1",
    "0 / orders_count = 0",
    "spend_30d / orders_30d",
    "orders_count % 3 = 1",
    "orders_30d % 4 = -1",
    "orders_30d % -4 = 1",
    "orders_count % -4 = 1",
    "unsubscribed % 2 = 1",
    "lifetime_value % 2.5 < 1",
    "nps % 2 = 0",
    "events_count - orders_count < 0",
    "orders_count * 2 + 1 > events_count",
    "-orders_30d > 3",
    "-nps < -5",
    "-orders_count < 0",
    "nps + 1 > 7",
    "support_sentiment * 10 >= nps",
    "unsubscribed + 1 = 2",
    "orders_count - 5 < 0",
    # now() and INTERVAL arithmetic
    "last_seen_at > now() - INTERVAL 1 DAY",
    "last_seen_at <= now()",
    "updated_at >= now()",
    "updated_at = now()",
    "first_seen_at < now() - INTERVAL 30 DAY",
    "last_purchase_at > now() - INTERVAL 2 WEEK",
    "nps_at + INTERVAL 90 MINUTE > now()",
    "last_seen_at > now() - INTERVAL 3600 SECOND",
    "updated_at > now() - INTERVAL 1 HOUR",
    "last_seen_at - INTERVAL 1 DAY > first_seen_at + INTERVAL 2 HOUR",
    "now() > '2026-01-01 00:00:00'",
    "now() - INTERVAL 7 DAY < last_purchase_at",
    # map subscripts (a missing key is 0), mapContains
    "category_affinity['cookware'] >= 0.3",
    "category_affinity['missing'] = 0",
    "category_affinity[top_category] > 0.5",
    "category_affinity[top_category] = 0",
    "category_affinity[''] < 0",
    "mapContains(category_affinity, 'cookware')",
    "mapContains(category_affinity, top_category)",
    # has / hasAny / hasAll / length / empty / notEmpty
    "has(survey_interests, 'cooking')",
    "has(anonymous_ids, top_category)",
    "NOT has(segments, 'buyers')",
    "hasAny(survey_motivations, ['price', 'health'])",
    "hasAll(survey_interests, ['cooking', 'health'])",
    "hasAll(segments, [])",
    "hasAny(segments, [])",
    "hasAny(survey_interests, survey_motivations)",
    "hasAll(survey_interests, survey_motivations)",
    "length(survey_interests) >= 2",
    "length(loyalty_tier) = 4",
    "length(top_category) > 1",
    "length(category_affinity) > 1",
    "empty(segments)",
    "notEmpty(category_affinity)",
    "empty(loyalty_tier)",
    "notEmpty(top_category)",
    # if, coalesce
    "if(nps IS NULL, 0, nps) = 0",
    "if(consent_marketing, orders_count, -1) > 0",
    "if(nps > 8, 'promoter', loyalty_tier) = 'promoter'",
    "if(orders_count > 0, nps, 0) > 5",
    "coalesce(nps, 5) = 5",
    "coalesce(support_sentiment, nps, 0) > 0",
    "coalesce(loyalty_tier, top_category, '') = ''",
    "coalesce(last_purchase_at, first_seen_at) > now() - INTERVAL 7 DAY",
    "coalesce(consent_marketing, false)",
    # lower / upper (ASCII in ClickHouse), abs
    "lower(loyalty_tier) = 'gold'",
    "upper(top_category) LIKE '%É%'",
    "upper(top_category) = 'É'",
    "lower(top_category) = top_category",
    "abs(orders_30d) > 5",
    "abs(support_sentiment) < 0.25",
    "abs(nps - 5) <= 2",
    # greatest / least (NULL arguments are skipped)
    "greatest(nps, 3) = 3",
    "least(nps * 1.0, support_sentiment) < 0",
    "greatest(first_seen_at, last_purchase_at) > now() - INTERVAL 30 DAY",
    "least(loyalty_tier, top_category) = 'books'",
    "greatest(orders_30d, orders_90d, 0) > 2",
    "least(orders_count, orders_30d) < 0",
    "greatest(orders_count - 0, nps) > 3",
    "greatest(coalesce(nps, 0), orders_count) > 3",
    "least(if(nps > 5, orders_count, NULL), 4) < 4",
    "greatest(nps * 1.0, support_sentiment) IS NULL",
    "greatest(lifetime_value, 0.5, 1) > 1",
    # toDateTime('…')
    "last_seen_at > toDateTime('2026-11-01 00:00:00')",
    "first_seen_at < toDateTime('2024-03-01')",
    "dateDiff('day', toDateTime('2026-01-01 00:00:00'), last_seen_at) > 300",
    "now() > toDateTime('2026-01-01 00:00:00') + INTERVAL 1 WEEK",
    "toDateTime('2026-11-23 11:59:59.999') = updated_at",
    "last_seen_at < '2026-11-23 11:59:59.5'",
    # NULL literals
    "nps = NULL",
    "NULL",
    "NOT (NULL AND orders_count > 0)",
    # the example from DESIGN §4.3
    "has(survey_interests, 'cooking_classes') AND category_affinity['cookware'] >= 0.3 "
    "AND dateDiff('day', last_seen_at, now()) <= 30",
]
for _unit in DATEDIFF_UNITS:
    PREDICATES += [
        f"dateDiff('{_unit}', last_seen_at, now()) <= 1",
        f"dateDiff('{_unit}', first_seen_at, last_seen_at) = 1",
        f"dateDiff('{_unit}', nps_at, now()) = 0",
        f"dateDiff('{_unit}', now(), last_purchase_at) >= -1",
    ]


# --- binding now() -------------------------------------------------------------------------


def clickhouse_now(now: datetime) -> str:
    """The ClickHouse value of ``now()`` at ``now``: a DateTime, whole seconds, UTC."""
    return f"toDateTime('{now.astimezone(UTC):%Y-%m-%d %H:%M:%S}', 'UTC')"


def bind_now(text: str, now: datetime) -> str:
    """``text`` with every ``now()`` call replaced by ``clickhouse_now(now)``, nothing else changed."""
    tokens = ClickHouse().tokenize(text)
    out, last = [], 0
    for i, token in enumerate(tokens):
        if (token.token_type is TokenType.VAR and token.text.lower() == "now" and i + 2 < len(tokens)
                and tokens[i + 1].token_type is TokenType.L_PAREN
                and tokens[i + 2].token_type is TokenType.R_PAREN):
            out.append(text[last:token.start])
            out.append(clickhouse_now(now))
            last = tokens[i + 2].end + 1
    out.append(text[last:])
    return "".join(out)


def test_bind_now_touches_only_now_calls():
    at = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    text = "dateDiff('day', last_seen_at, now ( )) < 3 AND loyalty_tier = 'now()' AND NOW() > first_seen_at"
    assert bind_now(text, at) == (
        "dateDiff('day', last_seen_at, toDateTime('2026-01-02 03:04:05', 'UTC')) < 3 "
        "AND loyalty_tier = 'now()' AND toDateTime('2026-01-02 03:04:05', 'UTC') > first_seen_at"
    )


# --- profiles ------------------------------------------------------------------------------

MS = timedelta(milliseconds=1)
BOUNDARIES = [
    datetime(2024, 2, 29, tzinfo=UTC), datetime(2024, 3, 1, tzinfo=UTC), datetime(2025, 1, 1, tzinfo=UTC),
    datetime(2026, 1, 1, tzinfo=UTC), datetime(2026, 2, 1, tzinfo=UTC), datetime(2026, 3, 1, tzinfo=UTC),
    datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 11, 23, tzinfo=UTC),  # a Monday
    datetime(2026, 11, 22, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC), datetime(2027, 1, 1, tzinfo=UTC),
    datetime(2026, 11, 23, 11, 0, tzinfo=UTC), datetime(2026, 11, 23, 11, 59, tzinfo=UTC),
]
for _now in NOWS:
    _floor = _now.replace(microsecond=0)
    BOUNDARIES += [_now, _floor] + [_floor - timedelta(days=d) for d in (1, 7, 14, 30, 31, 365)]
    BOUNDARIES += [_floor - timedelta(hours=1), _floor - timedelta(minutes=90), _floor + timedelta(minutes=90)]
OFFSETS_MS = [0, 0, 1, -1, 500, -500, 999, -999, 1000, -1000, 59_999, -60_000, 3_600_000, -86_400_000, 86_399_999]
LOW_MS = int(datetime(2020, 1, 1, tzinfo=UTC).timestamp() * 1000)
HIGH_MS = int(datetime(2030, 1, 1, tzinfo=UTC).timestamp() * 1000)

timestamps = st.one_of(
    st.builds(lambda base, offset: base + offset * MS, st.sampled_from(BOUNDARIES), st.sampled_from(OFFSETS_MS)),
    st.integers(LOW_MS, HIGH_MS).map(lambda ms: datetime.fromtimestamp(ms / 1000, tz=UTC)),
).map(lambda dt: dt.replace(microsecond=dt.microsecond // 1000 * 1000))  # DateTime64(3)

WORDS = ["gold", "Gold", "GOLD", "silver", "books", "cookware", "", "go%ld", "g_ld", "é", "É", "éa", "straße",
         "a%b", "a_b", "a\\b", "x"]
strings = st.one_of(st.sampled_from(WORDS), st.text(alphabet="goldGOLbé%_É\\", max_size=5))
ITEMS = ["cooking", "cooking_classes", "health", "price", "buyers", "books", "", "Cooking", "é"]
MAP_KEYS = ["cookware", "books", "", "toys", "Cookware", "é", "gold", "x"]
floats = st.one_of(st.sampled_from([0.0, -0.0, 0.3, 0.29999999999999999, 0.25, 1.0, -1.0, 2.5, 10.0, 100.5, -3.5]),
                   st.floats(-1e6, 1e6, allow_nan=False, allow_infinity=False))
small_floats = st.one_of(st.sampled_from([0.0, -0.0, 0.25, -0.25, -0.5, 0.5, 1.0, -1.0]),
                         st.floats(-1, 1, allow_nan=False))
unsigned = st.one_of(st.sampled_from([0, 0, 1, 2, 3, 4, 5, 9, 10]), st.integers(0, 10**6))
signed = st.one_of(st.sampled_from([0, 0, 1, -1, 2, 3, -3, -4, 5, 8, 9, 10]), st.integers(-10**6, 10**6))


def _strategy(name: str, ch_type: str) -> st.SearchStrategy[Any]:
    nullable = ch_type.startswith("Nullable(")
    inner = ch_type[len("Nullable("):-1] if nullable else ch_type
    base: st.SearchStrategy[Any]
    if name == "nps":
        base = st.integers(-2, 12)
    elif name == "support_sentiment":
        base = small_floats
    elif inner == "String":
        base = strings
    elif inner == "Array(String)":
        base = st.lists(st.sampled_from(ITEMS), max_size=4)
    elif inner == "Map(String, Float64)":
        base = st.dictionaries(st.sampled_from(MAP_KEYS), floats, max_size=3)
    elif inner == "UInt64":
        base = unsigned
    elif inner == "Int64":
        base = signed
    elif inner == "Float64":
        base = floats
    elif inner == "Bool":
        base = st.booleans()
    elif inner.startswith("DateTime64(3"):
        base = timestamps
    else:
        raise AssertionError(f"no strategy for {name} {ch_type}: extend the differential test")
    return st.one_of(st.none(), base) if nullable else base


def _default(ch_type: str) -> Any:
    defaults = {"Array(String)": [], "Map(String, Float64)": {}, "UInt64": 0, "Int64": 0, "Float64": 0.0,
                "Bool": False, "String": "", "DateTime64(3, 'UTC')": NOWS[0]}
    return None if ch_type.startswith("Nullable(") else defaults[ch_type]


def _profile_values(used: set[str]) -> st.SearchStrategy[dict[str, Any]]:
    """Generated values for the columns the predicates read (fixed values for the others: fewer
    choices per profile lets Hypothesis build batches of dozens of profiles quickly)."""
    return st.fixed_dictionaries({
        name: _strategy(name, ch_type) if name in used else st.just(_default(ch_type))
        for name, (_, _, ch_type) in PROFILE_COLUMNS.items() if name != "customer_id"
    })


profile_values = _profile_values({c for text in PREDICATES for c in compile_where(text).columns})


# --- the two evaluations -------------------------------------------------------------------


@pytest.fixture(scope="module")
def database(chdb_client):
    name = f"diff_{uuid.uuid4().hex[:10]}"
    migrate(chdb_client, name)
    yield name
    chdb_client.command(f"DROP DATABASE IF EXISTS {name}")
    print(f"\ndifferential checks (profile x predicate x now): {CHECKS}")  # shown with -s


def load(client: Any, database: str, values: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Replace the table's rows by ``values`` (customer ids c0000, c0001, …); return the rows."""
    rows = [{**v, "customer_id": f"c{i:04d}"} for i, v in enumerate(values)]
    client.command(f"TRUNCATE TABLE {database}.customer_profiles")
    client.insert(f"{database}.customer_profiles", [profile_row(r) for r in rows],
                  column_names=PROFILE_COLUMN_NAMES, column_type_names=PROFILE_TYPES)
    return rows


def clickhouse_members(client: Any, database: str, cases: list[tuple[str, datetime]]) -> list[set[str]]:
    """For each (text, now): the customer ids ``WHERE <text>`` selects at ``now`` (one round trip)."""
    selects = [f"SELECT {i} AS k, customer_id FROM {database}.customer_profiles FINAL WHERE {bind_now(text, now)}\n"
               for i, (text, now) in enumerate(cases)]
    try:
        result = client.query(" UNION ALL ".join(selects)).result_rows
    except Exception:  # noqa: BLE001 - find the predicate ClickHouse refused and say which
        refused = []
        for (text, now), select in zip(cases, selects, strict=True):
            try:
                client.query(select)
            except Exception as exc:  # noqa: BLE001
                refused.append(f"{text!r} at {now.isoformat()}: {str(exc).splitlines()[0]}")
        assert not refused, "ClickHouse refuses what the compiler accepts:\n" + "\n".join(refused)
        raise
    members: list[set[str]] = [set() for _ in cases]
    for k, customer_id in result:
        members[k].add(customer_id)
    return members


def python_members(compiled: Compiled, rows: list[dict[str, Any]], now: datetime) -> set[str]:
    return {r["customer_id"] for r in rows if compiled(r, now)}


def check(client: Any, database: str, texts: list[str], values: list[dict[str, Any]]) -> int:
    """Compare both sides for every text, now and row; return the number of checks made."""
    rows = load(client, database, values)
    compiled = {text: compile_where(text) for text in texts}
    texts = list(compiled)
    cases = [(text, now) for text in texts for now in NOWS]
    expected = clickhouse_members(client, database, cases)
    by_id = {r["customer_id"]: r for r in rows}
    disagreements = []
    for (text, now), in_clickhouse in zip(cases, expected, strict=True):
        in_python = python_members(compiled[text], rows, now)
        if in_python != in_clickhouse:
            customer_id = sorted(in_python ^ in_clickhouse)[0]
            side = "Python only" if customer_id in in_python else "ClickHouse only"
            row = {k: v for k, v in by_id[customer_id].items() if k in compiled[text].columns}
            disagreements.append(f"{text!r} at now={now.isoformat()}: member in {side}: {row!r}")
    assert not disagreements, f"{len(disagreements)} disagreements:\n" + "\n".join(disagreements[:40])
    return len(cases) * len(rows)


CHECKS = {"fixed": 0, "generated": 0, "rejected": 0}


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(values=st.lists(profile_values, min_size=30, max_size=50))
def test_fixed_predicates_agree_with_clickhouse(chdb_client, database, values):
    CHECKS["fixed"] += check(chdb_client, database, PREDICATES, values)


# --- expressions generated from a small typed grammar ----------------------------------------

INT_COLUMNS = ["orders_count", "orders_30d", "nps", "events_count"]
FLOAT_COLUMNS = ["lifetime_value", "spend_30d", "support_sentiment", "category_affinity['cookware']",
                 "category_affinity[top_category]"]
DT_COLUMNS = ["first_seen_at", "last_seen_at", "last_purchase_at", "updated_at", "now()"]
STR_COLUMNS = ["loyalty_tier", "top_category", "'gold'", "''", "'é'"]
ARR_COLUMNS = ["survey_interests", "segments", "['cooking', 'health']"]


def _numbers(depth: int) -> st.SearchStrategy[str]:
    ints = st.one_of(st.sampled_from(INT_COLUMNS), st.sampled_from(["0", "1", "3", "-2", "NULL",
                                                                    "if(nps > 5, orders_count, NULL)"]))
    floats_ = st.one_of(st.sampled_from(FLOAT_COLUMNS), st.sampled_from(["0.5", "-1.5", "0.0"]))
    leaves = st.one_of(ints, floats_, st.sampled_from(DATEDIFF_UNITS).flatmap(
        lambda u: st.tuples(st.sampled_from(DT_COLUMNS), st.sampled_from(DT_COLUMNS)).map(
            lambda ab: f"dateDiff('{u}', {ab[0]}, {ab[1]})")))
    if depth <= 0:
        return leaves
    sub = _numbers(depth - 1)
    return st.one_of(
        leaves,
        st.tuples(sub, st.sampled_from(["+", "-", "*", "/"]), sub).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        st.tuples(sub, st.sampled_from(["3", "-4", "2.5"])).map(lambda t: f"({t[0]} % {t[1]})"),
        sub.map(lambda x: f"-({x})"),
        sub.map(lambda x: f"abs({x})"),
        st.tuples(_booleans(depth - 1), sub, sub).map(lambda t: f"if({t[0]}, {t[1]}, {t[2]})"),
        st.tuples(sub, sub).map(lambda t: f"coalesce({t[0]}, {t[1]})"),
        st.tuples(st.sampled_from(["greatest", "least"]), ints, ints).map(lambda t: f"{t[0]}({t[1]}, {t[2]})"),
        st.tuples(st.sampled_from(["greatest", "least"]), floats_, floats_).map(lambda t: f"{t[0]}({t[1]}, {t[2]})"),
        st.sampled_from(["length(survey_interests)", "length(loyalty_tier)", "length(category_affinity)"]),
    )


def _datetimes() -> st.SearchStrategy[str]:
    return st.one_of(
        st.sampled_from(DT_COLUMNS),
        st.tuples(st.sampled_from(DT_COLUMNS), st.sampled_from(["+", "-"]), st.integers(0, 40),
                  st.sampled_from(["SECOND", "MINUTE", "HOUR", "DAY", "WEEK"])).map(
            lambda t: f"{t[0]} {t[1]} INTERVAL {t[2]} {t[3]}"),
        st.sampled_from(["toDateTime('2026-11-23 12:00:00')", "toDateTime('2024-02-29')",
                         "coalesce(last_purchase_at, first_seen_at)", "greatest(first_seen_at, nps_at)"]),
    )


def _strings() -> st.SearchStrategy[str]:
    return st.one_of(st.sampled_from(STR_COLUMNS),
                     st.tuples(st.sampled_from(["lower", "upper"]), st.sampled_from(STR_COLUMNS)).map(
                         lambda t: f"{t[0]}({t[1]})"),
                     st.sampled_from(["coalesce(loyalty_tier, top_category)", "if(nps > 5, loyalty_tier, 'x')"]))


def _booleans(depth: int) -> st.SearchStrategy[str]:
    cmp = st.sampled_from(["=", "!=", "<", "<=", ">", ">="])
    leaves = st.one_of(
        st.tuples(_numbers(min(depth, 1)), cmp, _numbers(min(depth, 1))).map(lambda t: f"{t[0]} {t[1]} {t[2]}"),
        st.tuples(_datetimes(), cmp, _datetimes()).map(lambda t: f"{t[0]} {t[1]} {t[2]}"),
        st.tuples(_strings(), cmp, _strings()).map(lambda t: f"{t[0]} {t[1]} {t[2]}"),
        st.tuples(_numbers(0), st.sampled_from(["IN (0, 1, 9)", "NOT IN (0, -1)", "BETWEEN 0 AND 5",
                                                "NOT BETWEEN -1 AND 1", "IS NULL", "IS NOT NULL"])).map(" ".join),
        st.tuples(_strings(), st.sampled_from(["LIKE 'g%'", "NOT LIKE '%_'", "ILIKE '%É%'", "IN ('gold', '')",
                                               "IS NULL"])).map(" ".join),
        st.tuples(st.sampled_from(["has", "hasAny", "hasAll"]), st.sampled_from(ARR_COLUMNS),
                  st.sampled_from(ARR_COLUMNS + STR_COLUMNS)).filter(
            lambda t: (t[0] == "has") != t[2].startswith(("[", "s"))).map(lambda t: f"{t[0]}({t[1]}, {t[2]})"),
        st.sampled_from(["empty(segments)", "notEmpty(loyalty_tier)", "mapContains(category_affinity, top_category)",
                         "isNull(consent_marketing)", "isNotNull(nps)", "consent_marketing", "unsubscribed",
                         "NULL", "true"]),
    )
    if depth <= 0:
        return leaves
    sub = _booleans(depth - 1)
    return st.one_of(
        leaves,
        st.tuples(sub, st.sampled_from(["AND", "OR"]), sub).map(lambda t: f"({t[0]} {t[1]} {t[2]})"),
        sub.map(lambda x: f"NOT ({x})"),
    )


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example])
@given(texts=st.lists(_booleans(2), min_size=10, max_size=10),
       values=st.lists(profile_values, min_size=20, max_size=30))
def test_generated_expressions_agree_with_clickhouse(chdb_client, database, texts, values):
    accepted = []
    for text in texts:
        try:
            compile_where(text)
        except DefinitionError:
            CHECKS["rejected"] += 1  # refused at validation (a form ClickHouse refuses or reads differently)
            continue
        accepted.append(text)
    if accepted:
        CHECKS["generated"] += check(chdb_client, database, accepted, values)
