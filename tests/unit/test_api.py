"""The worker's HTTP API against a backend of real objects: compiled segments, folded profiles."""

import asyncio
import logging
import re
from datetime import UTC, datetime

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer

from pipeline.api import (
    MAX_LIMIT,
    OPEN_PATHS,
    SERVED_BY_HEADER,
    ApiBackend,
    WorkerBackend,
    bound_port,
    build_api,
    cohort_key,
    start_api,
    stop_api,
)
from pipeline.events import Event, Item
from pipeline.metrics import Metrics
from pipeline.processor import step
from pipeline.profile import DAY_MS
from pipeline.segments.definitions import parse_segments

T0 = 1_790_000_000_000
TOKEN = "s3cret-Token-value-42"
SEGMENTS = parse_segments("""segments:
  - id: buyers
    description: Bought at least once
    where: orders_count >= 1
  - id: cooks
    description: Cooking fans with cookware affinity and a high NPS
    where: has(survey_interests, 'cooking') AND category_affinity['cookware'] >= 0.3 AND nps >= 9
    requires_consent: marketing
  - id: empty_one
    where: orders_count > 1000
""")


def purchase(customer, event_id, at, total=25.0):
    return Event(event_id=event_id, source="pos", type="purchase", occurred_at=at, customer_id=customer,
                 total=total, channel="store", items=[Item("sku", "cookware", 1, total)])


def survey(customer, event_id, at, interests=("cooking",), nps=None):
    return Event(event_id=event_id, source="surveys", type="survey", occurred_at=at, customer_id=customer,
                 survey_id="q1", interests=list(interests), nps=nps)


def fold_all(key, events):
    state = None
    for event in events:
        state = step(state, key, event, event.occurred_at, SEGMENTS).state
    return state


def profiles():
    return {
        "c1": fold_all("c1", [purchase("c1", "e1", T0 - DAY_MS), survey("c1", "e2", T0 - DAY_MS)]),
        "c2": fold_all("c2", [survey("c2", "e3", T0 - 2 * DAY_MS, nps=10)]),
        "anon:x y": fold_all("anon:x y", [purchase(None, "e4", T0 - 3 * DAY_MS, total=5.0)]),
    }


def members(count=25):
    # several members share one instant: the customer id breaks the tie
    return [{"customer_id": f"m{i:03d}", "since": datetime.fromtimestamp((T0 - (i // 3) * 1000) / 1000, tz=UTC),
             "anonymous_ids": [f"a{i}"], "profile_version": i + 1} for i in range(count)]


class Parts:
    """What the worker would pass: store lookup, clock, cohort query, sizes, readiness, owner."""

    def __init__(self, owner=None):
        self.states = profiles()
        self.cohorts = {"buyers": members(), "cooks": [], "empty_one": []}
        self.ready = True
        self.owner = owner or (lambda customer_id: None)
        self.lookups = []
        self.sizes_fail = False
        self.dashboard_fail = False

    def backend(self):
        async def lookup(customer_id):
            self.lookups.append(customer_id)
            return self.states.get(customer_id)

        async def cohort(segment_id, limit, after):
            # what pipeline.cohorts.cohort(limit=, after=) answers: the page after the key, in key order
            rows = sorted(self.cohorts[segment_id], key=cohort_key)
            return [r for r in rows if after is None or cohort_key(r) > after][:limit]

        async def sizes():
            if self.sizes_fail:
                raise ConnectionError("ClickHouse is down")
            return {s: len(rows) for s, rows in self.cohorts.items() if rows}

        async def dashboard():
            if self.dashboard_fail:
                raise ConnectionError("ClickHouse is down")
            return DASHBOARD_DATA

        return WorkerBackend(segments=lambda: SEGMENTS, lookup=lookup, now_ms=lambda customer_id: T0,
                             members=cohort, sizes=sizes, ready=lambda: self.ready,
                             owner=lambda customer_id: self.owner(customer_id), dashboard=dashboard)


# what dashboard_data would answer: a segment no longer defined ("retired") and a customer id
# that is markup, which the page must show as text
DASHBOARD_DATA = {
    "sizes": {"buyers": 25, "retired": 4},
    "history": {"buyers": [["2026-09-21T08:00:00+00:00", 20], ["2026-09-21T09:00:00+00:00", 25]],
                "retired": [["2026-09-21T08:00:00+00:00", 4]]},
    "recent_changes": [{"customer_id": "<img src=x onerror=alert(1)>", "segment_id": "buyers", "change": "entered",
                        "changed_at": datetime.fromtimestamp(T0 / 1000, tz=UTC), "profile_version": 3,
                        "cause": "e9"}],
    "dead_letters": {"decode": 2, "schema": 1},
}


def serve(test, *, token=None, parts=None, metrics=None):
    """Run ``test(client, parts, metrics)`` against a fresh API in a fresh event loop."""
    parts = parts or Parts()
    metrics = metrics or Metrics()

    async def main():
        app = build_api(backend=parts.backend(), metrics=metrics, token=token)
        async with TestClient(TestServer(app)) as client:
            return await test(client, parts, metrics)
    return asyncio.run(main())


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_worker_backend_is_an_api_backend():
    assert isinstance(Parts().backend(), ApiBackend)


def test_health_and_ready():
    async def test(client, parts, metrics):
        response = await client.get("/health")
        assert response.status == 200 and await response.json() == {"status": "ok"}
        response = await client.get("/ready")
        assert response.status == 200 and (await response.json())["ready"] is True
        parts.ready = False
        response = await client.get("/ready")
        body = await response.json()
        assert response.status == 503 and body["ready"] is False and "partitions" in body["error"]
    serve(test)


def test_metrics_route_serves_the_counters():
    async def test(client, parts, metrics):
        metrics.event_in("clickstream", 5)
        metrics.dead_letter("pos", "decode")
        response = await client.get("/metrics")
        text = await response.text()
        assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
        assert 'pipeline_events_in_total{topic="clickstream"} 5.0' in text
        assert 'pipeline_dead_letters_total{error_class="decode",source="pos"} 1.0' in text
    serve(test)


def test_segments_and_one_segment():
    async def test(client, parts, metrics):
        response = await client.get("/segments")
        body = await response.json()
        assert response.status == 200
        assert [(s["id"], s["size"], s["requires_consent"]) for s in body["segments"]] == [
            ("buyers", 25, None), ("cooks", 0, "marketing"), ("empty_one", 0, None)]
        assert body["segments"][0]["where"] == "orders_count >= 1"
        response = await client.get("/segments/cooks")
        assert response.status == 200 and (await response.json())["description"].startswith("Cooking fans")
        response = await client.get("/segments/nope")
        assert response.status == 404 and await response.json() == {"error": "there is no segment 'nope'"}
    serve(test)


def test_segments_without_sizes_still_answer():
    parts = Parts()
    parts.sizes_fail = True

    async def test(client, parts, metrics):
        response = await client.get("/segments")
        assert response.status == 200
        assert {s["size"] for s in (await response.json())["segments"]} == {None}
    serve(test, parts=parts)


def test_cohort_pages_walk_every_member_once_in_order():
    async def test(client, parts, metrics):
        seen, pages, url = [], 0, "/cohorts/buyers?limit=7"
        while url:
            response = await client.get(url)
            body = await response.json()
            assert response.status == 200 and body["limit"] == 7 and len(body["members"]) <= 7
            seen += [m["customer_id"] for m in body["members"]]
            pages += 1
            url = body["next"]
            if url:
                assert body["next_cursor"] in url
        expected = sorted(members(), key=lambda m: (m["since"], m["customer_id"]))
        assert seen == [m["customer_id"] for m in expected]  # no duplicates, no gaps, oldest first
        assert len(set(seen)) == 25 and pages == 4
        first = (await (await client.get("/cohorts/buyers?limit=1")).json())["members"][0]
        assert first["since"].endswith("+00:00") and first["anonymous_ids"]

        # a member joining mid-walk shifts nothing already served
        response = await client.get("/cohorts/buyers?limit=10")
        page1 = await response.json()
        parts.cohorts["buyers"].append({"customer_id": "late", "since": datetime.fromtimestamp(T0 / 1000 + 1, tz=UTC),
                                        "anonymous_ids": [], "profile_version": 1})
        rest, cursor = [], page1["next_cursor"]
        while cursor:
            body = await (await client.get("/cohorts/buyers", params={"limit": "10", "cursor": cursor})).json()
            rest += [m["customer_id"] for m in body["members"]]
            cursor = body["next_cursor"]
        assert [m["customer_id"] for m in page1["members"]] + rest == seen + ["late"]
    serve(test)


def test_cohort_limits_cursors_and_unknown_segments():
    async def test(client, parts, metrics):
        body = await (await client.get("/cohorts/buyers")).json()
        assert body["limit"] == 100 and len(body["members"]) == 25 and body["next_cursor"] is None
        body = await (await client.get(f"/cohorts/buyers?limit={MAX_LIMIT * 5}")).json()
        assert body["limit"] == MAX_LIMIT
        for bad in ("0", "-3", "ten", "1.5"):
            response = await client.get(f"/cohorts/buyers?limit={bad}")
            assert response.status == 400 and "limit" in (await response.json())["error"]
        for cursor in ("not-a-cursor!", "eyJhIjoxfQ", "WyJ4Il0"):  # garbage, {"a":1}, ["x"]
            response = await client.get("/cohorts/buyers", params={"cursor": cursor})
            assert response.status == 400 and "cursor" in (await response.json())["error"], cursor
        response = await client.get("/cohorts/nope")
        assert response.status == 404 and await response.json() == {"error": "there is no segment 'nope'"}
        body = await (await client.get("/cohorts/cooks")).json()
        assert body["members"] == [] and body["next_cursor"] is None
    serve(test)


def test_profile():
    async def test(client, parts, metrics):
        response = await client.get("/profiles/c1")
        body = await response.json()
        assert response.status == 200
        assert body["customer_id"] == "c1" and body["orders_count"] == 1 and body["lifetime_value"] == 25.0
        assert body["segments"] == ["buyers"] and body["survey_interests"] == ["cooking"]
        assert body["last_seen_at"] == datetime.fromtimestamp((T0 - DAY_MS) / 1000, tz=UTC).isoformat()
        assert body["nps"] is None and body["category_affinity"]["cookware"] > 0
        response = await client.get("/profiles/anon%3Ax%20y")  # a prefixed key, escaped
        assert response.status == 200 and (await response.json())["customer_id"] == "anon:x y"
        response = await client.get("/profiles/nobody")
        assert response.status == 404 and await response.json() == {"error": "there is no profile for customer "
                                                                              "'nobody'"}
    serve(test)


def test_explain():
    async def test(client, parts, metrics):
        response = await client.get("/profiles/c1/explain/cooks")
        body = await response.json()
        assert response.status == 200 and body["customer_id"] == "c1" and body["segment_id"] == "cooks"
        terms = [(t["sql"], t["value"], t["holds"]) for t in body["terms"]]
        assert terms[0] == ("has(survey_interests, 'cooking')", True, True)
        assert terms[1][0] == "category_affinity['cookware'] >= 0.3" and terms[1][2] is True
        assert terms[2] == ("nps >= 9", None, False)  # never answered the NPS question: NULL
        assert body["result"] is False and body["member"] is False and body["member_since"] is None
        body = await (await client.get("/profiles/c2/explain/cooks")).json()
        assert [t["holds"] for t in body["terms"]] == [True, False, True]
        assert body["consent"] == {"required": "marketing", "given": None, "holds": False}
        body = await (await client.get("/profiles/c1/explain/buyers")).json()
        assert body["result"] is True and body["member"] is True
        assert body["member_since"] == datetime.fromtimestamp((T0 - DAY_MS) / 1000, tz=UTC).isoformat()
        response = await client.get("/profiles/c1/explain/nope")
        assert response.status == 404 and "segment" in (await response.json())["error"]
        response = await client.get("/profiles/nobody/explain/buyers")
        assert response.status == 404 and "profile" in (await response.json())["error"]
    serve(test)


def test_unknown_routes_methods_and_failures_answer_json_sentences(caplog):
    parts = Parts()

    async def test(client, parts, metrics):
        response = await client.get("/nowhere")
        assert response.status == 404 and await response.json() == {"error": "there is no route GET /nowhere"}
        response = await client.post("/segments")
        assert response.status == 405 and "GET" in (await response.json())["error"]
        parts.states = None  # the lookup now raises TypeError
        response = await client.get("/profiles/c1")
        text = await response.text()
        assert response.status == 500 and response.content_type == "application/json"
        assert "Traceback" not in text and "TypeError" not in text and "internal error" in text
    with caplog.at_level(logging.ERROR, logger="pipeline.api"):
        serve(test, parts=parts)
    assert "Traceback" in caplog.text  # the stack trace goes to the log, not the client


def test_bearer_token(caplog):
    caplog.set_level(logging.DEBUG)

    async def test(client, parts, metrics):
        bodies = []
        for path in ("/segments", "/segments/buyers", "/cohorts/buyers", "/profiles/c1",
                     "/profiles/c1/explain/buyers", "/openapi.json", "/nowhere", "/", "/dashboard",
                     "/dashboard/data"):
            response = await client.get(path)
            body = await response.text()
            assert response.status == 401, path
            assert response.headers["WWW-Authenticate"] == 'Bearer realm="pipeline"'
            assert "bearer token" in (await response.json())["error"]
            response = await client.get(path, headers={"Authorization": "Bearer wrong-token"})
            assert response.status == 401 and "invalid_token" in response.headers["WWW-Authenticate"]
            assert await response.json() == {"error": "the bearer token is not valid"}
            response = await client.get(path, headers={"Authorization": f"Basic {TOKEN}"})
            assert response.status == 401
            response = await client.get(path, headers={"Authorization": f"Bearer {TOKEN}x"})
            assert response.status == 401
            response = await client.get(path, headers=AUTH)
            assert response.status == (404 if path == "/nowhere" else 200), path
            bodies += [body, await response.text(), str(response.headers)]
        for path in sorted(OPEN_PATHS):  # probes and Prometheus need no token
            response = await client.get(path)
            assert response.status == 200, path
            bodies += [await response.text(), str(response.headers)]
        response = await client.get("/profiles/nobody", headers=AUTH)
        bodies.append(await response.text())
        return bodies
    bodies = serve(test, token=TOKEN)
    assert all(TOKEN not in body for body in bodies)
    assert "wrong bearer token" in caplog.text and "wrong-token" not in caplog.text
    assert TOKEN not in caplog.text


def test_no_token_means_no_authentication():
    async def test(client, parts, metrics):
        assert (await client.get("/segments")).status == 200
        assert (await client.get("/profiles/c1", headers={"Authorization": "Bearer anything"})).status == 200
    serve(test, token=None)


def test_openapi_describes_every_route():
    async def test(client, parts, metrics):
        response = await client.get("/openapi.json")
        document = await response.json()
        assert response.status == 200 and document["openapi"].startswith("3.")
        registered = {}
        for route in client.app.router.routes():
            info = route.resource.get_info()
            registered.setdefault(info.get("path") or info.get("formatter"), set()).add(route.method.lower())
        assert set(registered) == set(document["paths"])  # every route described, nothing extra
        for path, methods in registered.items():
            described = document["paths"][path]
            assert methods == set(described), path
            for method in methods:
                operation = described[method]
                assert "200" in operation["responses"], path
                params = {(p["name"], p["in"]) for p in operation.get("parameters", [])}
                wanted = {(name, "path") for name in
                          [part[1:-1] for part in path.split("/") if part.startswith("{")]}
                assert wanted <= params, path
                open_route = path in OPEN_PATHS
                assert (operation.get("security") == []) is open_route, path
                assert ("401" in operation["responses"]) is not open_route, path
        cohort_params = {p["name"] for p in document["paths"]["/cohorts/{segment_id}"]["get"]["parameters"]}
        assert {"limit", "cursor"} <= cohort_params
        for path in document["paths"].values():  # every $ref resolves
            for ref in _refs(path):
                assert ref.rsplit("/", 1)[1] in document["components"]["schemas"], ref
    serve(test)


def _refs(node):
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref":
                yield value
            else:
                yield from _refs(value)
    elif isinstance(node, list):
        for value in node:
            yield from _refs(value)


def test_profile_requests_are_proxied_to_the_owning_worker():
    """Two workers: ``front`` owns no profile and routes c1 to ``owner``, which has it."""

    async def main():
        owner_parts, front_parts = Parts(), Parts()
        front_parts.states = {}  # this worker holds none of the profiles
        owner_app = build_api(backend=owner_parts.backend(), metrics=Metrics(), token=TOKEN)
        async with TestServer(owner_app) as owner_server:
            owner_url = str(owner_server.make_url("/"))
            front_parts.owner = lambda customer_id: owner_url if customer_id != "local" else None
            owner_parts.owner = lambda customer_id: "http://127.0.0.1:9"  # it thinks the front owns it: no loop
            front_app = build_api(backend=front_parts.backend(), metrics=Metrics(), token=TOKEN)
            async with TestClient(TestServer(front_app)) as front:
                response = await front.get("/profiles/c1", headers=AUTH)
                body = await response.json()
                assert response.status == 200 and body["customer_id"] == "c1" and body["orders_count"] == 1
                assert response.headers[SERVED_BY_HEADER] == f"127.0.0.1:{owner_server.port}"
                response = await front.get("/profiles/anon%3Ax%20y", headers=AUTH)
                assert response.status == 200 and (await response.json())["customer_id"] == "anon:x y"
                response = await front.get("/profiles/c1/explain/cooks", headers=AUTH)
                assert response.status == 200 and (await response.json())["terms"][0]["holds"] is True
                response = await front.get("/profiles/nobody", headers=AUTH)  # the owner's 404, passed on
                assert response.status == 404 and "nobody" in (await response.json())["error"]
                response = await front.get("/profiles/local", headers=AUTH)  # served here
                assert response.status == 404 and SERVED_BY_HEADER not in response.headers
                response = await front.get("/profiles/c1")  # no token: refused before any proxying
                assert response.status == 401
                assert owner_parts.lookups == ["c1", "anon:x y", "c1", "nobody"]
                assert front_parts.lookups == ["local"]
                # the owner goes away: a sentence, not a hang or a stack trace
                await owner_server.close()
                response = await front.get("/profiles/c1", headers=AUTH)
                body = await response.json()
                assert response.status == 502 and "could not be reached" in body["error"]
    asyncio.run(main())


def test_start_and_stop_inside_a_running_loop():
    async def main():
        app = build_api(backend=Parts().backend(), metrics=Metrics(), token=TOKEN)
        runner = await start_api(app, "127.0.0.1", 0)
        port = bound_port(runner)
        try:
            async with aiohttp.ClientSession() as session:
                async with session.get(f"http://127.0.0.1:{port}/health") as response:
                    assert response.status == 200
                async with session.get(f"http://127.0.0.1:{port}/segments", headers=AUTH) as response:
                    assert response.status == 200
        finally:
            await stop_api(runner)
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as session:
                await session.get(f"http://127.0.0.1:{port}/health")
    asyncio.run(main())


def test_dashboard_page_is_self_contained():
    async def test(client, parts, metrics):
        for path in ("/", "/dashboard"):
            response = await client.get(path)
            page = await response.text()
            assert response.status == 200 and response.content_type == "text/html", path
            assert response.headers["Cache-Control"] == "no-store"
            assert response.headers["Referrer-Policy"] == "no-referrer"
            assert "default-src 'none'" in response.headers["Content-Security-Policy"]
            # no external asset: no src/href at all, the only URL is the SVG namespace
            assert " src=" not in page and "href=" not in page and "@import" not in page and "url(" not in page
            urls = set(re.findall(r"https?://[^\s\"']+", page))
            assert urls == {"http://www.w3.org/2000/svg"}, urls
            assert "<svg id=\"chart\"" in page and 'fetch("dashboard/data"' in page
            assert "innerHTML" not in page  # data goes in as text only
    serve(test)


def test_dashboard_data():
    async def test(client, parts, metrics):
        response = await client.get("/dashboard/data")
        body = await response.json()
        assert response.status == 200 and response.headers["Cache-Control"] == "no-store"
        # every defined segment, 0 without members; a removed segment is not shown
        assert body["sizes"] == {"buyers": 25, "cooks": 0, "empty_one": 0}
        assert body["history"] == {"buyers": DASHBOARD_DATA["history"]["buyers"], "cooks": [], "empty_one": []}
        change = body["recent_changes"][0]
        assert change["changed_at"] == datetime.fromtimestamp(T0 / 1000, tz=UTC).isoformat()
        assert change["customer_id"].startswith("<img")  # JSON as is; the page writes it as text
        assert body["dead_letters"] == {"decode": 2, "schema": 1}
        assert datetime.fromisoformat(body["generated_at"]).tzinfo is not None

        parts.dashboard_fail = True
        response = await client.get("/dashboard/data")
        body = await response.json()
        assert response.status == 503 and "ClickHouse" in body["error"] and "down" not in body["error"]
    serve(test)


def test_dashboard_without_a_dashboard_callable_shows_sizes():
    async def main():
        async def no_members(segment_id):
            return []

        async def sizes():
            return {"buyers": 3}
        backend = WorkerBackend(segments=lambda: SEGMENTS, lookup=lambda key: None, now_ms=lambda key: T0,
                                members=no_members, sizes=sizes, ready=lambda: True)
        data = await backend.dashboard()
        assert data["sizes"] == {"buyers": 3, "cooks": 0, "empty_one": 0}
        assert data["recent_changes"] == [] and data["dead_letters"] == {}
    asyncio.run(main())


def test_dashboard_page_accepts_the_token_in_its_url_only(caplog):
    caplog.set_level(logging.DEBUG)

    async def test(client, parts, metrics):
        bodies = []
        for path in ("/", "/dashboard"):
            response = await client.get(path, params={"token": TOKEN})
            bodies.append(await response.text())
            assert response.status == 200, path
            response = await client.get(path, params={"token": "wrong"})
            assert response.status == 401 and await response.json() == {"error": "the bearer token is not valid"}
            response = await client.get(path, params={"token": ""})
            assert response.status == 401 and "?token=" in (await response.json())["error"]
            # a header, when sent, is what counts
            response = await client.get(path, params={"token": TOKEN}, headers={"Authorization": "Bearer wrong"})
            assert response.status == 401
            response = await client.get(path, headers=AUTH)
            assert response.status == 200
        # the data and every other route want the header: a token in a URL ends up in logs and histories
        for path in ("/dashboard/data", "/segments", "/cohorts/buyers", "/openapi.json"):
            response = await client.get(path, params={"token": TOKEN})
            bodies.append(await response.text())
            assert response.status == 401, path
        response = await client.get("/dashboard/data", headers=AUTH)
        assert response.status == 200
        return bodies
    bodies = serve(test, token=TOKEN)
    assert all(TOKEN not in body for body in bodies)  # the page never carries the token
    # the API's own log lines never name it (the test server's access log is aiohttp's; the worker's
    # is RedactingAccessLogger, see test_access_log_redacts_the_token)
    assert not [r for r in caplog.records if r.name != "aiohttp.access" and TOKEN in r.getMessage()]


def test_access_log_redacts_the_token(caplog):
    caplog.set_level(logging.INFO, logger="aiohttp.access")

    async def main():
        runner = await start_api(build_api(backend=Parts().backend(), metrics=Metrics(), token=TOKEN),
                                 "127.0.0.1", 0)
        try:
            async with aiohttp.ClientSession() as session:
                url = f"http://127.0.0.1:{bound_port(runner)}/dashboard"
                async with session.get(url, params={"token": TOKEN, "x": "1"}) as response:
                    assert response.status == 200
        finally:
            await stop_api(runner)
    asyncio.run(main())
    access = [r.getMessage() for r in caplog.records if r.name == "aiohttp.access"]
    assert access and "/dashboard?token=REDACTED&x=1" in access[0] and " 200 " in access[0]
    assert TOKEN not in caplog.text
