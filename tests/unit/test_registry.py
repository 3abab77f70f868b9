"""The Schema Registry client and the registry path of decode, against a real HTTP server
(http.server in a thread on 127.0.0.1) that implements the registry REST calls used."""

import base64
import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import schemas
from pipeline.decode import decode, encode_avro, read_record, schema_id_of
from pipeline.events import DeadLetter, Event
from pipeline.registry import LocalSchemas, RegistrySchemas, schema_source, subject_for
from tests.unit.test_decode import NOW, click, v2_clickstream, v2_dir


class FakeRegistry:
    """A Confluent-compatible registry: GET /schemas/ids/{id}, POST /subjects/{s}/versions."""

    def __init__(self, *, auth: tuple[str, str] | None = None, port: int = 0) -> None:
        self.schemas: dict[int, dict] = {}  # id -> {"schema": str, "schemaType"?: str}
        self.subjects: dict[str, list[int]] = {}
        self.requests: list[tuple[str, str]] = []
        self.auth = auth
        self.delay = 0.0
        registry = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _answer(self, status, body):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                try:
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def _authorized(self):
                if registry.auth is None:
                    return True
                expected = "Basic " + base64.b64encode(":".join(registry.auth).encode()).decode()
                if self.headers.get("Authorization") == expected:
                    return True
                self._answer(401, {"error_code": 401, "message": "Unauthorized"})
                return False

            def do_GET(self):
                registry.requests.append(("GET", self.path))
                time.sleep(registry.delay)
                if not self._authorized():
                    return
                parts = self.path.strip("/").split("/")
                if len(parts) == 3 and parts[:2] == ["schemas", "ids"] and parts[2].isdigit():
                    entry = registry.schemas.get(int(parts[2]))
                    if entry is None:
                        return self._answer(404, {"error_code": 40403, "message": "Schema not found"})
                    return self._answer(200, entry)
                self._answer(404, {"error_code": 404, "message": "HTTP 404 Not Found"})

            def do_POST(self):
                registry.requests.append(("POST", self.path))
                if not self._authorized():
                    return
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                parts = self.path.strip("/").split("/")
                if len(parts) != 3 or parts[0] != "subjects" or parts[2] != "versions":
                    return self._answer(404, {"error_code": 404, "message": "HTTP 404 Not Found"})
                text = json.dumps(json.loads(body["schema"]), sort_keys=True)
                same = [i for i, e in registry.schemas.items()  # same schema, same id (as Confluent's)
                        if json.dumps(json.loads(e["schema"]), sort_keys=True) == text]
                schema_id = same[0] if same else max(registry.schemas, default=0) + 1
                registry.schemas.setdefault(schema_id, {"schema": body["schema"]})
                registry.subjects.setdefault(parts[1], []).append(schema_id)
                self._answer(200, {"id": schema_id})

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)

    def gets(self):
        return [path for method, path in self.requests if method == "GET"]


@pytest.fixture
def registry():
    with FakeRegistry() as fake:
        yield fake


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_registered_schema_is_fetched_once_and_decoded(registry):
    resolver = RegistrySchemas(registry.url)
    schema_id = resolver.register(subject_for("clickstream"), schemas.raw_schema("clickstream"))
    assert schema_id >= 1 and registry.subjects == {"clickstream-value": [schema_id]}
    assert resolver.register("clickstream-value", schemas.raw_schema("clickstream")) == schema_id
    assert len([r for r in registry.requests if r[0] == "POST"]) == 1  # the second register was cached
    fresh = RegistrySchemas(registry.url)  # a worker that did not register: must fetch by id
    messages = [encode_avro("clickstream", click(event_id=f"e{i}"), schema_id) for i in range(50)]
    assert schema_id_of(messages[0]) == schema_id and fresh.missing([schema_id]) == {schema_id}
    events = [decode("clickstream", m, now_ms=NOW, resolver=fresh) for m in messages]
    assert all(isinstance(e, Event) for e in events)
    assert events[0] == decode("clickstream", json.dumps(click(event_id="e0")).encode(), now_ms=NOW)
    assert registry.gets() == [f"/schemas/ids/{schema_id}"] and fresh.fetches == 1
    assert fresh.missing([schema_id]) == set()


def test_unknown_id_is_a_dead_letter_and_not_refetched_every_message(registry):
    resolver = RegistrySchemas(registry.url)
    message = encode_avro("clickstream", click(), 4242)
    for _ in range(3):
        dead = decode("clickstream", message, now_ms=NOW, resolver=resolver)
        assert isinstance(dead, DeadLetter) and dead.error_class == "unknown_schema_id"
        assert "schema id 4242 is not in the schema registry" in dead.error_message and dead.payload == message
    assert registry.gets() == ["/schemas/ids/4242"]


def test_unreachable_registry_is_a_dead_letter_fast_and_recovers():
    port = free_port()
    resolver = RegistrySchemas(f"http://user:s3cret@127.0.0.1:{port}", timeout_s=1.0, retry_after_s=0.3)
    message = encode_avro("clickstream", click(), 7)
    dead = decode("clickstream", message, now_ms=NOW, resolver=resolver)
    assert isinstance(dead, DeadLetter) and dead.error_class == "schema_registry_unavailable"
    assert "cannot be reached" in dead.error_message and "s3cret" not in dead.error_message
    started = time.monotonic()
    again = decode("clickstream", message, now_ms=NOW, resolver=resolver)
    assert again.error_class == "schema_registry_unavailable" and "not retried" in again.error_message
    assert time.monotonic() - started < 0.1 and resolver.fetches == 1
    with FakeRegistry(port=port) as fake:  # the registry comes back on that port
        fake.schemas[7] = {"schema": json.dumps(schemas.raw_schema("clickstream"))}
        time.sleep(0.35)
        assert isinstance(decode("clickstream", message, now_ms=NOW, resolver=resolver), Event)


def test_slow_registry_times_out_into_a_dead_letter(registry):
    registry.delay = 1.0
    resolver = RegistrySchemas(registry.url, timeout_s=0.2)
    started = time.monotonic()
    dead = decode("clickstream", encode_avro("clickstream", click(), 3), now_ms=NOW, resolver=resolver)
    assert dead.error_class == "schema_registry_unavailable" and time.monotonic() - started < 0.9


def test_basic_auth_from_the_url():
    with FakeRegistry(auth=("svc", "p@ss")) as fake:
        fake.schemas[1] = {"schema": json.dumps(schemas.raw_schema("clickstream"))}
        message = encode_avro("clickstream", click(), 1)
        assert isinstance(decode("clickstream", message, now_ms=NOW,
                                 resolver=RegistrySchemas(fake.url.replace("//", "//svc:p%40ss@"))), Event)
        dead = decode("clickstream", message, now_ms=NOW, resolver=RegistrySchemas(fake.url))
        assert dead.error_class == "schema_registry_unavailable" and "HTTP 401" in dead.error_message


def test_non_avro_and_invalid_schemas_are_refused(registry):
    registry.schemas[5] = {"schema": 'syntax = "proto3";', "schemaType": "PROTOBUF"}
    registry.schemas[6] = {"schema": json.dumps({"type": "record", "name": "X", "fields": [{"name": "a"}]})}
    resolver = RegistrySchemas(registry.url)
    proto = decode("clickstream", encode_avro("clickstream", click(), 5), now_ms=NOW, resolver=resolver)
    assert proto.error_class == "unsupported_schema" and "PROTOBUF" in proto.error_message
    broken = decode("clickstream", encode_avro("clickstream", click(), 6), now_ms=NOW, resolver=resolver)
    assert broken.error_class == "unsupported_schema" and "not a valid Avro schema" in broken.error_message


def test_incompatible_writer_is_a_dead_letter(registry):
    writer = {"type": "record", "name": "ClickstreamEvent", "namespace": "io.segments.input",
              "fields": [{"name": "event_id", "type": "string", "doc": "id"}]}
    resolver = RegistrySchemas(registry.url)
    schema_id = resolver.register("clickstream-value", writer)
    data = encode_avro("clickstream", {"event_id": "e1"}, schema_id, schema=writer)
    dead = decode("clickstream", data, now_ms=NOW, resolver=RegistrySchemas(registry.url))
    assert dead.error_class == "incompatible_schema" and f"schema id {schema_id}" in dead.error_message


def test_prefetch_resolves_ids_off_the_decode_path_and_never_raises(registry):
    registry.schemas[1] = {"schema": json.dumps(schemas.raw_schema("pos"))}
    resolver = RegistrySchemas(registry.url)
    resolver.prefetch([0, 1, 99])  # 0 is the local schema: no lookup; 99 is unknown: remembered
    assert sorted(registry.gets()) == ["/schemas/ids/1", "/schemas/ids/99"]
    assert resolver.missing([0, 1, 99]) == {99}
    assert decode("clickstream", encode_avro("clickstream", click(), 99), now_ms=NOW,
                  resolver=resolver).error_class == "unknown_schema_id"
    assert len(registry.gets()) == 2


def test_schema_source_from_settings_value(registry):
    assert isinstance(schema_source(None), LocalSchemas)
    assert isinstance(schema_source(registry.url), RegistrySchemas)
    assert isinstance(schema_source(""), LocalSchemas)


# Item 6: schema evolution through the registry ------------------------------------------


def test_v2_producer_read_by_v1_worker(registry):
    producer = RegistrySchemas(registry.url)
    v2_id = producer.register("clickstream-value", v2_clickstream())
    data = encode_avro("clickstream", {**click(), "device": "tablet"}, v2_id, schema=v2_clickstream())
    v1_worker = RegistrySchemas(registry.url)  # reader: schemas/ as shipped (v1)
    record = read_record("clickstream", data, resolver=v1_worker)
    assert "device" not in record and record["event_id"] == "e1"
    assert decode("clickstream", data, now_ms=NOW, resolver=v1_worker) == \
        decode("clickstream", json.dumps(click()).encode(), now_ms=NOW)


def test_v1_producer_read_by_v2_worker(registry, tmp_path):
    producer = RegistrySchemas(registry.url)
    v1_id = producer.register("clickstream-value", schemas.raw_schema("clickstream"))
    data = encode_avro("clickstream", click(), v1_id)
    v2_worker = RegistrySchemas(registry.url, local=LocalSchemas(v2_dir(tmp_path)))
    record = read_record("clickstream", data, resolver=v2_worker)
    assert record["device"] == "unknown" and record["event_id"] == "e1"
    assert isinstance(decode("clickstream", data, now_ms=NOW, resolver=v2_worker), Event)
    # and both versions side by side on one topic, for the same v2 worker
    v2_id = producer.register("clickstream-value", v2_clickstream())
    newer = encode_avro("clickstream", {**click(), "device": "tv"}, v2_id, schema=v2_clickstream())
    assert read_record("clickstream", newer, resolver=v2_worker)["device"] == "tv"
    assert registry.subjects["clickstream-value"] == [v1_id, v2_id] and v1_id != v2_id


@pytest.fixture(scope="module")
def shared_registry():
    with FakeRegistry() as fake:
        for schema_id, name in enumerate(["clickstream", "pos", "crm", "surveys"], start=1):
            fake.schemas[schema_id] = {"schema": json.dumps(schemas.raw_schema(name))}
        fake.schemas[5] = {"schema": json.dumps(v2_clickstream())}
        yield RegistrySchemas(fake.url)


@settings(max_examples=200, deadline=None)
@given(source=st.sampled_from(["clickstream", "pos", "crm", "surveys"]),
       schema_id=st.integers(0, 6) | st.integers(0, 2**32 - 1), body=st.binary(max_size=100))
def test_arbitrary_framed_bytes_with_a_registry_never_raise(shared_registry, source, schema_id, body):
    data = b"\x00" + schema_id.to_bytes(4, "big") + body
    assert isinstance(decode(source, data, now_ms=NOW, resolver=shared_registry), (Event, DeadLetter))
