"""Print the configuration table of the README, generated from ``pipeline.settings.Settings``.

One row per field: the environment variable (``PIPELINE_<FIELD>``), its type and bounds, its
default and its description, all read from the settings object itself, so the table cannot say
something the code does not do. The README holds this output between
``<!-- settings:start -->`` and ``<!-- settings:end -->``; ``tests/unit/test_readme.py`` fails
when they differ. To refresh the README:

    .venv/bin/python scripts/settings_table.py --write
"""

from __future__ import annotations

import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from pydantic.fields import FieldInfo

from pipeline.settings import ENV_PREFIX, Settings

README = Path(__file__).resolve().parents[1] / "README.md"
START = "<!-- settings:start -->"
END = "<!-- settings:end -->"

_NAMES = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path", SecretStr: "secret string"}
_BOUNDS = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}


def _type(annotation: Any) -> str:
    """A reader's name for a field's annotation: ``integer``, ``wall | event``, ``path, optional``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return " \\| ".join(f"`{value}`" for value in typing.get_args(annotation))
    if origin in (typing.Union, types.UnionType):
        args = [arg for arg in typing.get_args(annotation) if arg is not type(None)]
        optional = len(args) < len(typing.get_args(annotation))
        text = " or ".join(_type(arg) for arg in args)
        return f"{text}, optional" if optional else text
    return _NAMES.get(annotation, getattr(annotation, "__name__", str(annotation)))


def _bounds(field: FieldInfo) -> str:
    parts = []
    for constraint in field.metadata:
        for attribute, symbol in _BOUNDS.items():
            value = getattr(constraint, attribute, None)
            if value is not None:
                parts.append(f"{symbol} {value}")
    return ", ".join(parts)


def _default(field: FieldInfo) -> str:
    value = field.default
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "":
        return '`""`'
    return f"`{value}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def settings_table() -> str:
    """The Markdown table (no trailing newline)."""
    rows = ["| variable | type | default | description |", "|---|---|---|---|"]
    for name, field in Settings.model_fields.items():
        kind = _type(field.annotation)
        bounds = _bounds(field)
        if bounds:
            kind = f"{kind} ({bounds})"
        rows.append(f"| `{ENV_PREFIX}{name.upper()}` | {kind} | {_default(field)} | "
                    f"{_cell(field.description or '')} |")
    return "\n".join(rows)


def readme_table(text: str) -> str:
    """The table between the markers of a README's text (ValueError if the markers are missing)."""
    start, end = text.find(START), text.find(END)
    if start < 0 or end < start:
        raise ValueError(f"the README has no {START} ... {END} section")
    return text[start + len(START):end].strip("\n")


def write_readme(path: Path = README) -> bool:
    """Replace the README's table with the generated one; True if it changed."""
    text = path.read_text()
    current = readme_table(text)
    fresh = settings_table()
    if current == fresh:
        return False
    start, end = text.find(START) + len(START), text.find(END)
    path.write_text(f"{text[:start]}\n{fresh}\n{text[end:]}")
    return True


def main(argv: list[str]) -> int:
    if argv == ["--write"]:
        print("README.md updated" if write_readme() else "README.md already up to date")
        return 0
    if argv:
        print("usage: scripts/settings_table.py [--write]", file=sys.stderr)
        return 2
    print(settings_table())
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
