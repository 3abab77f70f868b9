"""The `pipeline` command line (DESIGN §4.5). Only part of it exists yet; see README."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import typer
from rich.console import Console

from pipeline.errors import PipelineError

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
segments_app = typer.Typer(no_args_is_help=True, help="Segment definitions.")
app.add_typer(segments_app, name="segments")
err = Console(stderr=True)
out = Console()


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

    try:
        settings = load_settings()
        if settings.embedded_broker:
            raise PipelineError("pipeline segments apply needs PIPELINE_BROKER=kafka://host:port of the running "
                                "pipeline")
        segments = load_segments(path)
        ensure_topics(settings.bootstrap_servers, product_topics(settings), settings.partitions)
        added, changed, removed = publish_definitions(settings.bootstrap_servers, settings.topic(DEFINITIONS),
                                                      segments)
    except PipelineError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    out.print(f"applied {len(segments)} segments to {settings.topic(DEFINITIONS)}", highlight=False)
    for label, ids in (("added", added), ("changed", changed), ("removed", removed)):
        if ids:
            out.print(f"  {label}: {', '.join(ids)}", highlight=False)


@app.command("dev")
def dev(rate: float = typer.Option(200.0, help="synthetic events per second"),
        customers: int = typer.Option(500, help="synthetic customers"),
        seed: int = typer.Option(7, help="seed of the synthetic traffic")) -> None:
    """Embedded broker + worker + chDB + synthetic traffic, with live segment sizes until Ctrl-C.

    Example: pipeline dev --rate 500
    """
    from pipeline.dev import run_dev
    from pipeline.settings import load_settings

    try:
        run_dev(load_settings(), rate=rate, customers=customers, seed=seed)
    except PipelineError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None


@app.command("worker")
def worker() -> None:
    """Run the service: one faust worker against PIPELINE_BROKER and PIPELINE_CLICKHOUSE_URL.

    Example: PIPELINE_BROKER=kafka://127.0.0.1:9092 pipeline worker
    """
    import logging

    from faust.worker import Worker

    from pipeline.app import create_app
    from pipeline.broker.topics import ensure_topics, product_topics
    from pipeline.segments.definitions import load_segments
    from pipeline.settings import load_settings

    try:
        settings = load_settings()
        if settings.embedded_broker:
            raise PipelineError("pipeline worker needs PIPELINE_BROKER=kafka://host:port "
                                "(pipeline dev starts an embedded broker)")
        segments = load_segments(settings.segments_path)
        ensure_topics(settings.bootstrap_servers, product_topics(settings), settings.partitions)
    except PipelineError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    logging.basicConfig(level=settings.log_level.upper())
    faust_app = create_app(settings, segments)
    Worker(faust_app, loglevel=settings.log_level).execute_from_commandline()


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
    from pipeline.settings import load_settings

    if len(source) != len(files):
        err.print("give one file after each --source SOURCE, e.g. --source pos a.jsonl --source crm b.jsonl")
        raise typer.Exit(2)
    overrides: dict[str, object] = {"clock": "event"}
    if data_dir is not None:
        overrides["data_dir"] = data_dir
    if segments is not None:
        overrides["segments_path"] = segments.resolve()
    try:
        settings = load_settings(**overrides)
        load_segments(settings.segments_path)  # refuse a bad definition before starting anything
        summary = run_replay(settings, list(zip(source, files, strict=True)), console=err)
    except PipelineError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
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


def _iso(ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(ms / 1000, tz=UTC).isoformat() if ms else "-"


def _client_and_db(data_dir: Path | None) -> tuple[object, str]:
    from pipeline.settings import load_settings
    from pipeline.sinks.clickhouse import connect

    overrides = {"data_dir": data_dir} if data_dir is not None else {}
    settings = load_settings(**overrides)
    if settings.embedded_clickhouse and not (settings.data_dir / "clickhouse").exists():
        raise PipelineError(f"no embedded ClickHouse data under {settings.data_dir}: "
                            "run pipeline dev or a worker first")
    return connect(settings.clickhouse_dsn, database=settings.clickhouse_database), settings.clickhouse_database


@app.command("cohort")
def cohort_command(segment: str = typer.Argument(..., help="segment id"),
                   data_dir: Path | None = typer.Option(None, "--data-dir", help="local data (default ./var)"),
                   fmt: str = typer.Option("table", "--format", help="table, json or csv")) -> None:
    """The current members of a segment, from ClickHouse.

    Example: pipeline cohort buyers --data-dir var --format json
    """
    from rich.table import Table

    from pipeline.cohorts import cohort

    if fmt not in ("table", "json", "csv"):
        err.print("--format must be table, json or csv")
        raise typer.Exit(2)
    try:
        client, database = _client_and_db(data_dir)
        members = cohort(client, database, segment)
    except PipelineError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    if fmt == "json":
        print(json.dumps([{**m, "since": m["since"].isoformat()} for m in members]))
    elif fmt == "csv":
        out_csv = csv.writer(sys.stdout)
        out_csv.writerow(["customer_id", "since", "anonymous_ids"])
        for m in members:
            out_csv.writerow([m["customer_id"], m["since"].isoformat(), " ".join(m["anonymous_ids"])])
    else:
        table = Table(title=f"{segment}: {len(members)} members")
        for column in ("customer_id", "since", "anonymous_ids"):
            table.add_column(column)
        for m in members:
            table.add_row(m["customer_id"], m["since"].isoformat(), ", ".join(m["anonymous_ids"]))
        out.print(table)


@app.command("sql")
def sql_command(query: str = typer.Argument(..., help="one read-only statement"),
                data_dir: Path | None = typer.Option(None, "--data-dir", help="local data (default ./var)"),
                fmt: str = typer.Option("table", "--format", help="table, json or csv")) -> None:
    """A read-only query on the product's ClickHouse (SELECT, WITH, SHOW, DESCRIBE, EXPLAIN).

    Example: pipeline sql "SELECT error_class, count() FROM segments.dead_letters GROUP BY 1" --data-dir var
    """
    from rich.table import Table

    from pipeline.cohorts import run_sql

    if fmt not in ("table", "json", "csv"):
        err.print("--format must be table, json or csv")
        raise typer.Exit(2)

    try:
        client, _ = _client_and_db(data_dir)
        names, rows = run_sql(client, query)
    except PipelineError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False)
        raise typer.Exit(1) from None
    except Exception as exc:  # noqa: BLE001 - ClickHouse's own message is the useful sentence
        err.print(f"[red]ClickHouse refused the query:[/red] {str(exc).splitlines()[0][:500]}", highlight=False)
        raise typer.Exit(1) from None
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
    from datetime import datetime

    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return str(value)


def main() -> None:
    app()
