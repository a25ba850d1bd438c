"""Reading a config file: YAML or JSON as plain data (never code), strictly: binary or non-UTF-8 files,
syntax errors (with the line and column), tabs, Python tags and keys given twice are refused by name."""

from __future__ import annotations

import json
import typing
from pathlib import Path
from typing import Any

import yaml

from .._io import StrictJSONError, unique_keys
from ..errors import FeaturekitError


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The mapping in a YAML or JSON config file. A file that is missing, binary, not UTF-8, not valid
    YAML/JSON (named with the line and column), or that gives a key twice raises FeaturekitError."""
    path = Path(path)
    if not path.is_file():
        raise FeaturekitError(f"config file {path} does not exist")
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise FeaturekitError(f"could not read config file {path}: {err.strerror or err}; check its permissions") from err
    if b"\0" in raw:
        raise FeaturekitError(f"config file {path} is a binary file (it holds NUL bytes), not YAML or JSON text: "
                              "pass the .yaml or .json config")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise FeaturekitError(f"config file {path} is not UTF-8 text (byte {err.start}, line {line}): "
                              "save it as UTF-8") from err
    data = _parse_json(text, path) if path.suffix.lower() == ".json" else parse_yaml(text, f"config file {path}")
    if data is None:  # an empty YAML file: the defaults
        return {}
    if not isinstance(data, dict):
        raise FeaturekitError(f"config file {path} must hold a mapping at the top level (key: value lines), "
                              f"got {type(data).__name__}")
    return data


def _parse_json(text: str, path: Path) -> Any:
    try:
        return json.loads(text, object_pairs_hook=unique_keys)
    except json.JSONDecodeError as err:
        raise FeaturekitError(f"config file {path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}; "
                              "fix it there (a file that ends early is truncated: restore or rewrite it)") from err
    except StrictJSONError as err:
        raise FeaturekitError(f"config file {path}: {err}") from err


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader (plain data, no Python objects) that refuses a mapping key given twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: set = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader itself refuses an unhashable key
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} appears twice in one mapping: keep one",
                                                        key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, what: str) -> Any:
    """YAML `text` as plain data; `what` (the file or the override) is named in the error."""
    try:
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = err.problem or err.context or str(err)
        if "'\\t'" in problem:
            problem += "; YAML does not allow tab characters there: indent with spaces"
        elif "python/" in problem:
            problem += ("; that tag asks YAML to build a Python object, and featurekit reads configs as plain data "
                        "(it never runs code from them): remove the tag")
        elif "appears twice" not in problem:
            problem += "; fix the YAML there"
        raise FeaturekitError(f"{what} is not valid YAML{where}: {problem}") from err
    except yaml.YAMLError as err:
        raise FeaturekitError(f"{what} is not valid YAML ({err}); fix the YAML") from err
