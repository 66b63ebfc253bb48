"""Loading a job spec from YAML (or plain data): every problem is collected with the
path of its field and raised as one :class:`ConfigError`."""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from metapeft_dist.config.errors import ConfigError, FieldErrors
from metapeft_dist.config.schema import JobSpec


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-3 as a float (YAML 1.1 wants a dot: 1.0e-3) and refuses
    a key given twice in one mapping (YAML keeps the last one silently) or one that is
    itself a mapping or a list."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:  # a mapping or a list as a key: `{{}: 1}`, `{[a]: 1}`
                raise yaml.constructor.ConstructorError(
                    None, None, f"a key must be a plain value, not {_type_name(key)}",
                    key_node.start_mark) from None
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_spec(path: str | Path, overrides: typing.Sequence[str] = ()) -> JobSpec:
    """Read, validate and return the job spec at ``path``.

    ``overrides`` are ``dotted.path=value`` strings (value in YAML syntax) applied
    before validation, e.g. ``algorithm.iterations=100``.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError([("", f"spec file not found: {path}")]) from None
    except IsADirectoryError:
        raise ConfigError([("", f"spec path is a directory, not a file: {path}")]) from None
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError([("", f"cannot read spec {path}: {err}")]) from None
    return parse_spec(text, default_name=path.stem, overrides=overrides, source=str(path))


def parse_spec(text: str, default_name: str = "job", overrides: typing.Sequence[str] = (),
               source: str = "spec") -> JobSpec:
    """Validate a job spec given as YAML text."""
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError([("", f"{source} is not valid YAML{where}: {problem}")]) from None
    if data is None:
        raise ConfigError([("", f"{source} is empty")])
    if not isinstance(data, dict):
        raise ConfigError([("", f"{source} must be a mapping of sections, "
                                f"got {_type_name(data)}")])
    data = dict(data)
    data.setdefault("name", default_name)
    errors: list[tuple[str, str]] = []
    for item in overrides:
        apply_override(data, item, errors)
    if errors:
        raise ConfigError(errors)
    return from_dict(data)


def from_dict(data: Any) -> JobSpec:
    """Validate a job spec given as plain data (as parsed from YAML or JSON)."""
    errors: list[tuple[str, str]] = []
    spec = _build(JobSpec, data, "", errors)
    if errors:
        raise ConfigError(errors)
    assert isinstance(spec, JobSpec)
    return spec


def section_from_dict(cls: type, data: Any, path: str) -> Any:
    """Validate one section of a spec (e.g. ``CostSpec`` from a cluster description)
    given as plain data; errors carry ``path`` as their prefix."""
    errors: list[tuple[str, str]] = []
    section = _build(cls, data, path, errors)
    if errors:
        raise ConfigError(errors)
    return section


def apply_override(data: dict, item: str, errors: list[tuple[str, str]]) -> None:
    """Set ``section.key=value`` (the value read as YAML) in the plain spec ``data``,
    creating sections on the way; a malformed item is appended to ``errors``."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        errors.append(("", f"override {item!r} must look like section.key=value"))
        return
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            errors.append((key, f"cannot override inside {part!r}, which is not a section"))
            return
        node = child
    node[parts[-1]] = value


def _type_name(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean",
            int: "an integer", float: "a number", type(None): "nothing"}.get(
        type(value), type(value).__name__)


def join_path(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _build(cls: type, data: Any, path: str, errors: list[tuple[str, str]]) -> Any:
    if not isinstance(data, dict):
        errors.append((path, f"must be a mapping, got {_type_name(data)}"))
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in data:
        if key not in fields:
            known = ", ".join(fields)
            errors.append((join_path(path, str(key)), f"unknown key (expected one of: {known})"))
    kwargs: dict[str, Any] = {}
    ok = True
    for name, f in fields.items():
        fpath = join_path(path, name)
        if name in data:
            before = len(errors)
            value = _convert(hints[name], data[name], fpath, errors)
            if len(errors) > before:
                ok = False
            else:
                kwargs[name] = value
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            errors.append((fpath, "missing (required)"))
            ok = False
    if not ok or any(str(k) not in fields for k in data):
        return None
    try:
        return cls(**kwargs)
    except FieldErrors as err:
        errors.extend((join_path(path, name), message) for name, message in err.errors)
        return None


def _convert(tp: Any, value: Any, path: str, errors: list[tuple[str, str]]) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _convert(inner[0], value, path, errors)
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        choices = ", ".join(str(a) for a in args)
        errors.append((path, f"must be one of {choices}; got {value!r}"))
        return None
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            errors.append((path, f"must be a list, got {_type_name(value)}"))
            return None
        items = [_convert(args[0], v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
        return tuple(items)
    if origin is dict:
        if not isinstance(value, dict):
            errors.append((path, f"must be a mapping, got {_type_name(value)}"))
            return None
        out = {}
        for key, item in value.items():
            if not isinstance(key, str):
                errors.append((path, f"keys must be names, got {key!r}"))
                continue
            out[key] = _convert(args[1], item, join_path(path, key), errors)
        return out
    if dataclasses.is_dataclass(tp):
        if value is None:
            errors.append((path, "must be a mapping, got nothing"))
            return None
        return _build(tp, value, path, errors)
    if tp is bool:
        if isinstance(value, bool):
            return value
        errors.append((path, f"must be true or false, got {value!r}"))
        return None
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer() and math.isfinite(value):
            return int(value)
        errors.append((path, f"must be an integer, got {value!r}"))
        return None
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                return float(value)
            errors.append((path, f"must be a finite number, got {value!r}"))
            return None
        errors.append((path, f"must be a number, got {value!r}"))
        return None
    if tp is str:
        if isinstance(value, str):
            return value
        errors.append((path, f"must be a string, got {value!r}"))
        return None
    raise TypeError(f"config type {tp!r} at {path} has no converter")  # a bug, not bad input
