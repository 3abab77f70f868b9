"""The `pipeline` command line (DESIGN §4.5). Only part of it exists yet; see README."""

from __future__ import annotations

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


def main() -> None:
    app()
