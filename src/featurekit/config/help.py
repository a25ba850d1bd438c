"""`featurekit config`: every config key with its default and meaning, and each method's own keys.

The meanings are the `#:` comments beside (or just above) each field, in config/schema.py and in each
method's Params dataclass (dictionaries/*.py), so the listing and the code cannot drift apart.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import json
import sys
import textwrap
from functools import cache

from ..dictionaries.registry import METHODS
from .schema import DictionaryConfig, RunConfig


@cache
def _module_docs(module_name: str) -> dict[tuple[str, str], str]:
    """(class name, field name) → the field's `#:` comment, read from the module's source."""
    source = inspect.getsource(sys.modules[module_name])
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


def field_doc(cls: type, name: str) -> str:
    return _module_docs(cls.__module__).get((cls.__name__, name), "")


def keys(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, object, str]]:
    """(dotted key, default, meaning) for every leaf field of a config section, in declaration order; the
    dictionary section lists `method` and `n_latents` (the method's own keys: `method_keys`)."""
    out = []
    for f in dataclasses.fields(cls):
        if cls is DictionaryConfig and f.name == "params":
            continue
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            out += keys(type(default), f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", default, field_doc(cls, f.name)))
    return out


def method_keys(method: str) -> list[tuple[str, object, str]]:
    """(dictionary.KEY, default, meaning) of one method's own hyper-parameters."""
    params = METHODS[method].Params
    return [(f"dictionary.{f.name}", getattr(params(), f.name), field_doc(params, f.name)) for f in dataclasses.fields(params)]


def methods() -> list[tuple[str, str]]:
    """(method name, the start of its own docstring, else of its module's) for every registered method."""
    out = []
    for name, cls in sorted(METHODS.items()):
        doc = cls.__dict__.get("__doc__") or sys.modules[cls.__module__].__doc__ or ""
        first = " ".join(doc.strip().split("\n\n", 1)[0].split())
        out.append((name, first if len(first) <= 96 else first[:95] + "…"))
    return out


def _entry(key: str, default: object, doc: str) -> list[str]:
    return [f"  {key} = {json.dumps(default)}"] + (textwrap.wrap(doc, 100, initial_indent="      ", subsequent_indent="      ")
                                                    if doc else [])


def describe(methods_only: bool = False) -> str:
    """The text `featurekit config` prints."""
    out = []
    if not methods_only:
        out.append("Config keys (set with --set KEY=VALUE, or in a YAML/JSON file given with --config):\n")
        for entry in keys():
            out += _entry(*entry)
        out.append("\nEach method's own keys (dictionary.KEY, beside dictionary.method and dictionary.n_latents):")
        for name in sorted(METHODS):
            out.append(f"\n {name}:")
            own = method_keys(name)
            for entry in own:
                out += _entry(*entry)
            if not own:
                out.append("  (none)")
        out.append("")
    out.append("Dictionary methods (dictionary.method; details and sources in docs/methods.md):\n")
    out += [f"  {name:<16}{doc}" for name, doc in methods()]
    return "\n".join(out)
