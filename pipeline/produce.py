"""`pipeline produce` (and `pipeline generate --broker`): publish input events to a Kafka topic.

Files are read in one of three formats (``format_of``: from the extension unless given):

- **jsonl** (``.jsonl``, ``.ndjson``, ``.json``): one JSON object per line, sent as it is;
- **csv** (``.csv``): a header row with the topic's field names (docs/formats.md); each row
  becomes a JSON message (``csv_record``): numbers, booleans and epoch-millisecond timestamps
  are converted by the field's Avro type, an empty cell is an absent field, maps and arrays of
  records (``items``, ``properties``, ``traits``, ``answers``) are JSON in the cell, and arrays
  of strings (``interests``, ``motivations``) are JSON or ``a;b;c``. A cell that cannot be
  converted is sent as its text (the pipeline dead-letters it, and produce reports it first);
- **avro** (``.avro``): an Avro object container file, re-encoded message by message: with
  ``PIPELINE_SCHEMA_REGISTRY_URL`` in the Confluent wire format under the id the registry gives
  the file's writer schema (subject ``<topic>-value``); without one, read into the topic's
  schema of ``schemas/`` and written in the single-object encoding (no registry needed).

Every message is keyed like the pipeline partitions it: ``pipeline.identity.routing_key`` of
the decoded event (customer id, else loyalty id, else e-mail hash, else anonymous id), so one
customer's events stay in order. A message that does not decode is still sent (the worker
dead-letters it with its reason) unless ``strict``; the reasons are counted before sending.
"""

from __future__ import annotations

import csv
import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from pipeline import schemas
from pipeline.decode import Limits, decode, encode_avro, encode_single_object
from pipeline.errors import BrokerError, PipelineError
from pipeline.events import DeadLetter
from pipeline.identity import routing_key
from pipeline.registry import RegistrySchemas, SchemaLookupError, SchemaSource, subject_for

FORMATS = ("jsonl", "csv", "avro")
EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".csv": "csv", ".avro": "avro"}
TRUE = {"true", "1", "yes", "y", "t"}
FALSE = {"false", "0", "no", "n", "f"}


@dataclass
class Prepared:
    """The messages of one file, ready to send, and what the pipeline will make of them."""

    messages: list[tuple[bytes | None, bytes]] = field(default_factory=list)  # (key, value)
    dead_letters: Counter[str] = field(default_factory=Counter)  # "class: message" -> count
    encoding: str = "json"


@dataclass
class Published:
    sent: int = 0
    failed: int = 0
    seconds: float = 0.0
    errors: Counter[str] = field(default_factory=Counter)


def format_of(path: Path, given: str | None = None) -> str:
    """The file's format: ``given``, else from its extension."""
    if given is not None:
        if given not in FORMATS:
            raise PipelineError(f"--format {given}: expected one of {', '.join(FORMATS)}")
        return given
    found = EXTENSIONS.get(path.suffix.lower())
    if found is None:
        raise PipelineError(f"{path}: cannot tell the format from the extension {path.suffix or '(none)'!r}; "
                            f"give --format {'|'.join(FORMATS)}")
    return found


def _check_source(source: str) -> None:
    if source not in schemas.INPUT_SCHEMAS:
        raise PipelineError(f"--source {source}: unknown source; expected one of {', '.join(schemas.INPUT_SCHEMAS)}")


def _check_file(path: Path) -> None:
    if not path.exists():
        raise PipelineError(f"{path}: no such file")
    if not path.is_file():
        raise PipelineError(f"{path}: not a file")


# --- JSON Lines ---------------------------------------------------------------------------------

def read_jsonl(path: Path) -> Iterator[bytes]:
    """The lines of a JSON Lines file as they are (blank lines skipped)."""
    _check_file(path)
    with open(path, "rb") as handle:
        for line in handle:
            if line.strip():
                yield line.rstrip(b"\r\n")


# --- CSV ----------------------------------------------------------------------------------------

def _convert(spec: schemas.FieldSpec, cell: str) -> Any:
    """A CSV cell as the JSON value of the field ``spec``; the text itself when it does not convert."""
    text = cell.strip()
    kind = spec.kind
    try:
        if kind in ("int", "long"):
            return int(text)
        if kind in ("double", "float"):
            return float(text)
        if kind == "boolean":
            lowered = text.lower()
            if lowered in TRUE:
                return True
            if lowered in FALSE:
                return False
            return text
        if kind == "timestamp":
            return int(text) if text.lstrip("-").isdigit() else text
        if kind == "map":
            return json.loads(text)
        if kind == "array":
            if text.startswith("["):
                return json.loads(text)
            if spec.item_kind == "string":
                return [part.strip() for part in text.split(";") if part.strip()]
            return text
    except ValueError:
        return cell
    return cell


def csv_record(source: str, row: dict[str, str | None]) -> dict[str, Any]:
    """One CSV row (header -> cell) as a JSON record of ``source``'s schema (module doc).

    Columns the schema does not know are kept as strings (the decoder ignores them); an empty
    cell is an absent field (null or the schema default).
    """
    _check_source(source)
    specs = {spec.name: spec for spec in schemas.field_specs(schemas.INPUT_SCHEMAS[source])}
    record: dict[str, Any] = {}
    for name, cell in row.items():
        if name is None:
            continue  # cells beyond the header (csv.DictReader's restkey)
        column = name.strip()
        if not column or cell is None or not cell.strip():
            continue
        spec = specs.get(column)
        record[column] = _convert(spec, cell) if spec is not None else cell
    return record


def read_csv(path: Path, source: str) -> Iterator[bytes]:
    """The rows of a CSV file with a header, each as a JSON message (``csv_record``)."""
    _check_file(path)
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if not reader.fieldnames:
            raise PipelineError(f"{path}: empty CSV file; expected a header row with the field names")
        unknown = [n for n in reader.fieldnames if n and n.strip() not in
                   {s.name for s in schemas.field_specs(schemas.INPUT_SCHEMAS[source])}]
        if len(unknown) == len(reader.fieldnames):
            raise PipelineError(f"{path}: no column of the header is a field of {source} "
                                f"(got {', '.join(reader.fieldnames)[:200]}); see docs/formats.md")
        try:
            for row in reader:
                if not any((cell or "").strip() for cell in row.values() if isinstance(cell, str)):
                    continue
                yield json.dumps(csv_record(source, row), separators=(",", ":")).encode()
        except csv.Error as exc:
            raise PipelineError(f"{path}, line {reader.line_num}: not valid CSV: {exc}") from None
        except UnicodeDecodeError as exc:
            raise PipelineError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


# --- Avro container files -----------------------------------------------------------------------

def read_avro(path: Path, source: str, *, registry: RegistrySchemas | None = None,
              topic: str | None = None) -> Iterator[bytes]:
    """The records of an Avro container file, each re-encoded as one message (module doc)."""
    import fastavro

    _check_file(path)
    raw_local = schemas.raw_schema(schemas.INPUT_SCHEMAS[source])
    with open(path, "rb") as handle:
        try:
            if registry is not None:
                reader = fastavro.reader(handle)
                writer_schema = json.loads(reader.metadata["avro.schema"])
                try:
                    schema_id = registry.register(subject_for(topic or source), writer_schema)
                except SchemaLookupError as exc:
                    raise PipelineError(f"cannot register the schema of {path}: {exc}") from None
                for record in reader:
                    yield encode_avro(source, record, schema_id, schema=writer_schema)
            else:
                reader = fastavro.reader(handle, reader_schema=fastavro.parse_schema(raw_local))
                for record in reader:
                    yield encode_single_object(source, record)
        except PipelineError:
            raise
        except Exception as exc:  # noqa: BLE001 - fastavro raises many kinds; one sentence for them all
            hint = ("" if registry is not None else
                    f" (records are read into the topic's schema schemas/{schemas.INPUT_SCHEMAS[source]}.avsc)")
            raise PipelineError(f"{path}: cannot read it as an Avro container file of {source}{hint}: "
                                f"{type(exc).__name__}: {str(exc)[:160]}") from None


# --- all formats --------------------------------------------------------------------------------

def key_of(source: str, value: bytes, *, now_ms: int, resolver: SchemaSource | None = None,
           limits: Limits = Limits()) -> tuple[bytes | None, DeadLetter | None]:
    """The message key the pipeline would route ``value`` by, or the dead letter it will become."""
    event = decode(source, value, now_ms=now_ms, limits=limits, resolver=resolver)
    if isinstance(event, DeadLetter):
        return None, event
    key = routing_key(customer_id=event.customer_id, loyalty_id=event.loyalty_id,
                      email_hash=event.email_hash, anonymous_id=event.anonymous_id)
    return (key.encode() if key else None), None


def prepare(source: str, path: Path, *, fmt: str | None = None, registry_url: str | None = None,
            topic: str | None = None, limits: Limits = Limits()) -> Prepared:
    """Read ``path`` and key every message (module doc); raises PipelineError for a bad file."""
    _check_source(source)
    _check_file(path)
    kind = format_of(path, fmt)
    registry = RegistrySchemas(registry_url) if registry_url and kind == "avro" else None
    if kind == "jsonl":
        values: Iterable[bytes] = read_jsonl(path)
    elif kind == "csv":
        values = read_csv(path, source)
    else:
        values = read_avro(path, source, registry=registry, topic=topic)
    prepared = Prepared(encoding={"jsonl": "json", "csv": "json"}.get(kind) or
                        ("avro (Confluent wire format, registry)" if registry else "avro (single-object)"))
    now_ms = int(time.time() * 1000)
    for value in values:
        key, dead = key_of(source, value, now_ms=now_ms, resolver=registry, limits=limits)
        if dead is not None:
            prepared.dead_letters[f"{dead.error_class}: {dead.error_message[:160]}"] += 1
        prepared.messages.append((key, value))
    return prepared


# --- publishing ---------------------------------------------------------------------------------

def bootstrap_of(broker: str) -> list[str]:
    """host:port list of a ``kafka://host:port[,host:port]`` URL."""
    if broker == "embedded":
        raise PipelineError("no broker to publish to: give --broker kafka://host:port or set PIPELINE_BROKER "
                            "(the embedded broker lives only inside pipeline dev / replay)")
    if not broker.startswith("kafka://") or not broker[len("kafka://"):]:
        raise PipelineError(f"--broker {broker}: expected kafka://host:port[,host:port]")
    servers = broker[len("kafka://"):].split(",")
    for server in servers:
        host, _, port = server.rpartition(":")
        if not host or not port.isdigit():
            raise PipelineError(f"--broker {broker}: expected host:port, got {server!r}")
    return servers


def open_producer(broker: str, *, timeout_s: float = 10.0, options: dict[str, Any] | None = None) -> Any:
    """A kafka-python producer on ``broker`` (kafka://host:port); BrokerError when unreachable."""
    from kafka import KafkaProducer
    from kafka.errors import KafkaError

    servers = bootstrap_of(broker)
    try:
        return KafkaProducer(bootstrap_servers=servers, linger_ms=20, acks="all", **(options or {}),
                             bootstrap_timeout_ms=int(timeout_s * 1000), request_timeout_ms=int(timeout_s * 1000))
    except (KafkaError, OSError) as exc:
        raise BrokerError(f"cannot reach the broker at {','.join(servers)} within {timeout_s:.0f} s "
                          f"({type(exc).__name__}); is it running, and is the address right?") from None


def ensure_inputs(broker: str, topics: Sequence[str], partitions: int, *, timeout_s: float = 10.0,
                  options: dict[str, Any] | None = None) -> None:
    """Create the input topics that do not exist yet (as the worker would)."""
    from pipeline.broker.topics import TopicSpec, ensure_topics

    ensure_topics(bootstrap_of(broker), [TopicSpec(name) for name in topics], partitions, timeout=timeout_s,
                  options=options)


class Pacer:
    """Sleeps so that at most ``rate`` messages per second go out (0: no limit)."""

    def __init__(self, rate: float, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep) -> None:
        self.rate = rate
        self.clock = clock
        self.sleep = sleep
        self.started = clock()
        self.count = 0

    def wait(self) -> None:
        """Call before each message."""
        if self.rate > 0:
            due = self.started + self.count / self.rate
            delay = due - self.clock()
            if delay > 0:
                self.sleep(delay)
        self.count += 1


class Progress:
    """A rich progress bar on a terminal; plain lines (every 10 %, or every 5 s) otherwise."""

    def __init__(self, console: Console, total: int | None, description: str) -> None:
        self.console = console
        self.total = total
        self.description = description
        self.done = 0
        self._bar: Any = None
        self._task: Any = None
        self._last_line = time.monotonic()
        self._next_share = 0.1

    def __enter__(self) -> Progress:
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
            from rich.progress import Progress as Bar

            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TimeRemainingColumn(), console=self.console, transient=False)
            self._bar.start()
            self._task = self._bar.add_task(self.description, total=self.total)
        return self

    def advance(self, count: int = 1) -> None:
        self.done += count
        if self._bar is not None:
            self._bar.advance(self._task, count)
            return
        now = time.monotonic()
        if self.total:
            if self.done / self.total >= self._next_share - 1e-9 and self.done < self.total:
                self.console.print(f"{self.description}: {self.done}/{self.total} "
                                   f"({100 * self.done // self.total}%)", highlight=False)
                while self._next_share <= self.done / self.total:
                    self._next_share += 0.1
        elif now - self._last_line >= 5:
            self.console.print(f"{self.description}: {self.done}", highlight=False)
            self._last_line = now

    def __exit__(self, *exc: object) -> None:
        if self._bar is not None:
            self._bar.stop()


def publish(producer: Any, messages: Iterable[tuple[str, bytes | None, bytes]], *, rate: float = 0.0,
            progress: Progress | None = None, timeout_s: float = 60.0) -> Published:
    """Send (topic, key, value) messages at most ``rate`` per second, then flush; count the
    deliveries the broker acknowledged and the failures (with their reasons)."""
    result = Published()
    started = time.monotonic()
    pacer = Pacer(rate)

    def failed(exc: BaseException) -> None:
        result.failed += 1
        result.errors[f"{type(exc).__name__}: {str(exc)[:160]}"] += 1

    def delivered(_: Any) -> None:
        result.sent += 1

    for topic, key, value in messages:
        pacer.wait()
        producer.send(topic, key=key, value=value).add_callback(delivered).add_errback(failed)
        if progress is not None:
            progress.advance()
    producer.flush(timeout=timeout_s)
    result.seconds = time.monotonic() - started
    return result


def read_back_hint(prepared: Prepared) -> str:
    """One line on what the pipeline will dead-letter (empty when nothing)."""
    dead = sum(prepared.dead_letters.values())
    if not dead:
        return ""
    reason, count = prepared.dead_letters.most_common(1)[0]
    return (f"{dead} of {len(prepared.messages)} messages will be dead-lettered by the pipeline; "
            f"most often ({count}): {reason}")

