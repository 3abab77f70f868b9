"""Segment definitions in YAML (DESIGN §4.3): loading, validation with file positions."""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import DefinitionError
from pipeline.segments.compiler import Compiled, compile_where

SEGMENT_ID = re.compile(r"^[a-z0-9_]+$")
CONSENTS = ("marketing",)
KEYS = {"id", "description", "where", "requires_consent"}


@dataclass(frozen=True)
class Segment:
    id: str
    where: str
    description: str = ""
    requires_consent: str | None = None
    compiled: Compiled | None = None

    @property
    def predicate(self) -> Compiled:
        assert self.compiled is not None
        return self.compiled


def _scalar_locator(source_text: str, node: yaml.Node) -> Any:
    """Map an offset in a YAML scalar's value back to (line, column) in the file."""
    lines = source_text.split("\n")
    start_line, start_col = node.start_mark.line, node.start_mark.column
    style = getattr(node, "style", None)
    if style in ("|", ">"):
        # Block scalar: its content lines follow the indicator line, folded or kept.
        raw = []
        for index in range(start_line + 1, node.end_mark.line + 1):
            if index < len(lines):
                raw.append((index, lines[index]))
        content = [(i, text) for i, text in raw if text.strip()]
        indent = min((len(t) - len(t.lstrip()) for _, t in content), default=0)

        def locate(offset: int) -> tuple[int, int]:
            position = 0
            for index, text in content:
                piece = text[indent:]
                if offset <= position + len(piece):
                    return index + 1, indent + (offset - position) + 1
                position += len(piece) + 1
            return (content[-1][0] + 1, 1) if content else (start_line + 1, start_col + 1)
        return locate
    quote = 1 if style in ("'", '"') else 0

    def locate_flow(offset: int) -> tuple[int, int]:
        return start_line + 1, start_col + quote + offset + 1
    return locate_flow


def parse_segments(text: str, *, source: str = "<segments>") -> list[Segment]:
    """Parse and validate a YAML document of segments; raise DefinitionError on the first problem."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise DefinitionError(f"invalid YAML: {getattr(exc, 'problem', exc)}", source=source,
                              line=mark.line + 1 if mark else None,
                              column=mark.column + 1 if mark else None) from None
    if root is None:
        return []
    if not isinstance(root, yaml.MappingNode):
        raise DefinitionError("expected a mapping with a 'segments' list", source=source, line=1, column=1)
    items = None
    for key, value in root.value:
        if key.value == "segments":
            items = value
        else:
            raise DefinitionError(f"unknown top-level key {key.value!r} (expected 'segments')", source=source,
                                  line=key.start_mark.line + 1, column=key.start_mark.column + 1)
    if items is None:
        raise DefinitionError("missing the 'segments' list", source=source, line=1, column=1)
    if not isinstance(items, yaml.SequenceNode):
        raise DefinitionError("'segments' must be a list", source=source,
                              line=items.start_mark.line + 1, column=items.start_mark.column + 1)
    segments: list[Segment] = []
    seen: set[str] = set()
    for item in items.value:
        segments.append(_parse_one(text, item, source, seen))
    return segments


def _parse_one(text: str, item: yaml.Node, source: str, seen: set[str]) -> Segment:
    line, column = item.start_mark.line + 1, item.start_mark.column + 1
    if not isinstance(item, yaml.MappingNode):
        raise DefinitionError("each segment must be a mapping with id and where", source=source,
                              line=line, column=column)
    nodes: dict[str, yaml.Node] = {}
    for key, value in item.value:
        if key.value not in KEYS:
            raise DefinitionError(f"unknown key {key.value!r}; expected {', '.join(sorted(KEYS))}", source=source,
                                  line=key.start_mark.line + 1, column=key.start_mark.column + 1)
        nodes[key.value] = value
    seg_id = nodes["id"].value if "id" in nodes and isinstance(nodes["id"], yaml.ScalarNode) else None
    if not seg_id or not SEGMENT_ID.match(str(seg_id)):
        raise DefinitionError("'id' must be lower-case letters, digits and _ ([a-z0-9_]+)", source=source,
                              segment_id=seg_id, line=line, column=column)
    if seg_id in seen:
        raise DefinitionError("duplicate segment id", source=source, segment_id=seg_id, line=line, column=column)
    seen.add(seg_id)
    where_node = nodes.get("where")
    if where_node is None or not isinstance(where_node, yaml.ScalarNode):
        raise DefinitionError("missing 'where' expression", source=source, segment_id=seg_id,
                              line=line, column=column)
    consent = nodes.get("requires_consent")
    consent_value = consent.value if isinstance(consent, yaml.ScalarNode) else None
    if consent is not None and consent_value not in CONSENTS:
        raise DefinitionError(f"requires_consent must be one of {', '.join(CONSENTS)}", source=source,
                              segment_id=seg_id, line=consent.start_mark.line + 1,
                              column=consent.start_mark.column + 1)
    where = str(where_node.value).strip()
    raw_where = str(where_node.value)
    lead = len(raw_where) - len(raw_where.lstrip())
    base_locate = _scalar_locator(text, where_node)
    compiled = compile_where(where, segment_id=seg_id, source=source,
                             locate=lambda offset: base_locate(offset + lead))
    description = nodes["description"].value if "description" in nodes else ""
    return Segment(id=seg_id, where=where, description=str(description or ""),
                   requires_consent=consent_value, compiled=compiled)


def load_segments(path: Path | None) -> list[Segment]:
    """Segments from a YAML file or a directory of them (sorted by name); None: the built-in set."""
    if path is None:
        text = resources.files("pipeline.segments").joinpath("default.yaml").read_text(encoding="utf-8")
        return parse_segments(text, source="<built-in segments>")
    if not path.exists():
        raise DefinitionError(f"no such file or directory: {path}")
    files = sorted(p for p in path.rglob("*") if p.suffix in (".yaml", ".yml")) if path.is_dir() else [path]
    if path.is_dir() and not files:
        raise DefinitionError(f"no .yaml or .yml files in {path}")
    segments: list[Segment] = []
    seen: set[str] = set()
    for file in files:
        for segment in parse_segments(file.read_text(encoding="utf-8"), source=str(file)):
            if segment.id in seen:
                raise DefinitionError("duplicate segment id across files", source=str(file), segment_id=segment.id)
            seen.add(segment.id)
            segments.append(segment)
    return segments
