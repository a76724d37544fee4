"""What the gunicorn table says, for people: `appd migrate gunicorn.conf.py`
(the equivalent appd.toml and what could not be carried over) and
`python -m appd.gunicorn --table` (every gunicorn setting and its fate)."""

from __future__ import annotations

import json
import sys

from . import gunicorn, gunicorn_sources
from .config import BY_NAME, ConfigError

_FATES = (gunicorn.HONOURED, gunicorn.REFUSED, gunicorn.NOT_APPLICABLE)


def table_markdown() -> str:
    """One row per gunicorn setting, then the counts."""
    rows = ["| gunicorn setting | fate | appd setting or why |", "| --- | --- | --- |"]
    counts = dict.fromkeys(_FATES, 0)
    for row in gunicorn.ROWS:
        fate = row.fate()
        counts[fate] += 1
        what = f"`{row.appd}`" if fate == gunicorn.HONOURED else row.reason()
        rows.append(f"| `{row.name}` | {fate} | {what} |")
    total = sum(counts.values())
    rows.append("")
    rows.append(f"{total} gunicorn settings: " + ", ".join(f"{counts[f]} {f}" for f in _FATES) + ".")
    return "\n".join(rows)


def migrate(path: str) -> int:
    """Print the appd.toml equivalent of a gunicorn.conf.py; what appd cannot carry goes to stderr."""
    try:
        settings = gunicorn_sources.read_python_config(path)
    except ConfigError as exc:
        print(f"appd migrate: {exc}", file=sys.stderr)
        return 2
    translation = gunicorn.translate(settings, path)
    values = {}
    for name, value in translation.values.items():
        try:
            values[name] = BY_NAME[name].parse(value)
        except (KeyError, ValueError) as exc:
            translation.refused.append(f"{name} = {value!r}: {exc}")
    hooks = [name for name, value in values.items() if isinstance(value, str) and value.endswith(f":{name}")
             and value.split(":", 1)[0].endswith(".py")]
    print(f"# appd.toml from {path} (appd migrate)")
    if hooks:
        print(f"# hooks {', '.join(hooks)} stay in {path}: appd runs that file to call them")
    print(to_toml(values))
    lines = translation.refused + [f"not needed: {line}" for line in translation.notes]
    if lines:
        print(f"# not carried over ({len(lines)}):", file=sys.stderr)
        for line in lines:
            print(f"#   {line}", file=sys.stderr)
    return 0


def to_toml(values: dict) -> str:
    """A flat TOML document; tables (e.g. logconfig_dict) as [sections] after the scalars."""
    lines, tables = [], []
    for name, value in values.items():
        if value is None:
            continue  # TOML has no null: unset is the default
        if isinstance(value, dict):
            tables.append((name, value))
        else:
            lines.append(f"{name} = {_toml_value(value)}")
    for name, table in tables:
        lines.extend(_toml_table(name, table))
    return "\n".join(lines)


def _toml_table(prefix: str, table: dict) -> list:
    lines = ["", f"[{prefix}]"]
    nested = []
    for key, value in table.items():
        if isinstance(value, dict):
            nested.append((f"{prefix}.{_toml_key(key)}", value))
        else:
            lines.append(f"{_toml_key(key)} = {_toml_value(value)}")
    for name, sub in nested:
        lines.extend(_toml_table(name, sub))
    return lines


def _toml_key(key) -> str:
    key = str(key)
    return key if key.replace("_", "").replace("-", "").isalnum() else json.dumps(key)


def _toml_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in value.items()) + "}"
    return json.dumps(str(value))  # JSON string escapes are valid TOML basic strings


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--table"]:
        print(table_markdown())
        return 0
    print("usage: python -m appd.gunicorn --table", file=sys.stderr)
    return 2
