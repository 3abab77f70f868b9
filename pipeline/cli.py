"""The `pipeline` command line (DESIGN §4.5); docs/cli.md has one example per command."""

from __future__ import annotations

import csv
import json
import sys
import time
import traceback
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import typer
from rich.console import Console

from pipeline.errors import PipelineError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
segments_app = typer.Typer(no_args_is_help=True, help="Segment definitions.")
app.add_typer(segments_app, name="segments")
clickhouse_app = typer.Typer(no_args_is_help=True, help="The product's ClickHouse tables.")
app.add_typer(clickhouse_app, name="clickhouse")
err = Console(stderr=True, soft_wrap=True)
out = Console(soft_wrap=True)
_options = {"debug": False}

DATA_DIR_HELP = "local data (default ./var, or PIPELINE_DATA_DIR)"
BROKER_HELP = "kafka://host:port[,host:port] (default PIPELINE_BROKER)"


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="show the stack trace of an error")) -> None:
    _options["debug"] = debug


@contextmanager
def _guard() -> Iterator[None]:
    """Errors as one sentence and exit code 1; the stack trace only with --debug."""
    try:
        yield
    except (typer.Exit, typer.Abort, SystemExit):
        raise
    except PipelineError as exc:
        if _options["debug"]:
            err.print(traceback.format_exc(), highlight=False, markup=False)
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        err.print("interrupted")
        raise typer.Exit(130) from None
    except Exception as exc:  # noqa: BLE001 - a sentence for the user, the trace with --debug
        if _options["debug"]:
            err.print(traceback.format_exc(), highlight=False, markup=False)
        first = (str(exc).strip().splitlines() or [""])[0][:500]
        err.print(f"[red]error:[/red] {type(exc).__name__}: {first}"
                  + ("" if _options["debug"] else "  (run with --debug for the stack trace)"), highlight=False)
        raise typer.Exit(1) from None


def _usage(message: str) -> typer.Exit:
    err.print(message, highlight=False)
    return typer.Exit(2)


def _check_format(fmt: str, allowed: tuple[str, ...]) -> None:
    if fmt not in allowed:
        raise _usage(f"--format must be {', '.join(allowed[:-1])} or {allowed[-1]}")


def parse_time(text: str, option: str) -> datetime:
    """An instant from ISO-8601 (a time without an offset is UTC) or epoch milliseconds."""
    value = text.strip()
    try:
        if value.lstrip("-").isdigit():
            return datetime.fromtimestamp(int(value) / 1000, tz=UTC)
        moment = datetime.fromisoformat(value)
    except (ValueError, OverflowError, OSError):
        raise _usage(f"{option} {text!r}: expected an ISO-8601 time such as 2026-03-01T12:00:00Z "
                     "(or epoch milliseconds)") from None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


def _iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat() if ms else "-"


def _settings(**overrides: Any) -> Any:
    from pipeline.settings import load_settings

    return load_settings(**{k: v for k, v in overrides.items() if v is not None})


# --- segments -----------------------------------------------------------------------------------

@segments_app.command("validate")
def segments_validate(path: Path = typer.Argument(..., help="YAML file or directory of segments")) -> None:
    """Check definitions: unknown columns or functions, type and syntax errors, with line and column.

    Example: pipeline segments validate segments/
    """
    from pipeline.segments.definitions import load_segments

    try:
        segments = load_segments(path)
    except PipelineError as exc:
        err.print(f"[red]invalid:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    for segment in segments:
        out.print(f"ok  {segment.id}: {segment.predicate.sql}", highlight=False)


@segments_app.command("apply")
def segments_apply(path: Path = typer.Argument(..., help="YAML file or directory: the complete new set")) -> None:
    """Validate, then publish the definitions to the running pipeline (topic segment-definitions):
    workers re-evaluate every profile without a restart; segments missing from the set are removed.

    Example: PIPELINE_BROKER=kafka://127.0.0.1:9092 pipeline segments apply segments/
    """
    from pipeline.broker.topics import DEFINITIONS, ensure_topics, product_topics
    from pipeline.segments.definitions import load_segments
    from pipeline.segments.live import publish_definitions
    from pipeline.settings import load_settings

    with _guard():
        settings = load_settings()
        if settings.embedded_broker:
            raise PipelineError("pipeline segments apply needs PIPELINE_BROKER=kafka://host:port of the running "
                                "pipeline")
        segments = load_segments(path)
        ensure_topics(settings.bootstrap_servers, product_topics(settings), settings.partitions,
                      options=settings.kafka_python_options())
        added, changed, removed = publish_definitions(settings.bootstrap_servers, settings.topic(DEFINITIONS),
                                                      segments, options=settings.kafka_python_options())
        out.print(f"applied {len(segments)} segments to {settings.topic(DEFINITIONS)}", highlight=False)
        for label, ids in (("added", added), ("changed", changed), ("removed", removed)):
            if ids:
                out.print(f"  {label}: {', '.join(ids)}", highlight=False)


@segments_app.command("list")
def segments_list(data_dir: Path | None = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
                  segments: Path | None = typer.Option(None, "--segments", help="YAML file or directory "
                                                       "(default PIPELINE_SEGMENTS_PATH, else the built-in set)"),
                  fmt: str = typer.Option("table", "--format", help="table or json")) -> None:
    """The segments: id, description, where, requires_consent, and current size from ClickHouse
    when there is data (else '-').

    Example: pipeline segments list --data-dir var/replay
    """
    from rich.table import Table

    from pipeline.cohorts import segment_sizes
    from pipeline.segments.definitions import load_segments

    _check_format(fmt, ("table", "json"))
    note = ""
    with _guard():
        settings = _settings(data_dir=data_dir)
        definitions = load_segments(segments if segments is not None else settings.segments_path)
        sizes: dict[str, int] | None = None
        if settings.embedded_clickhouse and not (settings.data_dir / "clickhouse").exists():
            note = f"no ClickHouse data under {settings.data_dir}: sizes unknown"
        else:
            try:
                client, database = _client_and_db(data_dir)
                sizes = segment_sizes(client, database)
            except Exception as exc:  # noqa: BLE001 - definitions are still worth listing
                note = f"sizes unknown: {(str(exc).splitlines() or [''])[0][:300]}"
    rows: list[dict[str, Any]] = [
        {"id": s.id, "description": s.description, "where": " ".join(s.where.split()),
         "requires_consent": s.requires_consent, "size": (sizes.get(s.id, 0) if sizes is not None else None)}
        for s in definitions]
    defined = {s.id for s in definitions}
    for orphan in sorted(set(sizes or ()) - defined):
        rows.append({"id": orphan, "description": "(in ClickHouse, no longer defined)", "where": None,
                     "requires_consent": None, "size": (sizes or {})[orphan]})
    if fmt == "json":
        print(json.dumps(rows))
        return
    table = Table(title=f"{len(definitions)} segments")
    for column in ("id", "description", "where", "requires_consent", "size"):
        table.add_column(column, justify="right" if column == "size" else "left",
                         no_wrap=column in ("id", "size"))
    for row in rows:
        table.add_row(row["id"], row["description"] or "", row["where"] or "", row["requires_consent"] or "",
                      "-" if row["size"] is None else str(row["size"]))
    out.print(table)
    if note:
        err.print(note, highlight=False)


# --- the stack ----------------------------------------------------------------------------------

@app.command("dev")
def dev(rate: float = typer.Option(200.0, help="synthetic events per second"),
        customers: int = typer.Option(500, help="synthetic customers"),
        seed: int = typer.Option(7, help="seed of the synthetic traffic")) -> None:
    """Embedded broker + worker + chDB + synthetic traffic, with live segment sizes until Ctrl-C.

    Example: pipeline dev --rate 500
    """
    from pipeline.dev import run_dev

    with _guard():
        run_dev(_settings(), rate=rate, customers=customers, seed=seed)


@app.command("worker")
def worker() -> None:
    """Run the service: one faust worker against PIPELINE_BROKER and PIPELINE_CLICKHOUSE_URL.

    Example: PIPELINE_BROKER=kafka://127.0.0.1:9092 pipeline worker
    """
    import logging

    from pipeline.processes import limit_malloc_arenas

    limit_malloc_arenas()  # before any thread: glibc's thread arenas 13.2 vs 6.9 MiB at 8 min (processes.py)
    from faust.worker import Worker

    from pipeline.app import create_app
    from pipeline.broker.topics import ensure_topics, product_topics
    from pipeline.segments.definitions import load_segments

    with _guard():
        settings = _settings()
        if settings.embedded_broker:
            raise PipelineError("pipeline worker needs PIPELINE_BROKER=kafka://host:port "
                                "(pipeline dev starts an embedded broker)")
        segments = load_segments(settings.segments_path)
        ensure_topics(settings.bootstrap_servers, product_topics(settings), settings.partitions,
                      options=settings.kafka_python_options())
    from pipeline.logs import logging_config

    config = logging_config(settings.log_format, settings.log_level)
    if config is None:
        logging.basicConfig(level=settings.log_level.upper())
    if settings.event_loop == "uvloop":
        # Before faust creates its loop (and the consumer thread its own): every loop is uvloop's.
        import mode.loop

        mode.loop.use("uvloop")
    faust_app = create_app(settings, segments)
    runner = Worker(faust_app, loglevel=settings.log_level, logging_config=config)
    # faust's terminal spinner sets the root logger to DEBUG (to spin on every record) when the
    # level is WARNING or above: every debug call in faust and aiokafka would build a record.
    runner.spinner = None
    runner.execute_from_commandline()


@app.command("replay")
def replay_command(
    source: list[str] = typer.Option(..., "--source", help="--source SOURCE FILE.jsonl, repeatable; "
                                     "SOURCE is clickstream, pos, crm or surveys"),
    files: list[Path] = typer.Argument(..., metavar="FILE…", help="the file after each --source SOURCE"),
    segments: Path | None = typer.Option(None, "--segments", help="YAML file or directory of segments "
                                         "(default: the built-in examples)"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help="local data, reset first (default ./var)"),
    as_json: bool = typer.Option(False, "--json", help="print the summary as one JSON object"),
) -> None:
    """Push files through the real pipeline on the event-time clock, wait until every event is
    processed and every sink flushed, print a summary, and exit.

    Example: pipeline replay --source pos purchases.jsonl --segments segments.yaml --data-dir var
    """
    from rich.table import Table

    from pipeline.replay import run_replay, summary_json
    from pipeline.segments.definitions import load_segments

    if len(source) != len(files):
        raise _usage("give one file after each --source SOURCE, e.g. --source pos a.jsonl --source crm b.jsonl")
    overrides: dict[str, object] = {"clock": "event"}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if segments is not None:
        overrides["segments_path"] = segments.resolve()
    with _guard():
        settings = _settings(**overrides)
        load_segments(settings.segments_path)  # refuse a bad definition before starting anything
        summary = run_replay(settings, list(zip(source, files, strict=True)), console=err)
    if as_json:
        print(summary_json(summary))
        return
    out.print(f"replayed {sum(summary.produced.values())} events in {summary.seconds:.1f} s "
              f"({', '.join(f'{k} {v}' for k, v in sorted(summary.produced.items()))}); "
              f"now() = {_iso(summary.watermark)}", highlight=False)
    out.print(f"segment changes: {summary.changes.get('entered', 0)} entered, "
              f"{summary.changes.get('exited', 0)} exited", highlight=False)
    dead = sum(summary.dead_letters.values())
    out.print(f"dead letters: {dead}", highlight=False)
    for reason, count in summary.dead_letters.most_common():
        out.print(f"  {count:>6}  {reason}", highlight=False)
    table = Table(title="segment sizes")
    table.add_column("segment")
    table.add_column("members", justify="right")
    for name, size in sorted(summary.sizes.items()):
        table.add_row(name, str(size))
    out.print(table)


# --- input: generate and produce ----------------------------------------------------------------

@app.command("generate")
def generate_command(
    customers: int = typer.Option(500, min=1, help="synthetic customers"),
    rate: float = typer.Option(100.0, min=0, help="events per second sent to a broker (0: as fast as possible); "
                               "files are written at once"),
    duration: float | None = typer.Option(None, min=0, help="stop after this many seconds"),
    count: int | None = typer.Option(None, min=1, help="stop after this many events"),
    seed: int = typer.Option(7, help="the same seed gives the same events"),
    start: str | None = typer.Option(None, help="occurred_at of the first event, ISO-8601 (default: with "
                                     "--count, so that the last event is now; else now)"),
    step_ms: int | None = typer.Option(None, "--step-ms", min=1, help="event time between two events "
                                       "(default 1000/rate ms, or 1000 ms with --rate 0)"),
    broker: str | None = typer.Option(None, "--broker", help=BROKER_HELP),
    out_dir: Path | None = typer.Option(None, "--out", help="write DIR/<source>.jsonl instead of publishing"),
    basic: bool = typer.Option(False, "--basic", help="the basic stream of pipeline dev: customer ids only, no "
                               "anonymous browsing, e-mails, refunds, tickets"),
    timeout: float = typer.Option(10.0, help="seconds to wait for the broker"),
) -> None:
    """Synthetic traffic with correlated browsing, purchases, survey answers and NPS (pipeline/generate.py),
    to a broker's input topics or to JSON Lines files that pipeline replay reads.

    Example: pipeline generate --customers 200 --count 5000 --seed 1 --start 2026-03-01T00:00:00Z --out data/
    Example: pipeline generate --broker kafka://127.0.0.1:9092 --rate 200 --duration 60
    """
    from itertools import islice

    from pipeline import produce
    from pipeline.generate import SOURCES, Message, traffic, write_jsonl

    if out_dir is not None and broker is not None:
        raise _usage("give --out DIR or --broker URL, not both")
    if out_dir is not None and count is None and duration is None:
        raise _usage("with --out, give --count N (or --duration SECONDS)")
    step = step_ms or (max(1, int(1000 / rate)) if rate > 0 else 1000)
    start_at = parse_time(start, "--start") if start is not None else None
    now_ms = int(time.time() * 1000)
    first_ms = int(start_at.timestamp() * 1000) if start_at else now_ms - ((count - 1) * step if count else 0)
    stream = traffic(customers=customers, seed=seed, start_ms=first_ms - step, step_ms=step, extended=not basic)
    counts: Counter[str] = Counter()

    def limited() -> Iterator[Message]:
        deadline = time.monotonic() + duration if duration is not None else None
        for message in islice(stream, count) if count is not None else stream:
            if deadline is not None and time.monotonic() >= deadline:
                return
            counts[message.topic] += 1
            yield message

    with _guard():
        if out_dir is not None:
            if out_dir.exists() and not out_dir.is_dir():
                raise PipelineError(f"--out {out_dir}: not a directory")
            try:
                written = write_jsonl(limited(), out_dir)
            except OSError as exc:
                raise PipelineError(f"cannot write to {out_dir}: {exc.strerror or exc}") from None
            out.print(f"wrote {sum(counts.values())} events: "
                      + ", ".join(f"{path} ({counts[source]})" for source, path in written.items()), highlight=False)
            out.print("replay them with: pipeline replay "
                      + " ".join(f"--source {source} {path}" for source, path in written.items()), highlight=False)
            return
        settings = _settings(broker=broker)
        producer = produce.open_producer(settings.broker, timeout_s=timeout, options=settings.kafka_python_options())
        try:
            produce.ensure_inputs(settings.broker, [settings.topic(s) for s in SOURCES], settings.partitions,
                                  options=settings.kafka_python_options(),
                                  timeout_s=timeout)
            with produce.Progress(err, count, "generate") as progress:
                try:
                    published = produce.publish(producer, ((settings.topic(m.topic), m.key or None, m.value)
                                                           for m in limited()), rate=rate, progress=progress)
                except KeyboardInterrupt:
                    producer.flush(timeout=10)
                    published = produce.Published(sent=sum(counts.values()))
        finally:
            producer.close(timeout=10)
        if published.failed:
            raise PipelineError(f"{published.failed} events were not accepted by the broker: "
                                + "; ".join(f"{n}× {r}" for r, n in published.errors.most_common(3)))
        out.print(f"published {published.sent} events in {published.seconds:.1f} s: "
                  + ", ".join(f"{settings.topic(s)} {counts[s]}" for s in SOURCES if counts[s]), highlight=False)


@app.command("produce")
def produce_command(
    file: Path = typer.Argument(..., help="JSON Lines, CSV or Avro container file"),
    source: str = typer.Option(..., "--source", help="clickstream, pos, crm or surveys"),
    broker: str | None = typer.Option(None, "--broker", help=BROKER_HELP),
    rate: float = typer.Option(0.0, min=0, help="messages per second (0: as fast as possible)"),
    fmt: str | None = typer.Option(None, "--format", help="jsonl, csv or avro (default: from the extension)"),
    strict: bool = typer.Option(False, "--strict", help="send nothing if any message would be dead-lettered"),
    timeout: float = typer.Option(10.0, help="seconds to wait for the broker"),
) -> None:
    """Publish a file's events to an input topic, each keyed by its customer (docs/cli.md: CSV
    columns; Avro through the Schema Registry when PIPELINE_SCHEMA_REGISTRY_URL is set).

    Example: pipeline produce --source pos purchases.csv --broker kafka://127.0.0.1:9092 --rate 500
    """
    from pipeline import produce
    from pipeline.decode import Limits

    with _guard():
        settings = _settings(broker=broker)
        topic = settings.topic(source)
        limits = Limits(max_message_bytes=settings.max_message_bytes,
                        max_future_skew_ms=int(settings.max_future_skew_seconds * 1000))
        prepared = produce.prepare(source, file, fmt=fmt, registry_url=settings.schema_registry_url, topic=topic,
                                   limits=limits)
        hint = produce.read_back_hint(prepared)
        if hint:
            err.print(f"[yellow]warning:[/yellow] {hint}", highlight=False)
            if strict:
                raise PipelineError("--strict: nothing was sent")
        if not prepared.messages:
            out.print(f"{file}: no events; nothing to publish", highlight=False)
            return
        producer = produce.open_producer(settings.broker, timeout_s=timeout, options=settings.kafka_python_options())
        try:
            produce.ensure_inputs(settings.broker, [topic], settings.partitions, timeout_s=timeout,
                                  options=settings.kafka_python_options())
            with produce.Progress(err, len(prepared.messages), f"{file.name} → {topic}") as progress:
                published = produce.publish(producer, ((topic, k, v) for k, v in prepared.messages), rate=rate,
                                            progress=progress)
        finally:
            producer.close(timeout=10)
        if published.failed:
            raise PipelineError(f"{published.failed} of {len(prepared.messages)} messages were not accepted by the "
                                "broker: " + "; ".join(f"{n}× {r}" for r, n in published.errors.most_common(3)))
    out.print(f"published {published.sent} messages ({prepared.encoding}) to {topic} in {published.seconds:.1f} s",
              highlight=False)


# --- read side ----------------------------------------------------------------------------------

def _client_and_db(data_dir: Path | None) -> tuple[Any, str]:
    from pipeline.sinks.clickhouse import connect

    settings = _settings(data_dir=data_dir)
    if settings.embedded_clickhouse and not (settings.data_dir / "clickhouse").is_dir():
        raise PipelineError(f"no embedded ClickHouse data under {settings.data_dir}: "
                            "run pipeline dev, replay or a worker first")
    return connect(settings.clickhouse_dsn, database=settings.clickhouse_database), settings.clickhouse_database


def _print_members(segment: str, members: list[dict[str, Any]], fmt: str, title: str) -> None:
    from rich.table import Table

    if fmt == "json":
        print(json.dumps([{**m, "since": m["since"].isoformat()} for m in members]))
    elif fmt == "csv":
        out_csv = csv.writer(sys.stdout)
        out_csv.writerow(["customer_id", "since", "anonymous_ids"])
        for m in members:
            out_csv.writerow([m["customer_id"], m["since"].isoformat(), " ".join(m["anonymous_ids"])])
    else:
        table = Table(title=title)
        for column in ("customer_id", "since", "anonymous_ids"):
            table.add_column(column)
        for m in members:
            table.add_row(m["customer_id"], m["since"].isoformat(), ", ".join(m["anonymous_ids"]))
        out.print(table)


@app.command("cohort")
def cohort_command(segment: str = typer.Argument(..., help="segment id"),
                   data_dir: Path | None = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
                   fmt: str = typer.Option("table", "--format", help="table, json or csv"),
                   at: str | None = typer.Option(None, "--at", help="the members as of this past instant "
                                                 "(ISO-8601), rebuilt from segment_changes")) -> None:
    """The members of a segment, from ClickHouse: now, or as of --at TIME (the last change of
    each customer at or before TIME is 'entered'; see pipeline/insights.py).

    Example: pipeline cohort buyers --data-dir var --format json
    Example: pipeline cohort recent_buyers --at 2026-03-15T00:00:00Z --data-dir var
    """
    from pipeline.cohorts import cohort
    from pipeline.insights import cohort_at

    _check_format(fmt, ("table", "json", "csv"))
    moment = parse_time(at, "--at") if at is not None else None
    with _guard():
        client, database = _client_and_db(data_dir)
        members = cohort_at(client, database, segment, moment) if moment else cohort(client, database, segment)
    title = f"{segment}: {len(members)} members" + (f" as of {moment.isoformat()}" if moment else "")
    _print_members(segment, members, fmt, title)


@app.command("sql")
def sql_command(query: str = typer.Argument(..., help="one read-only statement"),
                data_dir: Path | None = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
                fmt: str = typer.Option("table", "--format", help="table, json or csv")) -> None:
    """A read-only query on the product's ClickHouse (SELECT, WITH, SHOW, DESCRIBE, EXPLAIN).

    Example: pipeline sql "SELECT error_class, count() FROM segments.dead_letters GROUP BY 1" --data-dir var
    """
    from rich.table import Table

    from pipeline.cohorts import run_sql

    _check_format(fmt, ("table", "json", "csv"))
    with _guard():
        client, _ = _client_and_db(data_dir)
        try:
            names, rows = run_sql(client, query)
        except PipelineError:
            raise
        except Exception as exc:  # noqa: BLE001 - ClickHouse's own message is the useful sentence
            raise PipelineError(f"ClickHouse refused the query: {str(exc).splitlines()[0][:500]}") from None
    if fmt == "json":
        print(json.dumps([dict(zip(names, row, strict=True)) for row in rows], default=_jsonable))
        return
    if fmt == "csv":
        writer = csv.writer(sys.stdout)
        writer.writerow(names)
        writer.writerows([[_jsonable(v) for v in row] for row in rows])
        return
    table = Table()
    for name in names:
        table.add_column(name)
    for row in rows:
        table.add_row(*(str(v) for v in row))
    out.print(table)


def _jsonable(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def _api_get(base: str, path: str, token: str | None, timeout: float = 10.0) -> Any:
    """GET a worker API route; a PipelineError with the API's sentence on failure."""
    import urllib.error
    import urllib.request

    if not base.startswith(("http://", "https://")):
        raise PipelineError(f"--api {base}: expected http://host:port")
    request = urllib.request.Request(base.rstrip("/") + path, headers={"Accept": "application/json"})
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error") or exc.reason
        except (ValueError, AttributeError, OSError):
            message = exc.reason
        hint = " (set PIPELINE_API_TOKEN to the worker's token)" if exc.code == 401 else ""
        raise PipelineError(f"the API at {base} answered {exc.code}: {message}{hint}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise PipelineError(f"cannot reach the worker's API at {base}: {reason}") from None
    except ValueError:
        raise PipelineError(f"the API at {base} answered something that is not JSON") from None


def _show_profile(row: dict[str, Any], since: dict[str, datetime] | None) -> None:
    from rich.table import Table

    from pipeline.segments.explain import jsonable

    table = Table(title=f"profile {row.get('customer_id')}")
    table.add_column("column")
    table.add_column("value")
    for name, value in row.items():
        shown = jsonable(value)
        table.add_row(name, json.dumps(shown) if isinstance(shown, (dict, list)) else str(shown))
    out.print(table)
    if since:
        out.print("member of: " + ", ".join(f"{s} (since {t.isoformat()})" for s, t in since.items()),
                  highlight=False)


def _show_explanation(explained: dict[str, Any]) -> None:
    from rich.table import Table

    table = Table(title=f"{explained.get('customer_id')} in {explained.get('segment_id')} "
                        f"as of {explained.get('now')}")
    table.add_column("term")
    table.add_column("value")
    table.add_column("holds")
    for term in explained.get("terms", []):
        table.add_row(term["sql"], json.dumps(term.get("value")), "yes" if term["holds"] else "no"
                      + (f" ({term['error']})" if term.get("error") else ""))
    consent = explained.get("consent") or {}
    if consent.get("required"):
        table.add_row(f"consent_{consent['required']}", json.dumps(consent.get("given")),
                      "yes" if consent.get("holds") else "no")
    out.print(table)
    out.print(f"result: {'member' if explained.get('result') else 'not a member'}; stored membership: "
              f"{'member since ' + str(explained.get('member_since')) if explained.get('member') else 'not a member'}",
              highlight=False)


@app.command("profile")
def profile_command(
    customer_id: str = typer.Argument(..., help="customer id; one of its anonymous ids also finds it, and an e-mail "
                                      "address the profile of a customer known only by that address"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    fmt: str = typer.Option("table", "--format", help="table or json"),
    explain: str | None = typer.Option(None, "--explain", help="why the customer is or is not in this segment"),
    segments: Path | None = typer.Option(None, "--segments", help="segment definitions for --explain "
                                         "(default PIPELINE_SEGMENTS_PATH, else the built-in set)"),
    api: str | None = typer.Option(None, "--api", help="ask a running worker's HTTP API (http://host:port, token "
                                   "from PIPELINE_API_TOKEN) instead of the local ClickHouse"),
    now: str | None = typer.Option(None, "--now", help="evaluate --explain at this instant (default: the stored "
                                   "profile's updated_at, the instant its windowed columns are as of)"),
) -> None:
    """A customer's profile (DESIGN §4.2 columns) and, with --explain, each term of a segment's
    where with its value. Embedded: the stored profile in ClickHouse (customer_profiles FINAL);
    with --api: the live profile from a worker.

    Example: pipeline profile cust-00042 --data-dir var --explain cooking_class_prospects
    Example: pipeline profile cust-00042 --api http://127.0.0.1:6066 --format json
    """
    from urllib.parse import quote

    from pipeline.insights import find_profile, memberships
    from pipeline.segments.definitions import load_segments
    from pipeline.segments.explain import explain_terms, jsonable

    _check_format(fmt, ("table", "json"))
    moment = parse_time(now, "--now") if now is not None else None
    with _guard():
        settings = _settings(data_dir=data_dir)
        if api is not None:
            if moment is not None:
                raise PipelineError("--now applies to the stored profile only; the API explains as of the "
                                    "worker's clock")
            token = settings.api_token.get_secret_value() if settings.api_token else None
            path = f"/profiles/{quote(customer_id, safe='')}"
            if explain is not None:
                path += f"/explain/{quote(explain, safe='')}"
            answer = _api_get(api, path, token)
            if fmt == "json":
                print(json.dumps(answer))
            elif explain is not None:
                _show_explanation(answer)
            else:
                _show_profile(answer, None)
            return
        definitions = load_segments(segments if segments is not None else settings.segments_path) \
            if explain is not None else []
        client, database = _client_and_db(data_dir)
        row = find_profile(client, database, customer_id)
        if row is None:
            raise PipelineError(f"no profile for {customer_id!r} in {settings.clickhouse_database}.customer_profiles")
        since = memberships(client, database, row["customer_id"])
        if explain is None:
            if fmt == "json":
                print(json.dumps(jsonable(row)))
            else:
                _show_profile(row, since)
            return
        segment = next((s for s in definitions if s.id == explain), None)
        if segment is None:
            raise PipelineError(f"--explain {explain}: no such segment; known: {', '.join(s.id for s in definitions)}")
        at = moment or row["updated_at"]
        explained = explain_terms(segment, row, at)
        explained["customer_id"] = row["customer_id"]
        explained["member"] = explain in since
        explained["member_since"] = since[explain].isoformat() if explain in since else None
    if fmt == "json":
        print(json.dumps(jsonable(explained)))
    else:
        _show_explanation(explained)


@app.command("insights")
def insights_command(
    segment: str = typer.Argument(..., help="segment id"),
    data_dir: Path | None = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    fmt: str = typer.Option("table", "--format", help="table or json"),
    plot_path: Path | None = typer.Option(None, "--plot", help="also write a PNG chart (needs matplotlib)"),
) -> None:
    """The why behind a behavioural cohort: its members' NPS (detractors 0-6, passives 7-8,
    promoters 9-10, mean) and stated survey interests and motivations against everyone's, with
    the lift (share in cohort / share overall; shares of survey respondents).

    Example: pipeline insights high_value --data-dir var --plot high_value.png
    """
    from rich.table import Table

    from pipeline.cohorts import segment_sizes
    from pipeline.insights import insights, insights_json, plot

    _check_format(fmt, ("table", "json"))
    with _guard():
        client, database = _client_and_db(data_dir)
        result = insights(client, database, segment)
        if result.members == 0 and segment not in segment_sizes(client, database):
            from pipeline.segments.definitions import load_segments

            defined = {s.id for s in load_segments(_settings(data_dir=data_dir).segments_path)}
            if segment not in defined:
                raise PipelineError(f"no segment {segment!r} in ClickHouse or in the definitions; "
                                    f"known: {', '.join(sorted(defined | set(segment_sizes(client, database))))}")
        if plot_path is not None:
            plot(result, plot_path)
    if fmt == "json":
        print(json.dumps(insights_json(result)))
    else:
        out.print(f"[bold]{segment}[/bold]: {result.members} members ({result.cohort_respondents} answered a "
                  f"survey) of {result.population} profiles ({result.respondents} answered a survey)",
                  highlight=False)
        nps = Table(title="NPS, latest score per customer (detractors 0-6, passives 7-8, promoters 9-10)")
        for column in ("", "answers", "detractors", "passives", "promoters", "mean", "NPS"):
            nps.add_column(column, justify="left" if not column else "right", no_wrap=True)
        for who, summary in (("cohort", result.nps_cohort), ("everyone", result.nps_overall)):
            n = summary.responses or 1
            nps.add_row(who, str(summary.responses),
                        *(f"{count} ({100 * count / n:.0f}%)" for count in
                          (summary.detractors, summary.passives, summary.promoters)),
                        "-" if summary.mean is None else f"{summary.mean:.2f}",
                        "-" if summary.score is None else f"{summary.score:+.0f}")
        out.print(nps)
        lifts = Table(title="stated interests and motivations: respondents who stated it, share of respondents, "
                            "lift = cohort % / all %")
        for column in ("kind", "value", "cohort", "cohort %", "all", "all %", "lift"):
            lifts.add_column(column, justify="left" if column in ("kind", "value") else "right", no_wrap=True)
        for row in (*result.interests, *result.motivations):
            lifts.add_row(row.kind, row.value, str(row.cohort_count), f"{100 * row.cohort_share:.1f}%",
                          str(row.overall_count), f"{100 * row.overall_share:.1f}%",
                          "-" if row.lift is None else f"{row.lift:.2f}")
        out.print(lifts)
    if plot_path is not None:
        err.print(f"wrote {plot_path}", highlight=False)


@clickhouse_app.command("migrate")
def clickhouse_migrate(
    data_dir: Path | None = typer.Option(None, "--data-dir", help=DATA_DIR_HELP),
    print_ddl: bool = typer.Option(False, "--print", help="Print every statement for the current settings "
                                   "(PIPELINE_CLICKHOUSE_CLUSTER: the cluster DDL) as one script, and "
                                   "connect to nothing."),
) -> None:
    """Create or upgrade the product's tables (versioned; running it again applies nothing).

    Example: pipeline clickhouse migrate --data-dir var
    Review a cluster's DDL: PIPELINE_CLICKHOUSE_URL=http://ch:8123 PIPELINE_CLICKHOUSE_CLUSTER=prod
    pipeline clickhouse migrate --print
    """
    from pipeline.sinks.clickhouse import connect, migrate, migration_script
    from pipeline.sinks.cluster import cluster_from_settings

    with _guard():
        settings = _settings(data_dir=data_dir)
        cluster = cluster_from_settings(settings)
        if print_ddl:
            # plain stdout: rich would wrap long lines and read [..] as markup
            sys.stdout.write(migration_script(settings.clickhouse_database, events_ttl_days=settings.events_ttl_days,
                                              cluster=cluster))
            return
        if settings.embedded_clickhouse:
            directory = settings.data_dir / "clickhouse"
            if settings.data_dir.exists() and not settings.data_dir.is_dir():
                raise PipelineError(f"--data-dir {settings.data_dir}: not a directory")
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise PipelineError(f"cannot create {directory}: {exc.strerror or exc}") from None
        database = settings.clickhouse_database
        client = connect(settings.clickhouse_dsn, database=database)
        applied = migrate(client, database, events_ttl_days=settings.events_ttl_days, cluster=cluster)
        versions = sorted(int(r[0]) for r in client.query(
            f"SELECT version FROM {database}.schema_migrations FINAL").result_rows)
    if applied:
        out.print(f"applied migrations: {', '.join(map(str, applied))}; schema version {max(versions)}",
                  highlight=False)
    else:
        out.print(f"nothing to apply: schema version {max(versions) if versions else 0}", highlight=False)


def main() -> None:
    app()
