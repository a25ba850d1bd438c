"""`featurekit config`: every config key with its default and meaning, and the dictionary methods.

The meanings are the `#:` comments beside (or just above) each field in config.py, so the listing and
the code cannot drift apart.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import textwrap

from . import config as config_module
from .config import RunConfig


def field_docs() -> dict[tuple[str, str], str]:
    """(class name, field name) → the field's `#:` comment, read from config.py's source."""
    source = inspect.getsource(config_module)
    lines = source.splitlines()
    docs = {}
    for node in ast.parse(source).body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if not isinstance(item, ast.AnnAssign) or not isinstance(item.target, ast.Name):
                continue
            line = lines[item.lineno - 1]
            parts = [line.split("#:", 1)[1].strip()] if "#:" in line else []
            above = item.lineno - 2
            while above >= 0 and lines[above].strip().startswith("#:"):
                parts.insert(0, lines[above].strip()[2:].strip())
                above -= 1
            docs[(node.name, item.target.id)] = " ".join(parts)
    return docs


def keys(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, object, str]]:
    """(dotted key, default, meaning) for every leaf field of the config, in declaration order."""
    docs = field_docs()
    out = []
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += keys(type(default), f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", default, docs.get((cls.__name__, f.name), "")))
    return out


def methods() -> list[tuple[str, str]]:
    """(method name, the start of its own docstring, else of its module's) for every registered method."""
    import sys

    from .dictionaries import METHODS

    out = []
    for name, cls in sorted(METHODS.items()):
        doc = cls.__dict__.get("__doc__") or sys.modules[cls.__module__].__doc__ or ""
        first = " ".join(doc.strip().split("\n\n", 1)[0].split())
        out.append((name, first if len(first) <= 96 else first[:95] + "…"))
    return out


def describe(methods_only: bool = False) -> str:
    """The text `featurekit config` prints."""
    out = []
    if not methods_only:
        out.append("Config keys (set with --set KEY=VALUE, or in a YAML/JSON file given with --config):\n")
        for key, default, doc in keys():
            out.append(f"  {key} = {json.dumps(default)}")
            if doc:
                out += textwrap.wrap(doc, 100, initial_indent="      ", subsequent_indent="      ")
        out.append("")
    out.append("Dictionary methods (dictionary.method; details and sources in docs/methods.md):\n")
    out += [f"  {name:<16}{doc}" for name, doc in methods()]
    return "\n".join(out)
