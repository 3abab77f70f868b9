"""The README's configuration table is generated from Settings and cannot drift from it (issue 7 item 6)."""

import importlib.util
import re
from pathlib import Path

import pytest

from pipeline.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def _generator():
    spec = importlib.util.spec_from_file_location("settings_table", ROOT / "scripts" / "settings_table.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


gen = _generator()


def test_readme_settings_table_is_the_generated_one():
    current = gen.readme_table((ROOT / "README.md").read_text())
    assert current == gen.settings_table(), (
        "README.md's configuration table is stale: run .venv/bin/python scripts/settings_table.py --write")


def test_table_has_one_row_per_setting_with_its_default():
    rows = [line for line in gen.settings_table().splitlines()[2:]]
    names = [re.match(r"\| `PIPELINE_([A-Z_0-9]+)` \|", row).group(1).lower() for row in rows]
    assert names == list(Settings.model_fields)
    by_name = dict(zip(names, rows, strict=True))
    assert "| `embedded` |" in by_name["broker"]
    assert "integer (≥ 1, ≤ 1024) | `4` |" in by_name["partitions"]
    assert "`wall` \\| `event`" in by_name["clock"]
    assert "secret string, optional | unset |" in by_name["api_token"]
    assert all(row.count(" | ") == 3 for row in rows)  # no unescaped | inside a cell


def test_a_stale_table_is_detected_and_rewritten(tmp_path):
    readme = tmp_path / "README.md"
    text = (ROOT / "README.md").read_text()
    readme.write_text(text.replace("`PIPELINE_BATCH_SIZE` | integer (≥ 1) | `2000`",
                                   "`PIPELINE_BATCH_SIZE` | integer (≥ 1) | `1000`"))
    assert gen.readme_table(readme.read_text()) != gen.settings_table()
    assert gen.write_readme(readme) is True
    assert readme.read_text() == text
    assert gen.write_readme(readme) is False


def test_missing_markers_are_an_error():
    with pytest.raises(ValueError, match="settings:start"):
        gen.readme_table("# a README without the table\n")


SQL_BLOCK = re.compile(r"<!-- sql:([a-z0-9-]+) -->\n```sql\n(.*?)\n```", re.DOTALL)


def test_docs_clickhouse_carries_the_readme_analyst_sql_unchanged():
    """tests/integration/test_analyst_sql.py runs the README's queries; docs/clickhouse.md must show the same."""
    readme = dict(SQL_BLOCK.findall((ROOT / "README.md").read_text()))
    docs = dict(SQL_BLOCK.findall((ROOT / "docs" / "clickhouse.md").read_text()))
    assert len(readme) == 5
    assert docs == readme
