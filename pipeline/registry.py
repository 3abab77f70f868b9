"""Where ``decode`` gets its Avro schemas: the reader schemas of ``schemas/`` and the writer
schema of each message — by Confluent schema id from a Schema Registry, or by fingerprint
from the local directory (docs/formats.md describes the framings).

* ``LocalSchemas``: no registry. Reader schemas are ``schemas/<topic kind>.avsc``; every
  ``*.avsc`` of the directory (older versions kept as e.g. ``clickstream.v1.avsc`` included)
  is a known writer, addressed by its CRC-64-AVRO fingerprint (Avro single-object encoding).
  A Confluent schema id other than 0 cannot be looked up and is refused.
* ``RegistrySchemas``: the same, plus Confluent schema ids resolved through a
  Confluent-compatible Schema Registry (``GET /schemas/ids/{id}``), cached for the life of the
  process. ``register`` (``POST /subjects/{subject}/versions``) is the producer side.

Lookups raise ``SchemaLookupError`` subclasses, each with an ``error_class`` and a sentence;
``decode`` turns them into dead letters and never raises.

Blocking I/O: the first lookup of an id is an HTTP request (timeout ``timeout_s``, 2 s by
default); later ones are a dict lookup. A faust agent must not pay that on the event loop:
before decoding a batch, collect the ids (``pipeline.decode.schema_id_of``), and when
``resolver.missing(ids)`` is not empty run ``resolver.prefetch(ids)`` in an executor
(``await loop.run_in_executor(None, resolver.prefetch, ids)``); ``prefetch`` never raises, and
ids it could not fetch then become dead letters in ``decode`` (failures are remembered, so
this does not block again). After a failure to reach the registry, lookups fail fast for
``retry_after_s`` seconds instead of waiting for a timeout on every message.
"""

from __future__ import annotations

import base64
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any, Protocol

import fastavro
from fastavro.schema import fingerprint, to_parsing_canonical_form

from pipeline import schemas
from pipeline.errors import PipelineError

CONTENT_TYPE = "application/vnd.schemaregistry.v1+json"


class SchemaLookupError(PipelineError):
    """A writer or reader schema could not be found; ``error_class`` names the kind."""

    error_class = "schema_error"

    def __init__(self, message: str, error_class: str | None = None) -> None:
        super().__init__(message)
        if error_class:
            self.error_class = error_class
        self.message = message


class UnknownSchemaError(SchemaLookupError):
    """No schema under this id (or fingerprint)."""

    error_class = "unknown_schema_id"


class RegistryUnavailableError(SchemaLookupError):
    """The registry could not be reached or answered with an error."""

    error_class = "schema_registry_unavailable"


class UnsupportedSchemaError(SchemaLookupError):
    """The registry holds a schema this pipeline cannot read (not Avro, references, invalid)."""

    error_class = "unsupported_schema"


def canonical_fingerprint(schema: dict[str, Any] | str) -> bytes:
    """The 8-byte CRC-64-AVRO fingerprint of a schema's Parsing Canonical Form, in the byte
    order of the Avro single-object encoding (little-endian)."""
    return bytes.fromhex(fingerprint(to_parsing_canonical_form(schema), "CRC-64-AVRO"))


@dataclass(frozen=True, slots=True)
class ReaderSchema:
    """The schema a worker reads one topic kind with."""

    name: str
    raw: dict[str, Any]
    parsed: Any
    fields: tuple[schemas.FieldSpec, ...]


class SchemaSource(Protocol):
    """What ``decode`` needs: reader schemas, and writer schemas by id or fingerprint.

    The writer lookups raise ``SchemaLookupError`` (never anything else on purpose).
    """

    def reader(self, source: str) -> ReaderSchema: ...

    def writer_by_id(self, schema_id: int) -> Any: ...

    def writer_by_fingerprint(self, fp: bytes) -> Any: ...


class LocalSchemas:
    """Schemas from a directory (default ``schemas/``), no registry."""

    def __init__(self, directory: Path | None = None, *, writers: Iterable[Mapping[str, Any]] = ()) -> None:
        self.directory = Path(directory) if directory is not None else schemas.schemas_dir()
        self._readers: dict[str, ReaderSchema] = {}
        for source, name in schemas.INPUT_SCHEMAS.items():
            raw = schemas.load_raw(self.directory / f"{name}.avsc")
            self._readers[source] = ReaderSchema(name, raw, fastavro.parse_schema(raw), schemas.specs_of(raw))
        self._by_fingerprint: dict[bytes, Any] = {}
        for path in sorted(self.directory.glob("*.avsc")):
            self.add_writer(schemas.load_raw(path))
        for extra in writers:
            self.add_writer(extra)

    def add_writer(self, raw: Mapping[str, Any]) -> bytes:
        """Make a writer schema known (e.g. an older version); returns its fingerprint."""
        fp = canonical_fingerprint(dict(raw))
        self._by_fingerprint[fp] = fastavro.parse_schema(dict(raw))
        return fp

    def reader(self, source: str) -> ReaderSchema:
        try:
            return self._readers[source]
        except KeyError:
            raise SchemaLookupError(f"no input schema for topic kind {source!r}", "unknown_source") from None

    def writer_by_fingerprint(self, fp: bytes) -> Any:
        try:
            return self._by_fingerprint[fp]
        except KeyError:
            raise UnknownSchemaError(
                f"no schema with fingerprint {fp.hex()} in {self.directory}: the writer schema is newer or "
                "foreign; add it there (e.g. as <name>.vN.avsc) or use the schema registry",
                "unknown_schema_fingerprint") from None

    def writer_by_id(self, schema_id: int) -> Any:
        raise UnknownSchemaError(
            f"schema id {schema_id} cannot be looked up: no schema registry is configured "
            "(PIPELINE_SCHEMA_REGISTRY_URL); without one, Avro must carry schema id 0 (the topic's "
            "schema in schemas/) or use the single-object encoding")


class RegistryClient:
    """The few REST calls of a Confluent-compatible Schema Registry used here (blocking)."""

    def __init__(self, url: str, *, timeout_s: float = 2.0) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise SchemaLookupError(f"schema registry URL {url!r} must be http(s)://host[:port][/path]",
                                    "invalid_registry_url")
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        self.base = urllib.parse.urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        self.timeout_s = timeout_s
        self._headers = {"Accept": f"{CONTENT_TYPE}, application/json"}
        if parts.username is not None:  # Basic auth from user:password@ (never shown in messages)
            user = urllib.parse.unquote(parts.username)
            password = urllib.parse.unquote(parts.password or "")
            token = base64.b64encode(f"{user}:{password}".encode()).decode()
            self._headers["Authorization"] = f"Basic {token}"

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        headers = dict(self._headers)
        if data is not None:
            headers["Content-Type"] = CONTENT_TYPE
        request = urllib.request.Request(self.base + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                payload = response.read()
        except urllib.error.HTTPError as exc:
            detail = _error_detail(exc)
            if exc.code == 404:
                raise UnknownSchemaError(f"the schema registry at {self.base} answered 404 to {method} {path}"
                                         f"{detail}") from None
            raise RegistryUnavailableError(f"the schema registry at {self.base} answered HTTP {exc.code} to "
                                           f"{method} {path}{detail}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RegistryUnavailableError(f"the schema registry at {self.base} cannot be reached "
                                           f"({type(reason).__name__}: {reason})") from None
        try:
            return json.loads(payload)
        except ValueError:
            raise RegistryUnavailableError(f"the schema registry at {self.base} answered {method} {path} "
                                           "with something that is not JSON") from None

    def get_schema(self, schema_id: int) -> dict[str, Any]:
        """The raw Avro schema registered under ``schema_id`` (``GET /schemas/ids/{id}``)."""
        try:
            answer = self._call("GET", f"/schemas/ids/{int(schema_id)}")
        except UnknownSchemaError:
            raise UnknownSchemaError(f"schema id {schema_id} is not in the schema registry at {self.base}") from None
        if not isinstance(answer, dict) or not isinstance(answer.get("schema"), str):
            raise RegistryUnavailableError(f"the schema registry at {self.base} answered schema id {schema_id} "
                                           "without a 'schema' string")
        schema_type = answer.get("schemaType", "AVRO")
        if schema_type != "AVRO":
            raise UnsupportedSchemaError(f"schema id {schema_id} is a {schema_type} schema; only Avro is read")
        if answer.get("references"):
            raise UnsupportedSchemaError(f"schema id {schema_id} has schema references, which are not supported")
        try:
            raw = json.loads(answer["schema"])
        except ValueError:
            raise UnsupportedSchemaError(f"schema id {schema_id} is not valid JSON") from None
        if not isinstance(raw, dict):
            raise UnsupportedSchemaError(f"schema id {schema_id} is not a record schema")
        return raw

    def register(self, subject: str, schema: Mapping[str, Any]) -> int:
        """Register (or find) ``schema`` under ``subject``; its id (``POST /subjects/{subject}/versions``)."""
        path = f"/subjects/{urllib.parse.quote(subject, safe='')}/versions"
        answer = self._call("POST", path, {"schema": json.dumps(schema, separators=(",", ":"))})
        if not isinstance(answer, dict) or not isinstance(answer.get("id"), int):
            raise RegistryUnavailableError(f"the schema registry at {self.base} answered {path} without an id")
        schema_id: int = answer["id"]
        return schema_id


def _error_detail(exc: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(exc.read() or b"null")
    except (ValueError, OSError):
        return ""
    if isinstance(body, dict) and body.get("message"):
        return f" ({body.get('error_code', exc.code)}: {str(body['message'])[:200]})"
    return ""


def subject_for(topic: str) -> str:
    """The subject of a topic's values under the registry's default TopicNameStrategy."""
    return f"{topic}-value"


class RegistrySchemas:
    """A ``SchemaSource`` resolving Confluent schema ids through a Schema Registry, cached.

    Reader schemas and fingerprints come from ``local`` (default: ``schemas/``). Thread-safe.
    """

    def __init__(self, url: str, *, local: LocalSchemas | None = None, timeout_s: float = 2.0,
                 retry_after_s: float = 5.0, unknown_ttl_s: float = 60.0) -> None:
        self.client = RegistryClient(url, timeout_s=timeout_s)
        self.local = local if local is not None else LocalSchemas()
        self.retry_after_s = retry_after_s
        self.unknown_ttl_s = unknown_ttl_s
        self._by_id: dict[int, Any] = {}
        self._failed: dict[int, tuple[float, SchemaLookupError]] = {}  # id -> (until, error)
        self._down: tuple[float, str] | None = None  # (until, reason) after the registry was unreachable
        self._registered: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self.fetches = 0  # HTTP lookups made (observability, tests)

    def reader(self, source: str) -> ReaderSchema:
        return self.local.reader(source)

    def writer_by_fingerprint(self, fp: bytes) -> Any:
        return self.local.writer_by_fingerprint(fp)

    def missing(self, ids: Iterable[int]) -> set[int]:
        """The ids among ``ids`` whose lookup would make an HTTP request now."""
        return {i for i in ids if i and i not in self._by_id}

    def writer_by_id(self, schema_id: int) -> Any:
        cached = self._by_id.get(schema_id)
        if cached is not None:
            return cached
        with self._lock:
            cached = self._by_id.get(schema_id)
            if cached is not None:
                return cached
            now = time.monotonic()
            failed = self._failed.get(schema_id)
            if failed is not None and failed[0] > now:
                raise type(failed[1])(failed[1].message, failed[1].error_class)
            if self._down is not None and self._down[0] > now:
                raise RegistryUnavailableError(f"{self._down[1]}; not retried for {self._down[0] - now:.1f} s")
            self.fetches += 1
            try:
                raw = self.client.get_schema(schema_id)
                try:
                    parsed = fastavro.parse_schema(raw)
                except Exception as exc:  # noqa: BLE001 - fastavro raises several kinds
                    raise UnsupportedSchemaError(
                        f"schema id {schema_id} is not a valid Avro schema: {type(exc).__name__}: {exc}"[:300]
                    ) from None
            except RegistryUnavailableError as exc:
                self._down = (now + self.retry_after_s, exc.message)
                raise
            except SchemaLookupError as exc:
                if len(self._failed) > 10_000:
                    self._failed.clear()
                self._failed[schema_id] = (now + self.unknown_ttl_s, exc)
                raise
            self._down = None
            self._by_id[schema_id] = parsed
            return parsed

    def prefetch(self, ids: Iterable[int]) -> None:
        """Look up every id not cached yet (blocking; run it off the event loop). Never raises."""
        for schema_id in sorted(self.missing(ids)):
            try:
                self.writer_by_id(schema_id)
            except SchemaLookupError:
                pass

    def register(self, subject: str, schema: Mapping[str, Any]) -> int:
        """The id of ``schema`` under ``subject``, registering it if needed (cached; blocking)."""
        key = (subject, to_parsing_canonical_form(dict(schema)))
        known = self._registered.get(key)
        if known is not None:
            return known
        schema_id = self.client.register(subject, schema)
        parsed = fastavro.parse_schema(dict(schema))
        with self._lock:
            self._registered[key] = schema_id
            self._by_id.setdefault(schema_id, parsed)
        return schema_id


@cache
def default_schemas() -> LocalSchemas:
    """The ``LocalSchemas`` of ``schemas/``, built once (``decode``'s default resolver)."""
    return LocalSchemas()


def schema_source(registry_url: str | None = None, *, directory: Path | None = None,
                  timeout_s: float = 2.0) -> LocalSchemas | RegistrySchemas:
    """The resolver for a worker: ``RegistrySchemas`` when a registry URL is given, else local.

    ``schema_source(settings.schema_registry_url)`` is how the app builds it.
    """
    local = LocalSchemas(directory) if directory is not None else default_schemas()
    if registry_url:
        return RegistrySchemas(registry_url, local=local, timeout_s=timeout_s)
    return local
