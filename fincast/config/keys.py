"""Every config key with its default and help: ``fincast keys`` and the configuration reference
(``fincast keys --markdown``, written to docs/config.md by ``make docs``). Both are read off the schema."""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Iterator
from typing import Any

from fincast.config.schema import PipelineConfig, _describe, _fmt, fields

CHECKS = (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))


def _leaves(cls: type = PipelineConfig, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, Any, Any]]:
    """(key, field, type, default) of every leaf key, sections in schema order."""
    hints = typing.get_type_hints(cls)
    inst = cls()
    for f in fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _leaves(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f, hints[f.name], getattr(inst, f.name)


def _shown(default: Any) -> str:
    if default is None:
        return "null"
    if isinstance(default, tuple):
        return "[" + ", ".join(map(str, default)) + "]"
    return _fmt(default)


def describe_keys() -> list[tuple[str, str, str]]:
    """(key, default, help) for every config key: what `fincast keys` prints."""
    return [(key, _shown(default), f.metadata.get("help", "")) for key, f, _, default in _leaves()]


def _rule(meta: dict) -> str:
    """A field's checks in words: '>= 1, <= 100000', 'one of ...', 'at least 2 items'."""
    parts = [f"{text} {_fmt(meta[k])}" for k, text in CHECKS if k in meta]
    if "allowed" in meta:
        parts.append("one of " + ", ".join(_fmt(a) for a in meta["allowed"]))
    if "min_len" in meta:
        parts.append(f"at least {meta['min_len']} item(s)")
    if "item_ge" in meta:
        parts.append(f"every item >= {_fmt(meta['item_ge'])}")
    if "entries" in meta:
        parts.append("each a clip section (method name or mapping)")
    return ", ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def reference_markdown() -> str:
    """The configuration reference in Markdown: one table per section (key, type, default, allowed, meaning)."""
    sections: dict[str, list[str]] = {}
    for key, f, tp, default in _leaves():
        section = key.split(".", 1)[0] if "." in key else "top level"
        row = (f"| `{key}` | {_cell(_describe(tp))} | `{_cell(_shown(default))}` | {_cell(_rule(dict(f.metadata)))} "
               f"| {_cell(f.metadata.get('help', ''))} |")
        sections.setdefault(section, []).append(row)
    out = ["# Configuration reference", "",
           "Every key of a pipeline spec (`pipelines/*.yaml`), with its type, default, allowed values and meaning.",
           "Set any key on the command line with `--set key=value`; `fincast keys` prints the same list.",
           "Generated from the schema (`fincast/config/schema.py`) by `make docs` (`fincast keys --markdown`);",
           "`tests/test_docs.py` fails when this file is out of date.", ""]
    for section, rows in sections.items():
        out += [f"## {section}", "", "| key | type | default | allowed | meaning |", "|---|---|---|---|---|", *rows, ""]
    return "\n".join(out)
