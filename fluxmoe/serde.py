"""JSON round-trip for the core dataclasses, with validation that names file, field and value.

Every core type (ModelSpec, HardwareProfile, Plan, ...) is a plain dataclass; this module turns
one into a JSON-able dict and back, checking each field against its type annotation so that a
malformed file fails on load with `file: field 'a.b[2].c': expected int, got 'x'` instead of
deep inside the planner.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from fluxmoe.errors import ConfigError

T = TypeVar("T")


def to_dict(obj: Any) -> Any:
    """A dataclass (possibly nested) as plain JSON-able data."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(x) for x in obj]
    if isinstance(obj, dict):
        return {str(k): to_dict(v) for k, v in obj.items()}
    return obj


def from_dict(cls: type[T], data: Any, source: str = "<dict>", path: str = "") -> T:
    """Build `cls` from `data`, validating types; errors name `source` and the field path."""
    return _convert(cls, data, source, path)


def dump_json(obj: Any, path: str | Path) -> None:
    """Write a dataclass as indented JSON (atomically: a failure leaves no half-written file)."""
    path = Path(path)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(to_dict(obj), indent=2) + "\n")
    tmp.replace(path)


def load_json(cls: type[T], path: str | Path) -> T:
    """Read and validate a dataclass from a JSON file."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder, not a JSON file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: a binary file, not JSON") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    return from_dict(cls, data, source=str(path))


def _fail(source: str, path: str, message: str) -> ConfigError:
    return ConfigError(f"{source}: field '{path or '<root>'}': {message}")


def _convert(tp: Any, value: Any, source: str, path: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, source, path)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else _fail(source, path, f"got {value!r}, which matches none of {tp}")
    if origin is typing.Literal:
        if value not in args:
            raise _fail(source, path, f"expected one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list):
            raise _fail(source, path, f"expected a list, got {value!r}")
        item = args[0] if args else Any
        out = [_convert(item, v, source, f"{path}[{i}]") for i, v in enumerate(value)]
        return out if origin is list else tuple(out)
    if origin is dict:
        if not isinstance(value, dict):
            raise _fail(source, path, f"expected an object, got {value!r}")
        kt, vt = args if args else (Any, Any)
        return {_convert(kt, k, source, f"{path}.{k}"): _convert(vt, v, source, f"{path}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _fail(source, path, f"expected an object, got {value!r}")
        hints = typing.get_type_hints(tp)
        fields = {f.name: f for f in dataclasses.fields(tp) if f.init}
        unknown = set(value) - set(fields)
        if unknown:
            raise _fail(source, f"{path}.{sorted(unknown)[0]}".lstrip("."), f"unknown field (known: {', '.join(fields)})")
        kwargs = {}
        for name, f in fields.items():
            sub = f"{path}.{name}".lstrip(".")
            if name in value:
                kwargs[name] = _convert(hints[name], value[name], source, sub)
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise _fail(source, sub, "missing")
        try:
            return tp(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{source}: {e}") from None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise _fail(source, path, f"expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not (isinstance(value, int) or (isinstance(value, float) and value.is_integer())):
            raise _fail(source, path, f"expected an integer, got {value!r}")
        return int(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise _fail(source, path, f"expected true or false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise _fail(source, path, f"expected a string, got {value!r}")
        return value
    return value
