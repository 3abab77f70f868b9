"""The worker's HTTP API (aiohttp): health, readiness, metrics, profiles, segments, cohorts, explanations.

``build_api(backend=..., metrics=..., token=...)`` returns a ``web.Application``; the worker
starts it inside its own event loop with ``start_api`` (from a faust task) and stops it with
``stop_api``. The worker supplies the data through an ``ApiBackend``; ``WorkerBackend`` is one
built from plain callables (store lookup, clock, cohort query, segment sizes).

Routes (all GET; see ``openapi_document()`` and docs/api.md):

- ``/health`` — the process answers (always 200);
- ``/ready`` — 200 when the worker has recovered its tables and holds its partitions, else 503;
- ``/metrics`` — Prometheus text (``pipeline.metrics``);
- ``/segments``, ``/segments/{segment_id}`` — definitions and live sizes;
- ``/cohorts/{segment_id}?limit=&cursor=`` — members, cursor-paginated (keyset: no duplicates
  and no gaps while the cohort is stable);
- ``/profiles/{customer_id}`` and ``/profiles/{customer_id}/explain/{segment_id}`` — served by
  the worker that owns the key: when ``backend.owner_url(customer_id)`` names another worker,
  the request is proxied there (once: a proxied request is never proxied again);
- ``/`` and ``/dashboard`` — a self-contained HTML dashboard (inline CSS, JS and SVG; no external
  assets) that polls ``/dashboard/data``: live sizes, size over time, recent changes, dead letters;
- ``/openapi.json`` — the OpenAPI 3 description of all of the above.

Authentication: when a token is given, every route except ``/health``, ``/ready`` and
``/metrics`` (probes and Prometheus scrape without credentials) requires
``Authorization: Bearer <token>``; the token is compared in constant time and never logged or
echoed. A browser cannot send that header on a page load, so the dashboard page alone (``/``,
``/dashboard``) also accepts ``?token=<token>``; its script moves the token from the address bar
to ``sessionStorage`` and sends it as the header on its fetches. Access logs drop ``token`` from
query strings. Errors are JSON ``{"error": "<sentence>"}``, never stack traces.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import inspect
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractAccessLogger
from yarl import URL

from pipeline.errors import PipelineError
from pipeline.metrics import Metrics
from pipeline.profile import ProfileState, columns
from pipeline.segments.definitions import Segment
from pipeline.segments.explain import explain_terms, jsonable

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
OPEN_PATHS = frozenset({"/health", "/ready", "/metrics"})
DASHBOARD_PAGES = frozenset({"/", "/dashboard"})  # the only routes that accept ?token= (a browser page load)
TOKEN_PARAM = "token"
RECENT_CHANGES = 50  # rows of /dashboard/data recent_changes (the page shows the first 20)
HISTORY_HOURS = 7 * 24  # hours of size history in /dashboard/data (earlier deltas still count)
PROXIED_HEADER = "X-Pipeline-Proxied"
SERVED_BY_HEADER = "X-Pipeline-Served-By"
PROXY_TIMEOUT_SECONDS = 10.0
REALM = "pipeline"


class NotFound(PipelineError):
    """The backend knows no such segment (or other resource): answered with 404 and the message."""


class BadRequest(PipelineError):
    """A parameter is malformed (e.g. a cursor this API did not give out): 400 and the message."""


@runtime_checkable
class ApiBackend(Protocol):
    """What the worker provides to the API. Every returned value is JSON-able after
    ``pipeline.segments.explain.jsonable`` (date-times are fine)."""

    def is_ready(self) -> bool:
        """True only when the worker has recovered its tables and holds its partitions (e.g.
        ``not app.rebalancing and not app.in_recovery`` and partitions assigned)."""
        ...

    def owner_url(self, customer_id: str) -> str | None:
        """Base URL (``http://host:port``) of the worker that owns ``customer_id``'s key, or None
        when this worker does (or there is one worker). With several workers the worker asks
        faust which one owns the key — ``app.router.key_store("profiles", key)`` gives the
        owner's canonical URL from the group assignment — and maps it to that worker's HTTP
        API port. The API then proxies the GET there."""
        ...

    async def profile(self, customer_id: str) -> dict[str, Any] | None:
        """The §4.2 columns of the customer's profile as of now (``pipeline.profile.columns``),
        or None when this worker has no such profile."""
        ...

    async def segments(self) -> list[dict[str, Any]]:
        """Every segment: ``id``, ``description``, ``where``, ``requires_consent``, ``size``
        (current members, or None when unknown)."""
        ...

    async def cohort(self, segment_id: str, *, limit: int, cursor: str | None
                     ) -> tuple[list[dict[str, Any]], str | None]:
        """One page of at most ``limit`` members after ``cursor`` (None: the first page), and the
        cursor of the next page (None: this was the last). Raise ``NotFound`` for an unknown
        segment, ``BadRequest`` for a cursor that cannot be read."""
        ...

    async def explain(self, customer_id: str, segment_id: str) -> dict[str, Any] | None:
        """``explain_terms`` for the customer's profile as of now, or None when there is no such
        profile. Raise ``NotFound`` for an unknown segment."""
        ...

    async def dashboard(self) -> dict[str, Any]:
        """What the dashboard shows, from ClickHouse: ``sizes`` (segment -> members),
        ``history`` (segment -> ``[[hour, size], ...]``, the running sum of the hourly deltas of
        ``segment_size_history``), ``recent_changes`` (newest first), ``dead_letters``
        (error class -> count) and ``generated_at``. Raise when ClickHouse cannot be asked."""
        ...


# --- pagination ---------------------------------------------------------------------------------

def encode_cursor(position: Sequence[Any]) -> str:
    """An opaque cursor for a sort key (a sequence of JSON scalars)."""
    raw = json.dumps(list(position), separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[Any, ...]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        position = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise BadRequest("the cursor is not one this API gave out; start again without a cursor") from None
    if not isinstance(position, list):
        raise BadRequest("the cursor is not one this API gave out; start again without a cursor")
    return tuple(position)


def _instant(value: Any) -> int:
    """A sortable integer (epoch microseconds) for a date-time, epoch milliseconds or None."""
    if isinstance(value, datetime):
        aware = value if value.tzinfo is not None else value.replace(tzinfo=UTC)
        return int(aware.timestamp() * 1_000_000)
    if isinstance(value, (int, float)):
        return int(value * 1000)
    return -1


def cohort_key(row: Mapping[str, Any]) -> tuple[int, str]:
    """The order of a cohort: member since, then customer id (as ``pipeline.cohorts.cohort``)."""
    return _instant(row.get("since")), str(row.get("customer_id"))


# --- dashboard data -----------------------------------------------------------------------------

def _iso(value: Any) -> Any:
    if isinstance(value, datetime):
        return (value if value.tzinfo is not None else value.replace(tzinfo=UTC)).isoformat()
    return value


def dashboard_data(client: Any, database: str, *, recent: int = RECENT_CHANGES, history_hours: int = HISTORY_HOURS,
                   now: datetime | None = None) -> dict[str, Any]:
    """The dashboard's numbers from the product's ClickHouse tables (all read with FINAL, so a
    redelivered row counts once). Run it in the worker's ClickHouse executor thread.

    - ``sizes``: members per segment, from ``segment_membership``;
    - ``history``: per segment, ``[[hour (ISO-8601), size at the end of that hour], ...]`` for the
      hours with changes in the last ``history_hours`` — the running sum of every hourly delta of
      ``segment_size_history`` (deltas before the window count in the first point, which is then
      the window's start);
    - ``recent_changes``: the ``recent`` newest rows of ``segment_changes``;
    - ``dead_letters``: rows of ``dead_letters`` per error class.
    """
    now = now or datetime.now(UTC)
    cutoff = int(now.timestamp()) // 3600 * 3600 - (history_hours - 1) * 3600
    sizes = {row[0]: int(row[1]) for row in client.query(
        f"SELECT segment_id, countIf(is_member = 1) FROM {database}.segment_membership FINAL "
        "GROUP BY segment_id ORDER BY segment_id").result_rows}
    history: dict[str, list[list[Any]]] = {}
    running: dict[str, int] = {}
    for segment_id, hour, delta in client.query(
            f"SELECT segment_id, toUnixTimestamp(hour), sum(delta) FROM {database}.segment_size_history FINAL "
            "GROUP BY segment_id, hour ORDER BY segment_id, hour").result_rows:
        size = running[segment_id] = running.get(segment_id, 0) + int(delta)
        points = history.setdefault(segment_id, [])
        if int(hour) >= cutoff:
            points.append([datetime.fromtimestamp(int(hour), tz=UTC).isoformat(), size])
        else:  # rows come in hour order: everything before the window folds into its first point
            points[:] = [[datetime.fromtimestamp(cutoff, tz=UTC).isoformat(), size]]
    changes = client.query(
        f"SELECT customer_id, segment_id, toString(change), changed_at, profile_version, cause "
        f"FROM {database}.segment_changes FINAL "
        "ORDER BY changed_at DESC, profile_version DESC, segment_id, customer_id, change DESC "
        "LIMIT %(limit)s", parameters={"limit": int(recent)}).result_rows
    recent_changes = [{"customer_id": row[0], "segment_id": row[1], "change": row[2], "changed_at": _iso(row[3]),
                       "profile_version": int(row[4]), "cause": row[5]} for row in changes]
    dead = {str(row[0]): int(row[1]) for row in client.query(
        f"SELECT error_class, count() FROM {database}.dead_letters FINAL GROUP BY error_class "
        "ORDER BY error_class").result_rows}
    return {"sizes": sizes, "history": history, "recent_changes": recent_changes, "dead_letters": dead}


# --- a backend from the worker's parts ----------------------------------------------------------

Lookup = Callable[[str], ProfileState | None | Awaitable[ProfileState | None]]


class WorkerBackend:
    """An ``ApiBackend`` from the worker's parts:

    - ``segments()``: the current definitions (a callable, so applied definitions show at once);
    - ``lookup(customer_id)``: the stored ``ProfileState`` or None (sync or async, e.g.
      ``ProfileStore.get(key, partition_for_key(key, partitions))``);
    - ``now_ms(customer_id)``: the pipeline clock for that customer's partition (``Clock.now_ms``);
    - ``members(segment_id, limit, after)``: one page of the cohort in ``cohort_key`` order, rows
      with ``customer_id``, ``since``, ``anonymous_ids``: at most ``limit`` members whose key follows
      ``after`` (``(since in epoch µs, customer_id)``, None: from the start) — e.g.
      ``pipeline.cohorts.cohort(..., limit=, after=)`` run in an executor, which reads only that page;
    - ``sizes()``: segment id -> members (e.g. ``pipeline.cohorts.segment_sizes``);
    - ``ready()``, ``owner(customer_id)``: see ``ApiBackend.is_ready`` and ``owner_url``;
    - ``dashboard()``: ``dashboard_data`` run in an executor (None: the dashboard shows sizes only).
    """

    def __init__(self, *, segments: Callable[[], Sequence[Segment]], lookup: Lookup,
                 now_ms: Callable[[str], int],
                 members: Callable[[str, int, tuple[int, str] | None], Awaitable[Sequence[Mapping[str, Any]]]],
                 sizes: Callable[[], Awaitable[Mapping[str, int]]],
                 ready: Callable[[], bool], owner: Callable[[str], str | None] | None = None,
                 half_life_days: float = 30.0,
                 dashboard: Callable[[], Awaitable[Mapping[str, Any]]] | None = None) -> None:
        self._segments = segments
        self._lookup = lookup
        self._now_ms = now_ms
        self._members = members
        self._sizes = sizes
        self._ready = ready
        self._owner = owner
        self._half_life_days = half_life_days
        self._dashboard = dashboard

    def is_ready(self) -> bool:
        return self._ready()

    def owner_url(self, customer_id: str) -> str | None:
        return self._owner(customer_id) if self._owner is not None else None

    def _segment(self, segment_id: str) -> Segment:
        for segment in self._segments():
            if segment.id == segment_id:
                return segment
        raise NotFound(f"there is no segment {segment_id[:200]!r}")

    async def _state(self, customer_id: str) -> ProfileState | None:
        found = self._lookup(customer_id)
        if inspect.isawaitable(found):
            found = await found
        return found  # type: ignore[return-value]

    async def profile(self, customer_id: str) -> dict[str, Any] | None:
        state = await self._state(customer_id)
        if state is None:
            return None
        row: dict[str, Any] = jsonable(columns(state, self._now_ms(customer_id),
                                               half_life_days=self._half_life_days))
        return row

    async def segments(self) -> list[dict[str, Any]]:
        try:
            sizes: Mapping[str, int] | None = await self._sizes()
        except Exception as exc:  # noqa: BLE001 - definitions are still worth answering without sizes
            log.warning("segment sizes unavailable: %s", exc)
            sizes = None
        return [{"id": s.id, "description": s.description, "where": s.where, "requires_consent": s.requires_consent,
                 "size": (sizes.get(s.id, 0) if sizes is not None else None)} for s in self._segments()]

    async def cohort(self, segment_id: str, *, limit: int, cursor: str | None
                     ) -> tuple[list[dict[str, Any]], str | None]:
        self._segment(segment_id)
        after = None
        if cursor:
            position = decode_cursor(cursor)
            if len(position) != 2 or type(position[0]) is not int or not isinstance(position[1], str):
                raise BadRequest("the cursor is not one this API gave out; start again without a cursor")
            after = (position[0], position[1])
        rows = list(await self._members(segment_id, limit + 1, after))  # one more: is there a next page?
        page = rows[:limit]
        next_cursor = encode_cursor(cohort_key(page[-1])) if len(rows) > limit and page else None
        return [jsonable(row) for row in page], next_cursor

    async def explain(self, customer_id: str, segment_id: str) -> dict[str, Any] | None:
        segment = self._segment(segment_id)
        state = await self._state(customer_id)
        if state is None:
            return None
        now_ms = self._now_ms(customer_id)
        now = datetime.fromtimestamp(now_ms / 1000, tz=UTC)
        explained = explain_terms(segment, columns(state, now_ms, half_life_days=self._half_life_days), now)
        since = state.segments.get(segment.id)
        explained["customer_id"] = state.customer_id
        explained["member"] = since is not None  # as last evaluated by the stream
        explained["member_since"] = datetime.fromtimestamp(since / 1000, tz=UTC).isoformat() if since else None
        return explained

    async def dashboard(self) -> dict[str, Any]:
        """``dashboard_data`` restricted to the current definitions (every defined segment has a
        size, 0 when it has no members; a removed segment's rows are not shown), plus
        ``generated_at``. Recent changes and dead letters are shown whatever their segment."""
        if self._dashboard is not None:
            data: Mapping[str, Any] = await self._dashboard()
        else:
            data = {"sizes": await self._sizes()}
        ids = [segment.id for segment in self._segments()]
        sizes: Mapping[str, int] = data.get("sizes") or {}
        history: Mapping[str, list[list[Any]]] = data.get("history") or {}
        result: dict[str, Any] = jsonable({
            "sizes": {segment_id: int(sizes.get(segment_id, 0)) for segment_id in ids},
            "history": {segment_id: list(history.get(segment_id, [])) for segment_id in ids},
            "recent_changes": list(data.get("recent_changes") or []),
            "dead_letters": dict(data.get("dead_letters") or {}),
            "generated_at": datetime.now(UTC).isoformat()})
        return result


# --- the application ----------------------------------------------------------------------------

BACKEND: web.AppKey[ApiBackend] = web.AppKey("backend", ApiBackend)
METRICS: web.AppKey[Metrics] = web.AppKey("metrics", Metrics)
SESSION: web.AppKey[aiohttp.ClientSession] = web.AppKey("session", aiohttp.ClientSession)


def _json(data: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.json_response(jsonable(data), status=status, headers=headers,
                             dumps=lambda value: json.dumps(value, separators=(",", ":")))


def _error(status: int, message: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return _json({"error": message}, status=status, headers=headers)


def _short(text: str) -> str:
    return text if len(text) <= 200 else text[:200] + "…"


def _error_middleware() -> Any:
    @web.middleware
    async def errors(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        try:
            return await handler(request)
        except NotFound as exc:
            return _error(404, str(exc))
        except BadRequest as exc:
            return _error(400, str(exc))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if exc.status == 404:
                message = f"there is no route {request.method} {_short(request.path)}"
            elif exc.status == 405:
                message = f"{request.method} is not allowed on {_short(request.path)}; use GET"
            else:
                message = exc.reason
            return _error(exc.status, message)
        except Exception:  # noqa: BLE001 - never a stack trace to the client; the log has it
            log.exception("error while serving %s %s", request.method, _short(request.path))
            return _error(500, f"internal error while serving {request.method} {_short(request.path)}; "
                               "see the worker's log")
    return errors


def _auth_middleware(token: str) -> Any:
    expected = token.encode()

    @web.middleware
    async def auth(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                   ) -> web.StreamResponse:
        if request.path in OPEN_PATHS:
            return await handler(request)
        header = request.headers.get("Authorization", "")
        scheme, _, given = header.partition(" ")
        page = request.path in DASHBOARD_PAGES
        if page and not header and request.query.get(TOKEN_PARAM):
            scheme, given = "bearer", request.query[TOKEN_PARAM]  # a browser's page load: ?token=
        if scheme.lower() != "bearer" or not given.strip():
            log.info("refused %s %s: no bearer token", request.method, _short(request.path))
            message = ("this page needs the API token: open it as /dashboard?token=<token> (or send a bearer token)"
                       if page else
                       "this route needs a bearer token: send 'Authorization: Bearer <token>'")
            return _error(401, message, {"WWW-Authenticate": f'Bearer realm="{REALM}"'})
        if not hmac.compare_digest(given.strip().encode(), expected):
            log.warning("refused %s %s from %s: wrong bearer token", request.method, _short(request.path),
                        request.remote)
            return _error(401, "the bearer token is not valid",
                          {"WWW-Authenticate": f'Bearer realm="{REALM}", error="invalid_token"'})
        return await handler(request)
    return auth


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=PROXY_TIMEOUT_SECONDS))
    app[SESSION] = session
    yield
    await session.close()


async def _proxy(request: web.Request, customer_id: str) -> web.StreamResponse | None:
    """Forward the GET to the worker that owns the customer, or None to serve it here."""
    if request.headers.get(PROXIED_HEADER):
        return None  # proxied once already: serve what this worker has, never loop
    owner = request.app[BACKEND].owner_url(customer_id)
    if not owner:
        return None
    target = URL(owner.rstrip("/") + request.raw_path, encoded=True)
    headers = {PROXIED_HEADER: "1", "Accept": "application/json"}
    if "Authorization" in request.headers:
        headers["Authorization"] = request.headers["Authorization"]
    owner_host = f"{target.host}:{target.port}"
    try:
        async with request.app[SESSION].get(target, headers=headers, allow_redirects=False) as response:
            body = await response.read()
            return web.Response(status=response.status, body=body, headers={
                "Content-Type": response.headers.get("Content-Type", "application/json"),
                SERVED_BY_HEADER: owner_host})
    except (aiohttp.ClientError, TimeoutError) as exc:
        log.warning("proxy to the owner %s of a profile failed: %s", owner_host, type(exc).__name__)
        return _error(502, f"the worker that owns this customer ({owner_host}) could not be reached")


async def _health(request: web.Request) -> web.StreamResponse:
    return _json({"status": "ok"})


async def _ready(request: web.Request) -> web.StreamResponse:
    try:
        ready = request.app[BACKEND].is_ready()
    except Exception:  # noqa: BLE001 - a readiness probe answers, whatever happens
        log.exception("readiness check failed")
        ready = False
    if ready:
        return _json({"ready": True})
    return _json({"ready": False, "error": "the worker has not yet recovered its state or been assigned "
                  "its partitions"}, status=503)


async def _metrics(request: web.Request) -> web.StreamResponse:
    body, content_type = request.app[METRICS].render()
    return web.Response(body=body, headers={"Content-Type": content_type})


async def _segments(request: web.Request) -> web.StreamResponse:
    return _json({"segments": await request.app[BACKEND].segments()})


async def _segment(request: web.Request) -> web.StreamResponse:
    segment_id = request.match_info["segment_id"]
    for segment in await request.app[BACKEND].segments():
        if segment.get("id") == segment_id:
            return _json(segment)
    raise NotFound(f"there is no segment {_short(segment_id)!r}")


def _limit(request: web.Request) -> int:
    text = request.query.get("limit")
    if text is None or text == "":
        return DEFAULT_LIMIT
    try:
        limit = int(text)
    except ValueError:
        raise BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}") from None
    if limit < 1:
        raise BadRequest(f"limit must be a whole number from 1 to {MAX_LIMIT}")
    return min(limit, MAX_LIMIT)


async def _cohort(request: web.Request) -> web.StreamResponse:
    segment_id = request.match_info["segment_id"]
    limit = _limit(request)
    cursor = request.query.get("cursor") or None
    members, next_cursor = await request.app[BACKEND].cohort(segment_id, limit=limit, cursor=cursor)
    following = (str(request.rel_url.with_query({"limit": str(limit), "cursor": next_cursor}))
                 if next_cursor else None)
    return _json({"segment_id": segment_id, "limit": limit, "members": members, "next_cursor": next_cursor,
                  "next": following})


async def _profile(request: web.Request) -> web.StreamResponse:
    customer_id = request.match_info["customer_id"]
    proxied = await _proxy(request, customer_id)
    if proxied is not None:
        return proxied
    found = await request.app[BACKEND].profile(customer_id)
    if found is None:
        raise NotFound(f"there is no profile for customer {_short(customer_id)!r}")
    return _json(found)


async def _explain(request: web.Request) -> web.StreamResponse:
    customer_id, segment_id = request.match_info["customer_id"], request.match_info["segment_id"]
    proxied = await _proxy(request, customer_id)
    if proxied is not None:
        return proxied
    found = await request.app[BACKEND].explain(customer_id, segment_id)
    if found is None:
        raise NotFound(f"there is no profile for customer {_short(customer_id)!r}")
    return _json(found)


async def _openapi(request: web.Request) -> web.StreamResponse:
    return _json(openapi_document())


_PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "Referrer-Policy": "no-referrer",  # the page URL may carry ?token=
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'",
}


async def _dashboard_page(request: web.Request) -> web.StreamResponse:
    return web.Response(text=DASHBOARD_HTML, content_type="text/html", charset="utf-8", headers=_PAGE_HEADERS)


async def _dashboard_data(request: web.Request) -> web.StreamResponse:
    try:
        data = await request.app[BACKEND].dashboard()
    except Exception as exc:  # noqa: BLE001 - the page keeps its last numbers and says why
        log.warning("dashboard data unavailable: %s: %s", type(exc).__name__, _short(str(exc)))
        return _error(503, "the dashboard data is unavailable: ClickHouse could not be queried; see the worker's log",
                      {"Cache-Control": "no-store"})
    return _json(data, headers={"Cache-Control": "no-store"})


ROUTES: tuple[tuple[str, Callable[[web.Request], Awaitable[web.StreamResponse]]], ...] = (
    ("/health", _health),
    ("/ready", _ready),
    ("/metrics", _metrics),
    ("/segments", _segments),
    ("/segments/{segment_id}", _segment),
    ("/cohorts/{segment_id}", _cohort),
    ("/profiles/{customer_id}", _profile),
    ("/profiles/{customer_id}/explain/{segment_id}", _explain),
    ("/openapi.json", _openapi),
    ("/", _dashboard_page),
    ("/dashboard", _dashboard_page),
    ("/dashboard/data", _dashboard_data),
)


def build_api(*, backend: ApiBackend, metrics: Metrics, token: str | None) -> web.Application:
    """The API as an aiohttp application. ``token``: the bearer token (e.g.
    ``settings.api_token.get_secret_value()``), or None for no authentication."""
    middlewares = [_error_middleware()]
    if token:
        middlewares.append(_auth_middleware(token))
    app = web.Application(middlewares=middlewares)
    app[BACKEND] = backend
    app[METRICS] = metrics
    app.cleanup_ctx.append(_client_session)
    for path, handler in ROUTES:
        app.router.add_get(path, handler, allow_head=False)
    return app


class RedactingAccessLogger(AbstractAccessLogger):
    """aiohttp's access log line without secrets: ``token`` query values are replaced."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        url = request.rel_url
        if TOKEN_PARAM in url.query:
            url = url.with_query([(k, "REDACTED" if k == TOKEN_PARAM else v) for k, v in url.query.items()])
        self.logger.info("%s %s %s %s %d %.3fs", request.remote, request.method, _short(str(url)),
                         response.status, response.body_length, time)


async def start_api(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve ``app`` on ``host:port`` inside the running event loop (``port`` 0: any free port,
    see ``bound_port``); returns the runner to pass to ``stop_api``."""
    runner = web.AppRunner(app, handle_signals=False, access_log_class=RedactingAccessLogger)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner


def bound_port(runner: web.AppRunner) -> int:
    """The port the API listens on (useful after ``start_api(..., port=0)``)."""
    return int(runner.addresses[0][1])


async def stop_api(runner: web.AppRunner) -> None:
    await runner.cleanup()


# --- OpenAPI ------------------------------------------------------------------------------------

def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _content(schema: dict[str, Any], media: str = "application/json") -> dict[str, Any]:
    return {"content": {media: {"schema": schema}}}


def _error_response(description: str) -> dict[str, Any]:
    return {"description": description, **_content(_ref("Error"))}


def _path_param(name: str, description: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "description": description, "schema": {"type": "string"}}


_UNAUTHORIZED = _error_response("Missing or wrong bearer token (only when PIPELINE_API_TOKEN is set).")
_CUSTOMER = _path_param("customer_id", "The customer's key: CRM customer id, or the prefixed identifier "
                                       "a profile known only by other identifiers goes by.")
_SEGMENT = _path_param("segment_id", "A segment id ([a-z0-9_]+).")
_OWNER = ("Served by the worker that owns the customer's key; another worker proxies the request there "
          f"(the answer then carries {SERVED_BY_HEADER}).")


def _dashboard_operation(operation_id: str) -> dict[str, Any]:
    return {"operationId": operation_id,
            "summary": "The dashboard: one self-contained HTML page (no external assets) that polls "
                       "/dashboard/data every few seconds.",
            "description": "A browser cannot send the Authorization header on a page load, so this page (and "
                           "only this page) also accepts the token as ?token=; the page's script then removes it "
                           "from the address bar and sends it as the header on its fetches.",
            "parameters": [{"name": TOKEN_PARAM, "in": "query", "required": False,
                            "description": "The API token (only when PIPELINE_API_TOKEN is set and no "
                                           "Authorization header is sent).", "schema": {"type": "string"}}],
            "responses": {"200": {"description": "The page.", **_content({"type": "string"}, "text/html")},
                          "401": _UNAUTHORIZED}}


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.0 description of every route of ``build_api``."""
    open_route: dict[str, Any] = {"security": []}
    paths: dict[str, Any] = {
        "/health": {"get": {**open_route, "operationId": "health", "summary": "The process is up (no token).",
                            "responses": {"200": {"description": "Up.", **_content(_ref("Health"))}}}},
        "/ready": {"get": {**open_route, "operationId": "ready",
                           "summary": "Recovered and assigned its partitions (no token).",
                           "responses": {"200": {"description": "Ready.", **_content(_ref("Ready"))},
                                         "503": {"description": "Not ready yet.", **_content(_ref("Ready"))}}}},
        "/metrics": {"get": {**open_route, "operationId": "metrics",
                             "summary": "Prometheus metrics, text exposition format (no token, for scrapers).",
                             "responses": {"200": {"description": "Metrics.",
                                                   **_content({"type": "string"}, "text/plain")}}}},
        "/segments": {"get": {"operationId": "listSegments", "summary": "Every segment with its live size.",
                              "responses": {"200": {"description": "The segments.",
                                                    **_content({"type": "object", "required": ["segments"],
                                                                "properties": {"segments": {
                                                                    "type": "array", "items": _ref("Segment")}}})},
                                            "401": _UNAUTHORIZED}}},
        "/segments/{segment_id}": {"get": {
            "operationId": "getSegment", "summary": "One segment with its live size.", "parameters": [_SEGMENT],
            "responses": {"200": {"description": "The segment.", **_content(_ref("Segment"))},
                          "401": _UNAUTHORIZED, "404": _error_response("No such segment.")}}},
        "/cohorts/{segment_id}": {"get": {
            "operationId": "getCohort", "summary": "The current members of a segment, one page at a time, "
            "oldest member first; follow next_cursor until it is null.",
            "parameters": [_SEGMENT,
                           {"name": "limit", "in": "query", "required": False,
                            "description": f"Members per page (default {DEFAULT_LIMIT}; more than {MAX_LIMIT} "
                                           f"is capped to {MAX_LIMIT}).",
                            "schema": {"type": "integer", "minimum": 1, "default": DEFAULT_LIMIT}},
                           {"name": "cursor", "in": "query", "required": False,
                            "description": "next_cursor of the previous page; absent for the first page.",
                            "schema": {"type": "string"}}],
            "responses": {"200": {"description": "A page of members.", **_content(_ref("CohortPage"))},
                          "400": _error_response("Malformed limit or cursor."), "401": _UNAUTHORIZED,
                          "404": _error_response("No such segment.")}}},
        "/profiles/{customer_id}": {"get": {
            "operationId": "getProfile", "summary": "A customer's profile as of now (the DESIGN §4.2 columns).",
            "description": _OWNER, "parameters": [_CUSTOMER],
            "responses": {"200": {"description": "The profile.", **_content(_ref("Profile"))},
                          "401": _UNAUTHORIZED, "404": _error_response("No such profile."),
                          "502": _error_response("The owning worker could not be reached.")}}},
        "/profiles/{customer_id}/explain/{segment_id}": {"get": {
            "operationId": "explainMembership",
            "summary": "Why a customer is or is not in a segment: each top-level AND term, its value, "
                       "whether it holds, the consent rule and the result.",
            "description": _OWNER, "parameters": [_CUSTOMER, _SEGMENT],
            "responses": {"200": {"description": "The explanation.", **_content(_ref("Explanation"))},
                          "401": _UNAUTHORIZED, "404": _error_response("No such profile or segment."),
                          "502": _error_response("The owning worker could not be reached.")}}},
        "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document.",
                                  "responses": {"200": {"description": "OpenAPI 3 document.",
                                                        **_content({"type": "object"})},
                                                "401": _UNAUTHORIZED}}},
        "/": {"get": _dashboard_operation("dashboardRoot")},
        "/dashboard": {"get": _dashboard_operation("dashboard")},
        "/dashboard/data": {"get": {
            "operationId": "dashboardData",
            "summary": "The dashboard's numbers from ClickHouse: live sizes, hourly size history, the 50 newest "
                       "segment changes, dead letters per error class.",
            "responses": {"200": {"description": "The numbers.", **_content(_ref("Dashboard"))},
                          "401": _UNAUTHORIZED,
                          "503": _error_response("ClickHouse could not be queried.")}}},
    }
    nullable_string = {"type": "string", "nullable": True}
    schemas: dict[str, Any] = {
        "Error": {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}},
        "Health": {"type": "object", "properties": {"status": {"type": "string", "enum": ["ok"]}}},
        "Ready": {"type": "object", "required": ["ready"],
                  "properties": {"ready": {"type": "boolean"}, "error": {"type": "string"}}},
        "Segment": {"type": "object", "required": ["id", "where"], "properties": {
            "id": {"type": "string"}, "description": {"type": "string"}, "where": {"type": "string"},
            "requires_consent": nullable_string,
            "size": {"type": "integer", "nullable": True, "description": "Current members (null: unknown)."}}},
        "Member": {"type": "object", "required": ["customer_id"], "properties": {
            "customer_id": {"type": "string"}, "since": {"type": "string", "format": "date-time"},
            "anonymous_ids": {"type": "array", "items": {"type": "string"}},
            "profile_version": {"type": "integer"}}},
        "CohortPage": {"type": "object", "required": ["segment_id", "members", "next_cursor"], "properties": {
            "segment_id": {"type": "string"}, "limit": {"type": "integer"},
            "members": {"type": "array", "items": _ref("Member")},
            "next_cursor": nullable_string, "next": {**nullable_string, "description": "URL of the next page."}}},
        "Profile": {"type": "object", "required": ["customer_id"], "additionalProperties": True,
                    "description": "The DESIGN §4.2 columns; date-times as ISO-8601 UTC strings.",
                    "properties": {"customer_id": {"type": "string"},
                                   "segments": {"type": "array", "items": {"type": "string"}},
                                   "version": {"type": "integer"}}},
        "Term": {"type": "object", "required": ["sql", "value", "holds"], "properties": {
            "sql": {"type": "string"}, "value": {"nullable": True, "description": "The term's value (null: NULL)."},
            "holds": {"type": "boolean"}, "error": {"type": "string"}}},
        "Explanation": {"type": "object", "required": ["segment_id", "terms", "consent", "result"], "properties": {
            "segment_id": {"type": "string"}, "customer_id": {"type": "string"}, "where": {"type": "string"},
            "sql": {"type": "string"}, "now": {"type": "string", "format": "date-time"},
            "terms": {"type": "array", "items": _ref("Term")},
            "consent": {"type": "object", "properties": {
                "required": nullable_string, "given": {"type": "boolean", "nullable": True},
                "holds": {"type": "boolean"}}},
            "predicate": {"type": "boolean", "description": "The where expression alone."},
            "result": {"type": "boolean", "description": "Member at now: predicate and consent."},
            "member": {"type": "boolean", "description": "Member as last evaluated by the stream."},
            "member_since": {**nullable_string, "format": "date-time"}}},
        "Change": {"type": "object", "required": ["customer_id", "segment_id", "change", "changed_at"],
                   "properties": {"customer_id": {"type": "string"}, "segment_id": {"type": "string"},
                                  "change": {"type": "string", "enum": ["entered", "exited"]},
                                  "changed_at": {"type": "string", "format": "date-time"},
                                  "profile_version": {"type": "integer"}, "cause": {"type": "string"}}},
        "Dashboard": {"type": "object", "required": ["sizes", "history", "recent_changes", "dead_letters",
                                                     "generated_at"], "properties": {
            "sizes": {"type": "object", "additionalProperties": {"type": "integer"},
                      "description": "Segment id -> current members (every defined segment)."},
            "history": {"type": "object", "description": "Segment id -> [[hour, size], ...]: the size at the end "
                        "of each hour with changes (running sum of segment_size_history's hourly deltas), oldest "
                        f"first, the last {HISTORY_HOURS} hours.",
                        "additionalProperties": {"type": "array", "items": {
                            "type": "array", "minItems": 2, "maxItems": 2,
                            "items": {"oneOf": [{"type": "string", "format": "date-time"}, {"type": "integer"}]}}}},
            "recent_changes": {"type": "array", "items": _ref("Change"),
                               "description": f"The {RECENT_CHANGES} newest segment changes, newest first."},
            "dead_letters": {"type": "object", "additionalProperties": {"type": "integer"},
                             "description": "Error class -> dead letters in ClickHouse."},
            "generated_at": {"type": "string", "format": "date-time"}}},
    }
    return {
        "openapi": "3.0.3",
        "info": {"title": "live-segments worker API", "version": "0.1.0",
                 "description": "Profiles, segments and cohorts of one pipeline worker. When PIPELINE_API_TOKEN "
                                "is set, every route but /health, /ready and /metrics needs "
                                "'Authorization: Bearer <token>'."},
        "paths": paths,
        "components": {"schemas": schemas,
                       "securitySchemes": {"bearerAuth": {"type": "http", "scheme": "bearer"}}},
        "security": [{"bearerAuth": []}],
    }


# --- the dashboard page -------------------------------------------------------------------------
# One self-contained page: inline CSS, inline JS, an SVG chart drawn by hand; no external asset (the
# machines that run it may have no network). It never contains the token: the script reads it from
# the address bar (or sessionStorage), removes it from there, and sends it as a bearer header.
# Every value from the data is put in the DOM with textContent/setAttribute, never as HTML.
# Stable hooks for tests and scrapers: td.size[data-segment], td.dead-count[data-error-class],
# tr.change[data-segment][data-customer][data-change], #sizes-total, #dead-letters-total,
# path.series[data-segment][data-last-size], body[data-state][data-updates][data-generated-at].

DASHBOARD_HTML = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="referrer" content="no-referrer">
<title>live-segments dashboard</title>
<style>
:root { --bg: #f4f5f7; --card: #fff; --ink: #1d2330; --muted: #6b7280; --line: #e3e6eb;
        --ok: #15803d; --bad: #b91c1c; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.4 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       background: var(--bg); color: var(--ink); }
header { display: flex; align-items: baseline; gap: 16px; padding: 12px 24px; background: #1d2330; color: #fff; }
header h1 { font-size: 18px; margin: 0; font-weight: 600; }
#status { font-size: 13px; color: #cbd5e1; }
#status[data-state=error] { color: #fca5a5; }
#generated-at { margin-left: auto; font-size: 13px; color: #cbd5e1; }
main { display: grid; grid-template-columns: minmax(260px, 320px) 1fr; gap: 16px; padding: 16px 24px; }
section { background: var(--card); border: 1px solid var(--line); border-radius: 8px; padding: 12px 16px;
          min-width: 0; }
section h2 { font-size: 12px; margin: 0 0 8px; text-transform: uppercase; letter-spacing: .05em;
             color: var(--muted); }
#sizes-card { grid-column: 1; grid-row: 1; }
#dead-card { grid-column: 1; grid-row: 2; }
#chart-card { grid-column: 2; grid-row: 1 / span 2; }
#changes-card { grid-column: 1 / span 2; grid-row: 3; }
table { width: 100%; border-collapse: collapse; }
th, td { text-align: left; padding: 4px 6px; border-bottom: 1px solid var(--line); white-space: nowrap; }
thead th { font-weight: 600; color: var(--muted); font-size: 12px; }
tfoot th, tfoot td { border-bottom: 0; font-weight: 600; }
.num, td.size, td.dead-count { text-align: right; font-variant-numeric: tabular-nums; }
.swatch { display: inline-block; width: 10px; height: 10px; border-radius: 2px; margin-right: 6px; }
td.entered { color: var(--ok); font-weight: 600; }
td.exited { color: var(--bad); font-weight: 600; }
td.customer, td.cause { max-width: 320px; overflow: hidden; text-overflow: ellipsis; }
.empty td { color: var(--muted); font-style: italic; }
#chart { display: block; width: 100%; height: auto; }
#chart text { font-size: 11px; fill: var(--muted); }
#chart .grid { stroke: var(--line); stroke-width: 1; }
#chart .series { fill: none; stroke-width: 2; }
#legend { margin-top: 6px; font-size: 13px; }
#legend span.item { margin-right: 14px; white-space: nowrap; }
</style>
</head>
<body data-state="loading" data-updates="0">
<header>
  <h1>live-segments</h1>
  <span id="status" data-state="loading">loading&hellip;</span>
  <span id="generated-at"></span>
</header>
<main>
  <section id="sizes-card">
    <h2>Live segment sizes</h2>
    <table id="sizes">
      <thead><tr><th>segment</th><th class="num">members</th></tr></thead>
      <tbody></tbody>
      <tfoot><tr><th>all memberships</th><td class="num" id="sizes-total"></td></tr></tfoot>
    </table>
  </section>
  <section id="dead-card">
    <h2>Dead letters by error class</h2>
    <table id="dead-letters">
      <thead><tr><th>error class</th><th class="num">messages</th></tr></thead>
      <tbody></tbody>
      <tfoot><tr><th>total</th><td class="num" id="dead-letters-total"></td></tr></tfoot>
    </table>
  </section>
  <section id="chart-card">
    <h2>Segment size over time (end of each hour with changes, UTC)</h2>
    <svg id="chart" viewBox="0 0 820 330" role="img" aria-label="segment sizes over time"></svg>
    <div id="legend"></div>
  </section>
  <section id="changes-card">
    <h2>Recent segment changes (newest 20)</h2>
    <table id="recent-changes">
      <thead><tr><th>changed at (UTC)</th><th>segment</th><th>customer</th><th>change</th>
        <th class="num">profile version</th><th>cause</th></tr></thead>
      <tbody></tbody>
    </table>
  </section>
</main>
<script>
(function () {
  "use strict";
  var REFRESH_MS = 5000, SHOWN_CHANGES = 20, KEY = "pipeline-api-token", NS = "http://www.w3.org/2000/svg";
  var COLORS = ["#2563eb", "#dc2626", "#16a34a", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d",
                "#ea580c", "#475569"];
  var token = null, updates = 0, lastGood = null;
  var params = new URLSearchParams(window.location.search);
  if (params.has("token")) {
    token = params.get("token");
    params.delete("token");
    try { window.sessionStorage.setItem(KEY, token); } catch (e) { /* storage may be off */ }
    var rest = params.toString();
    window.history.replaceState(null, "", window.location.pathname + (rest ? "?" + rest : "") + window.location.hash);
  } else {
    try { token = window.sessionStorage.getItem(KEY); } catch (e) { token = null; }
  }

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }
  function sv(tag, attrs, text) {
    var node = document.createElementNS(NS, tag);
    Object.keys(attrs || {}).forEach(function (k) { node.setAttribute(k, attrs[k]); });
    if (text !== undefined && text !== null) { node.textContent = String(text); }
    return node;
  }
  function clear(node) { while (node.firstChild) { node.removeChild(node.firstChild); } }
  function swatch(color) { var s = el("span", {"class": "swatch"}); s.style.background = color; return s; }
  function when(iso) {
    return iso ? String(iso).replace("T", " ").replace(/\.\d+/, "").replace(/(\+00:00|Z)$/, "") : "";
  }
  function hourLabel(ms) { return new Date(ms).toISOString().slice(5, 16).replace("T", " "); }
  function emptyRow(body, columns, text) {
    var tr = el("tr", {"class": "empty"});
    tr.appendChild(el("td", {"colspan": String(columns)}, text));
    body.appendChild(tr);
  }

  function renderSizes(ids, sizes, colors) {
    var body = document.querySelector("#sizes tbody"), total = 0;
    clear(body);
    ids.forEach(function (id) {
      var tr = el("tr", {"data-segment": id}), name = el("td", {"class": "segment"});
      name.appendChild(swatch(colors[id]));
      name.appendChild(document.createTextNode(id));
      tr.appendChild(name);
      tr.appendChild(el("td", {"class": "size", "data-segment": id}, sizes[id]));
      body.appendChild(tr);
      total += sizes[id];
    });
    if (!ids.length) { emptyRow(body, 2, "no segments defined"); }
    document.getElementById("sizes-total").textContent = String(total);
  }

  function renderDead(dead) {
    var body = document.querySelector("#dead-letters tbody"), total = 0;
    var classes = Object.keys(dead).sort(function (a, b) { return dead[b] - dead[a] || (a < b ? -1 : 1); });
    clear(body);
    classes.forEach(function (cls) {
      var tr = el("tr", {"data-error-class": cls});
      tr.appendChild(el("td", {"class": "error-class"}, cls || "(none)"));
      tr.appendChild(el("td", {"class": "dead-count", "data-error-class": cls}, dead[cls]));
      body.appendChild(tr);
      total += dead[cls];
    });
    if (!classes.length) { emptyRow(body, 2, "no dead letters"); }
    document.getElementById("dead-letters-total").textContent = String(total);
  }

  function renderChanges(changes) {
    var body = document.querySelector("#recent-changes tbody");
    clear(body);
    changes.slice(0, SHOWN_CHANGES).forEach(function (c) {
      var tr = el("tr", {"class": "change", "data-segment": c.segment_id, "data-customer": c.customer_id,
                         "data-change": c.change, "data-changed-at": c.changed_at});
      tr.appendChild(el("td", {"class": "changed-at"}, when(c.changed_at)));
      tr.appendChild(el("td", {"class": "segment"}, c.segment_id));
      tr.appendChild(el("td", {"class": "customer", "title": c.customer_id}, c.customer_id));
      tr.appendChild(el("td", {"class": c.change === "exited" ? "exited" : "entered"}, c.change));
      tr.appendChild(el("td", {"class": "num"}, c.profile_version));
      tr.appendChild(el("td", {"class": "cause", "title": c.cause}, c.cause));
      body.appendChild(tr);
    });
    if (!changes.length) { emptyRow(body, 6, "no segment changes yet"); }
  }

  function ticksFor(max) {
    if (max <= 0) { return [0, 1]; }
    var raw = max / 4, mag = Math.pow(10, Math.floor(Math.log10(raw))), step = mag;
    [1, 2, 5, 10].some(function (m) { step = Math.max(1, m * mag); return m * mag >= raw; });
    var ticks = [];
    for (var v = 0; v < max + step; v += step) { ticks.push(v); if (v >= max) { break; } }
    return ticks;
  }

  function renderChart(ids, sizes, history, generatedAt, colors) {
    var chart = document.getElementById("chart"), legend = document.getElementById("legend");
    var W = 820, H = 330, L = 52, R = 20, T = 14, B = 36;
    var now = Date.parse(generatedAt) || Date.now(), t0 = Infinity, vmax = 0, any = false;
    clear(chart);
    clear(legend);
    var series = ids.map(function (id) {
      var points = (history[id] || []).map(function (p) { return [Date.parse(p[0]), Number(p[1])]; });
      points.forEach(function (p) { t0 = Math.min(t0, p[0]); vmax = Math.max(vmax, p[1]); any = true; });
      vmax = Math.max(vmax, sizes[id]);
      return {id: id, points: points};
    });
    var HOUR = 3600 * 1000;
    t0 = Math.min(isFinite(t0) ? t0 : now, now - HOUR);
    var t1 = now, ticks = ticksFor(vmax), ymax = ticks[ticks.length - 1];
    function x(t) { return (L + (t - t0) / (t1 - t0) * (W - L - R)).toFixed(1); }
    function y(v) { return (T + (1 - v / ymax) * (H - T - B)).toFixed(1); }
    ticks.forEach(function (v) {
      chart.appendChild(sv("line", {"class": "grid", "x1": L, "x2": W - R, "y1": y(v), "y2": y(v)}));
      chart.appendChild(sv("text", {"x": L - 6, "y": Number(y(v)) + 4, "text-anchor": "end"}, v));
    });
    var every = Math.max(1, Math.ceil((t1 - t0) / HOUR / 5)) * HOUR;  // at most ~5 whole-hour labels
    for (var t = Math.ceil(t0 / every) * every; t < t1 - (t1 - t0) * 0.12; t += every) {
      chart.appendChild(sv("line", {"class": "grid", "x1": x(t), "x2": x(t), "y1": H - B, "y2": H - B + 4}));
      chart.appendChild(sv("text", {"x": x(t), "y": H - 14, "text-anchor": "middle"}, hourLabel(t)));
    }
    chart.appendChild(sv("text", {"x": x(t1), "y": H - 14, "text-anchor": "end"}, "now"));
    chart.appendChild(sv("line", {"class": "grid", "x1": L, "x2": L, "y1": T, "y2": H - B}));
    series.forEach(function (s) {
      var color = colors[s.id], d = "", last = null;
      s.points.forEach(function (p, k) {
        d += k === 0 ? "M" + x(p[0]) + " " + y(p[1]) : " H" + x(p[0]) + " V" + y(p[1]);
        last = p;
      });
      d += last ? " H" + x(now) + " V" + y(sizes[s.id]) : "M" + x(now) + " " + y(sizes[s.id]);
      var path = sv("path", {"class": "series", "d": d, "stroke": color, "data-segment": s.id,
                             "data-last-size": String(sizes[s.id]), "data-points": String(s.points.length)});
      path.appendChild(sv("title", {}, s.id));
      chart.appendChild(path);
      s.points.forEach(function (p) {
        var dot = sv("circle", {"cx": x(p[0]), "cy": y(p[1]), "r": 3.5, "fill": color, "data-segment": s.id,
                                "data-size": String(p[1]), "data-hour": new Date(p[0]).toISOString()});
        dot.appendChild(sv("title", {}, s.id + ": " + p[1] + " at the end of " + hourLabel(p[0]) + " UTC"));
        chart.appendChild(dot);
      });
      var item = el("span", {"class": "item", "data-segment": s.id});
      item.appendChild(swatch(color));
      item.appendChild(document.createTextNode(s.id + " (" + sizes[s.id] + ")"));
      legend.appendChild(item);
    });
    if (!any) {
      chart.appendChild(sv("text", {"x": (L + W - R) / 2, "y": (T + H - B) / 2, "text-anchor": "middle"},
                           "no segment changes in the last week"));
    }
  }

  function render(data) {
    var sizes = data.sizes || {}, ids = Object.keys(sizes).sort(), colors = {};
    ids.forEach(function (id, i) { colors[id] = COLORS[i % COLORS.length]; });
    renderSizes(ids, sizes, colors);
    renderChart(ids, sizes, data.history || {}, data.generated_at, colors);
    renderChanges(data.recent_changes || []);
    renderDead(data.dead_letters || {});
    updates += 1;
    lastGood = data.generated_at;
    document.getElementById("generated-at").textContent = "data as of " + when(data.generated_at) + " UTC";
    var status = document.getElementById("status");
    status.textContent = "live, refreshed every " + REFRESH_MS / 1000 + " s";
    status.setAttribute("data-state", "ok");
    document.body.setAttribute("data-state", "ok");
    document.body.setAttribute("data-updates", String(updates));
    document.body.setAttribute("data-generated-at", data.generated_at || "");
  }

  function fail(error) {
    var status = document.getElementById("status");
    status.textContent = "refresh failed: " + (error && error.message ? error.message : error) +
      (lastGood ? " (showing the data as of " + when(lastGood) + " UTC)" : "");
    status.setAttribute("data-state", "error");
    document.body.setAttribute("data-state", "error");
  }

  function refresh() {
    var headers = {"Accept": "application/json"};
    if (token) { headers.Authorization = "Bearer " + token; }
    fetch("dashboard/data", {headers: headers, cache: "no-store", credentials: "omit"})
      .then(function (response) {
        return response.json().catch(function () { return {}; }).then(function (body) {
          if (!response.ok) { throw new Error(body.error || "HTTP " + response.status); }
          return body;
        });
      })
      .then(render, fail)
      .then(function () { window.setTimeout(refresh, REFRESH_MS); });
  }
  refresh();
}());
</script>
</body>
</html>
"""
