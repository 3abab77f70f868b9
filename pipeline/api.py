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
- ``/openapi.json`` — the OpenAPI 3 description of all of the above.

Authentication: when a token is given, every route except ``/health``, ``/ready`` and
``/metrics`` (probes and Prometheus scrape without credentials) requires
``Authorization: Bearer <token>``; the token is compared in constant time and never logged or
echoed. Errors are JSON ``{"error": "<sentence>"}``, never stack traces.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import hmac
import inspect
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, runtime_checkable

import aiohttp
from aiohttp import web
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
        segment, ``BadRequest`` for a cursor that cannot be read (``paginate`` does both)."""
        ...

    async def explain(self, customer_id: str, segment_id: str) -> dict[str, Any] | None:
        """``explain_terms`` for the customer's profile as of now, or None when there is no such
        profile. Raise ``NotFound`` for an unknown segment."""
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


def paginate(rows: Sequence[Mapping[str, Any]], *, limit: int, cursor: str | None,
             key: Callable[[Mapping[str, Any]], tuple[Any, ...]] = cohort_key
             ) -> tuple[list[Mapping[str, Any]], str | None]:
    """Keyset pagination: the ``limit`` rows whose key follows the cursor's, in key order.

    Keys must be unique (the cohort key includes the customer id). A row added or removed
    between two pages shifts no other row, so walking the pages of a stable cohort gives every
    member exactly once.
    """
    ordered = sorted(rows, key=key)
    keys = [key(row) for row in ordered]
    start = 0
    if cursor:
        after = decode_cursor(cursor)
        try:
            start = bisect.bisect_right(keys, after)
        except TypeError:
            raise BadRequest("the cursor is not one this API gave out; start again without a cursor") from None
    page = ordered[start:start + limit]
    more = start + limit < len(ordered)
    return page, encode_cursor(key(page[-1])) if more and page else None


# --- a backend from the worker's parts ----------------------------------------------------------

Lookup = Callable[[str], ProfileState | None | Awaitable[ProfileState | None]]


class WorkerBackend:
    """An ``ApiBackend`` from the worker's parts:

    - ``segments()``: the current definitions (a callable, so applied definitions show at once);
    - ``lookup(customer_id)``: the stored ``ProfileState`` or None (sync or async, e.g.
      ``ProfileStore.get(key, partition_for_key(key, partitions))``);
    - ``now_ms(customer_id)``: the pipeline clock for that customer's partition (``Clock.now_ms``);
    - ``members(segment_id)``: the cohort, rows with ``customer_id``, ``since``, ``anonymous_ids``
      (e.g. ``pipeline.cohorts.cohort`` run in an executor);
    - ``sizes()``: segment id -> members (e.g. ``pipeline.cohorts.segment_sizes``);
    - ``ready()``, ``owner(customer_id)``: see ``ApiBackend.is_ready`` and ``owner_url``.
    """

    def __init__(self, *, segments: Callable[[], Sequence[Segment]], lookup: Lookup,
                 now_ms: Callable[[str], int],
                 members: Callable[[str], Awaitable[Sequence[Mapping[str, Any]]]],
                 sizes: Callable[[], Awaitable[Mapping[str, int]]],
                 ready: Callable[[], bool], owner: Callable[[str], str | None] | None = None,
                 half_life_days: float = 30.0) -> None:
        self._segments = segments
        self._lookup = lookup
        self._now_ms = now_ms
        self._members = members
        self._sizes = sizes
        self._ready = ready
        self._owner = owner
        self._half_life_days = half_life_days

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
        page, next_cursor = paginate(await self._members(segment_id), limit=limit, cursor=cursor)
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
        if scheme.lower() != "bearer" or not given.strip():
            log.info("refused %s %s: no bearer token", request.method, _short(request.path))
            return _error(401, "this route needs a bearer token: send 'Authorization: Bearer <token>'",
                          {"WWW-Authenticate": f'Bearer realm="{REALM}"'})
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


async def start_api(app: web.Application, host: str, port: int) -> web.AppRunner:
    """Serve ``app`` on ``host:port`` inside the running event loop (``port`` 0: any free port,
    see ``bound_port``); returns the runner to pass to ``stop_api``."""
    runner = web.AppRunner(app, handle_signals=False)
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
