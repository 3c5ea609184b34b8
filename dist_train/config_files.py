"""Config files of the trainer (``--config FILE``): YAML, TOML or JSON mappings of field names to values.

Each format's parser keeps the last of a key given twice (TOML refuses it without naming the key); here a
key given twice, also as ``batch-size`` and ``batch_size``, is refused with the file and key named.
"""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path
from typing import Any


class _DuplicateKey(ValueError):
    """A key given twice in one mapping of a config file."""

    def __init__(self, key: Any, where: str = "") -> None:
        super().__init__(f"{key!r} is given twice{where}: remove one of them")


def _json_pairs(pairs: list[tuple[str, Any]]) -> dict:
    """``json.loads``'s ``object_pairs_hook``: a dict, refusing a key given twice (json keeps the last)."""
    out: dict = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _yaml_load(text: str) -> Any:
    """``yaml.safe_load``, but refusing a key given twice in a mapping (PyYAML keeps the last) and reading
    ``1e-3`` as the float it is (PyYAML follows YAML 1.1, which needs a dot: ``1.0e-3``)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # << merges another mapping: overriding is its point
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    if key in seen:
                        raise _DuplicateKey(key, f" (line {key_node.start_mark.line + 1})")
                    seen.add(key)
                except TypeError:  # an unhashable key: SafeLoader says so itself
                    pass
            return super().construct_mapping(node, deep=deep)

    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                                 list("-+0123456789"))
    return yaml.load(text, Loader=Loader)  # a SafeLoader: plain data only


def _toml_error(e: tomllib.TOMLDecodeError, text: str) -> str:
    """tomllib's message, with the line it points at (its message names no key, e.g. for one given twice)."""
    found = re.search(r"at line (\d+)", str(e))
    lines = text.splitlines()
    if found and 0 < int(found.group(1)) <= len(lines):
        return f"{e}: {lines[int(found.group(1)) - 1].strip()!r}"
    return str(e)


def read_config_file(path: str | Path, known: set[str]) -> dict:
    """Field values (names in ``known``) from a YAML (.yaml/.yml), TOML (.toml) or JSON (.json) file; a key given
    twice and an unknown field are refused."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--config {path}: file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"--config {path} cannot be read: {e}") from e
    suffix = path.suffix.lower()
    try:
        if suffix in (".yaml", ".yml"):
            data = _yaml_load(text)
            data = {} if data is None else data
        elif suffix == ".toml":
            data = tomllib.loads(text)  # refuses a key given twice itself
        elif suffix == ".json":
            data = json.loads(text, object_pairs_hook=_json_pairs)
        else:
            raise ValueError(f"--config {path}: unknown file type {suffix!r}; use .yaml, .yml, .toml or .json")
    except _DuplicateKey as e:
        raise ValueError(f"--config {path}: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config {path} cannot be parsed: {_toml_error(e, text)}") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"--config {path} cannot be parsed: {e}") from e
    except Exception as e:  # yaml.YAMLError without importing yaml at module level
        if type(e).__module__.startswith("yaml"):
            raise ValueError(f"--config {path} cannot be parsed: {e}") from e
        raise
    if not isinstance(data, dict):
        raise ValueError(f"--config {path} must hold a mapping of field names to values, got {type(data).__name__}")
    values: dict[str, Any] = {}
    spelled: dict[str, Any] = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name in values:  # batch-size and batch_size
            raise ValueError(f"--config {path}: field {name} is given twice (as {spelled[name]!r} and {key!r}): "
                             "remove one of them")
        values[name], spelled[name] = value, key
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"--config {path}: unknown field(s) {', '.join(unknown)}; "
                         f"valid fields: {', '.join(sorted(known))}")
    return values
