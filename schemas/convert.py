"""The one way from plain data (YAML, JSON) to kdpipe's dataclasses: training config, codec
config, manifest.

Conversion is strict: an unknown key, a missing required key or a value of the wrong type
is a ``ConfigError`` naming the file and the key's full path (``loss.terms[2].weight:
expected a number, got 'abc'``). A key left out takes the field's default, which is how
manifests of earlier minor versions stay readable. Integers are accepted for floats and
integral floats for integers (both exact); nothing else is coerced, so YAML files are read
with ``load_yaml``, which takes ``3e-3`` as the number YAML 1.2 says it is.

A dataclass whose plain form is not one key per field declares a classmethod
``canonical_data(data)`` returning that form (``ComponentSpec``: a kind name alone, or the
kind beside its parameters).
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import ConfigError

T = TypeVar("T")


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2 floats: an exponent without a dot (``3e-3``) is a number."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                              re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def load_yaml(text: str, where: str) -> Any:
    """Parse YAML (or JSON, a subset of it); a syntax error names ``where``."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML/JSON: {e}") from e


def load_file(path: str | Path) -> Any:
    """The data of a YAML or JSON file; a missing file or a syntax error names it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such file")
    return load_yaml(p.read_text(), str(p))


def from_data(cls: type[T], data: Any, *, file: str | None = None,
              unknown: str = "error") -> T:
    """Build dataclass ``cls`` from ``data``; errors name ``file`` and the key's path.
    ``unknown="ignore"`` drops unknown keys (data of a newer minor format)."""
    try:
        return _convert(data, cls, "", unknown == "ignore")
    except ConfigError as e:
        raise ConfigError(f"{file}: {e}" if file else str(e)) from None


def _at(path: str, message: str) -> ConfigError:
    return ConfigError(f"{path}: {message}" if path else message)


def _key(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _convert(value: Any, tp: Any, path: str, lenient: bool) -> Any:
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        return _union(value, typing.get_args(tp), path, lenient)
    if dataclasses.is_dataclass(tp):
        return _dataclass(tp, value, path, lenient)
    if origin is list:
        if not isinstance(value, list):
            raise _at(path, f"expected a list, got {value!r}")
        (item,) = typing.get_args(tp) or (Any,)
        return [_convert(v, item, f"{path}[{i}]", lenient) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise _at(path, f"expected a mapping, got {value!r}")
        _, item = typing.get_args(tp) or (str, Any)
        for k in value:
            if not isinstance(k, str):
                raise _at(path, f"expected string keys, got {k!r}")
        return {k: _convert(v, item, _key(path, k), lenient) for k, v in value.items()}
    return _scalar(value, tp, path)


def _union(value: Any, args: tuple, path: str, lenient: bool) -> Any:
    if value is None:
        if type(None) in args:
            return None
        raise _at(path, "must not be null")
    options = [a for a in args if a is not type(None)]
    if len(options) == 1:
        return _convert(value, options[0], path, lenient)
    for option in options:
        try:
            return _convert(value, option, path, lenient)
        except ConfigError:
            continue
    names = " or ".join(getattr(a, "__name__", str(a)) for a in options)
    raise _at(path, f"expected {names}, got {value!r}")


_SCALARS = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _scalar(value: Any, tp: type, path: str) -> Any:
    if tp not in _SCALARS:
        raise TypeError(f"{path}: fields of type {tp!r} are not supported")
    if isinstance(value, tp) and not (tp is not bool and isinstance(value, bool)):
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    raise _at(path, f"expected {_SCALARS[tp]}, got {value!r}")


def _dataclass(cls: type, value: Any, path: str, lenient: bool) -> Any:
    canonical = getattr(cls, "canonical_data", None)
    if canonical is not None:
        value = canonical(value)
    if not isinstance(value, dict):
        raise _at(path, f"expected a mapping, got {value!r}")
    fields = [f for f in dataclasses.fields(cls) if f.init]
    names = [f.name for f in fields]
    unknown = [k for k in value if k not in names]
    if unknown and not lenient:
        listed = ", ".join(repr(k) for k in unknown)
        raise _at(path, f"unknown key{'s' if len(unknown) > 1 else ''} {listed}; valid keys: "
                        f"{', '.join(names)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for f in fields:
        if f.name in value:
            kwargs[f.name] = _convert(value[f.name], hints[f.name], _key(path, f.name), lenient)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise _at(path, f"missing required key {f.name!r}")
    try:
        return cls(**kwargs)
    except ConfigError as e:            # a check of the dataclass's own (__post_init__)
        raise _at(path, str(e)) from None
