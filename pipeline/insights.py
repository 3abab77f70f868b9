"""`pipeline insights` and `pipeline cohort --at`: read-only analytical queries on ClickHouse.

**Insights: the why behind a behavioural cohort.** For a segment, its current members
(``segment_membership FINAL``, ``is_member = 1``) joined with their profiles
(``customer_profiles FINAL``), against the whole population (every profile):

- NPS: the latest score of each profile that has one (``nps IS NOT NULL``): counts per score
  0-10, detractors (0-6), passives (7-8), promoters (9-10), the mean, and the NPS score
  (% promoters − % detractors), for the cohort and for everyone;
- the stated ``survey_interests`` and ``survey_motivations``: for each value, how many
  *respondents* (profiles with ``surveys_count >= 1``) of the cohort stated it and their share
  of the cohort's respondents, the same overall, and the **lift** = share in cohort / share
  overall (above 1: the cohort states it more often than everyone does). Respondents, not all
  profiles, are the base so that a cohort that answers surveys more often does not look more
  interested in everything.

**Cohort as of a past instant** (``cohort_at``): ``segment_changes`` is the append-only log of
entries and exits; a customer was a member at ``T`` when their last change of that segment
with ``changed_at <= T`` (ordered by ``changed_at``, then ``profile_version``) is ``entered``;
``since`` is that change's time. Erased customers' changes are deleted (DESIGN §4.1), so they
appear in no past cohort either. ``anonymous_ids`` are today's.

Every query is a SELECT; on a ClickHouse server they run with ``readonly = 1``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pipeline.errors import PipelineError

DETRACTORS = range(0, 7)
PASSIVES = range(7, 9)
PROMOTERS = range(9, 11)


@dataclass(frozen=True)
class NpsSummary:
    responses: int
    detractors: int
    passives: int
    promoters: int
    mean: float | None  # None when nobody gave a score
    score: float | None  # % promoters - % detractors, -100..100
    histogram: dict[int, int] = field(default_factory=dict)  # score -> profiles


def nps_summary(histogram: Mapping[int, int]) -> NpsSummary:
    """Detractors / passives / promoters, mean and NPS score of a histogram (score -> count)."""
    counts = {int(score): int(n) for score, n in histogram.items() if n}
    for given in counts:
        if not 0 <= given <= 10:
            raise ValueError(f"an NPS score is 0..10, got {given}")
    total = sum(counts.values())
    detractors = sum(n for s, n in counts.items() if s in DETRACTORS)
    passives = sum(n for s, n in counts.items() if s in PASSIVES)
    promoters = sum(n for s, n in counts.items() if s in PROMOTERS)
    mean = sum(s * n for s, n in counts.items()) / total if total else None
    score = 100.0 * (promoters - detractors) / total if total else None
    return NpsSummary(total, detractors, passives, promoters, mean, score,
                      {s: counts.get(s, 0) for s in range(11)})


@dataclass(frozen=True)
class Lift:
    kind: str  # interest or motivation
    value: str
    cohort_count: int
    cohort_share: float
    overall_count: int
    overall_share: float
    lift: float | None  # None when nobody overall stated it


def lift_rows(kind: str, counts: Mapping[str, tuple[int, int]], cohort_base: int, overall_base: int) -> list[Lift]:
    """One ``Lift`` per value from ``value -> (count in cohort, count overall)`` and the bases
    (respondents in the cohort, respondents overall); highest lift first, then most stated."""
    rows = []
    for value, (in_cohort, overall) in counts.items():
        if in_cohort > overall:
            raise ValueError(f"{kind} {value!r}: {in_cohort} in the cohort but {overall} overall")
        cohort_share = in_cohort / cohort_base if cohort_base else 0.0
        overall_share = overall / overall_base if overall_base else 0.0
        lift = cohort_share / overall_share if overall_share else None
        rows.append(Lift(kind, value, in_cohort, cohort_share, overall, overall_share, lift))
    return sorted(rows, key=lambda r: (-(r.lift if r.lift is not None else -1.0), -r.cohort_count, r.value))


@dataclass(frozen=True)
class Insights:
    segment_id: str
    members: int  # current members (segment_membership)
    cohort_profiles: int  # members with a profile row
    cohort_respondents: int
    population: int  # every profile
    respondents: int
    nps_cohort: NpsSummary
    nps_overall: NpsSummary
    interests: list[Lift]
    motivations: list[Lift]


def _members(database: str) -> str:
    return (f"(SELECT customer_id FROM {database}.segment_membership FINAL "
            "WHERE segment_id = %(segment)s AND is_member = 1)")


def queries(database: str) -> dict[str, str]:
    """The SQL of ``insights`` (parameter ``segment``), by name."""
    members = _members(database)
    profiles = f"{database}.customer_profiles FINAL"
    stated = ("SELECT value, toUInt64(countIf(in_cohort)) AS cohort_count, count() AS overall_count\n"
              "FROM (SELECT arrayJoin(arrayDistinct({column})) AS value, customer_id IN {members} AS in_cohort\n"
              "      FROM {profiles} WHERE surveys_count >= 1)\n"
              "GROUP BY value ORDER BY value")
    return {
        "members": f"SELECT count() FROM {members}",
        "bases": (f"SELECT count() AS population, countIf(surveys_count >= 1) AS respondents,\n"
                  f"       countIf(customer_id IN {members}) AS cohort_profiles,\n"
                  f"       countIf(surveys_count >= 1 AND customer_id IN {members}) AS cohort_respondents\n"
                  f"FROM {profiles}"),
        "nps": (f"SELECT nps, countIf(customer_id IN {members}) AS cohort_count, count() AS overall_count\n"
                f"FROM {profiles} WHERE nps IS NOT NULL GROUP BY nps ORDER BY nps"),
        "interests": stated.format(column="survey_interests", members=members, profiles=profiles),
        "motivations": stated.format(column="survey_motivations", members=members, profiles=profiles),
    }


def _query(client: Any, sql: str, parameters: Mapping[str, Any]) -> list[tuple[Any, ...]]:
    settings = None if type(client).__name__ == "ChdbClient" else {"readonly": 1}
    return [tuple(row) for row in client.query(sql, parameters=dict(parameters), settings=settings).result_rows]


def insights(client: Any, database: str, segment_id: str) -> Insights:
    """The NPS and stated interests / motivations of a segment's members against everyone."""
    sql = queries(database)
    params = {"segment": segment_id}
    members = int(_query(client, sql["members"], params)[0][0])
    population, respondents, cohort_profiles, cohort_respondents = (int(v) for v in _query(client, sql["bases"],
                                                                                           params)[0])
    nps_rows = _query(client, sql["nps"], params)
    stated = {}
    for kind in ("interests", "motivations"):
        counts = {str(value): (int(c), int(o)) for value, c, o in _query(client, sql[kind], params)}
        stated[kind] = lift_rows(kind[:-1], counts, cohort_respondents, respondents)
    return Insights(
        segment_id=segment_id, members=members, cohort_profiles=cohort_profiles,
        cohort_respondents=cohort_respondents, population=population, respondents=respondents,
        nps_cohort=nps_summary({int(s): int(c) for s, c, _ in nps_rows}),
        nps_overall=nps_summary({int(s): int(o) for s, _, o in nps_rows}),
        interests=stated["interests"], motivations=stated["motivations"],
    )


def insights_json(result: Insights) -> dict[str, Any]:
    """``Insights`` as plain JSON (histogram keys as strings)."""
    data = asdict(result)
    for name in ("nps_cohort", "nps_overall"):
        data[name]["histogram"] = {str(k): v for k, v in data[name]["histogram"].items()}
    return data


def plot(result: Insights, path: Path) -> None:
    """A PNG: lift per stated interest / motivation (bars, 1 = like everyone) and the NPS
    histograms of the cohort and of everyone (share of respondents per score). Needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PipelineError("--plot needs matplotlib, which is not installed (pip install matplotlib)") from None
    rows = [r for r in (*result.interests, *result.motivations) if r.lift is not None]
    figure, (left, right) = plt.subplots(1, 2, figsize=(13, max(4.0, 0.35 * len(rows) + 1.5)))
    labels = [f"{r.kind}: {r.value}" for r in rows]
    left.barh(labels, [r.lift or 0.0 for r in rows],
              color=["tab:green" if (r.lift or 0) >= 1 else "tab:red" for r in rows])
    left.axvline(1.0, color="black", linewidth=1)
    left.invert_yaxis()
    left.set_xlabel("lift (share in cohort / share overall)")
    left.set_title(f"{result.segment_id}: stated interests and motivations")
    scores = list(range(11))
    for summary, name, offset in ((result.nps_cohort, "cohort", -0.2), (result.nps_overall, "everyone", 0.2)):
        total = summary.responses or 1
        right.bar([s + offset for s in scores], [summary.histogram.get(s, 0) / total for s in scores], width=0.4,
                  label=f"{name} (n={summary.responses}, mean {summary.mean:.1f})" if summary.mean is not None
                  else f"{name} (n=0)")
    right.set_xticks(scores)
    right.set_xlabel("NPS score")
    right.set_ylabel("share of respondents")
    right.set_title("NPS")
    right.legend(loc="upper left", fontsize="small")
    figure.tight_layout()
    try:
        figure.savefig(path, format="png", dpi=110)
    except OSError as exc:
        raise PipelineError(f"cannot write {path}: {exc.strerror or exc}") from None
    finally:
        plt.close(figure)


# --- cohort as of a past instant ----------------------------------------------------------------

def cohort_at_query(database: str) -> str:
    """The SQL of ``cohort_at`` (parameters ``segment``, ``at_ms``)."""
    return f"""SELECT c.customer_id, c.since, p.anonymous_ids
FROM (SELECT customer_id,
             argMax(toString(change), (changed_at, profile_version)) AS last_change,
             argMax(changed_at, (changed_at, profile_version)) AS since
      FROM {database}.segment_changes FINAL
      WHERE segment_id = %(segment)s AND changed_at <= fromUnixTimestamp64Milli(toInt64(%(at_ms)s), 'UTC')
      GROUP BY customer_id
      HAVING last_change = 'entered') AS c
LEFT JOIN (SELECT customer_id, anonymous_ids FROM {database}.customer_profiles FINAL) AS p
  ON p.customer_id = c.customer_id
ORDER BY c.since, c.customer_id"""


def _aware(value: Any) -> Any:
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def cohort_at(client: Any, database: str, segment_id: str, at: datetime) -> list[dict[str, Any]]:
    """The members of a segment as of ``at`` (aware), reconstructed from ``segment_changes``."""
    if at.tzinfo is None:
        raise ValueError("cohort_at needs a timezone-aware datetime")
    rows = _query(client, cohort_at_query(database), {"segment": segment_id, "at_ms": int(at.timestamp() * 1000)})
    return [{"customer_id": r[0], "since": _aware(r[1]), "anonymous_ids": list(r[2] or [])} for r in rows]



# --- one profile --------------------------------------------------------------------------------

def find_profile(client: Any, database: str, ident: str) -> dict[str, Any] | None:
    """The stored profile (``customer_profiles FINAL``) of a customer id, or of the profile
    holding ``ident`` among its anonymous ids, or (for an e-mail address) the profile keyed by
    its hash; None when there is none. Date-times are timezone-aware (UTC)."""
    from pipeline.identity import EMAIL_PREFIX, hash_email

    keys = [ident] + ([EMAIL_PREFIX + hash_email(ident)] if "@" in ident else [])
    result = client.query(
        f"SELECT * FROM {database}.customer_profiles FINAL "
        "WHERE customer_id IN %(keys)s OR has(anonymous_ids, %(ident)s) "
        "ORDER BY customer_id IN %(keys)s DESC, customer_id LIMIT 1",
        parameters={"keys": keys, "ident": ident})
    if not result.result_rows:
        return None
    return {name: _aware(value) for name, value in zip(result.column_names, result.result_rows[0], strict=True)}


def memberships(client: Any, database: str, customer_id: str) -> dict[str, datetime]:
    """segment id -> member since, for the customer's current memberships."""
    rows = _query(client, f"SELECT segment_id, since FROM {database}.segment_membership FINAL "
                          "WHERE customer_id = %(customer)s AND is_member = 1 ORDER BY segment_id",
                  {"customer": customer_id})
    return {str(segment): _aware(since) for segment, since in rows}
