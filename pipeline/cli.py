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
def dev() -> None:
    """The embedded stack with synthetic traffic (not built yet)."""
    err.print("pipeline dev is not built yet: the embedded stack is issue 2, in progress. "
              "See README.md for what works today.")
    raise typer.Exit(2)


def main() -> None:
    app()
