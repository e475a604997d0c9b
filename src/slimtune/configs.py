"""Typed configs: the machinery every config dataclass of slimtune shares.

A config is a dataclass whose fields carry their help text (`field(default, help)`). Plain
data (a YAML or JSON file, command-line flags) becomes a config through `from_dict`, which
rejects unknown keys, wrong types and non-finite numbers and reports every problem at once.
A config class may add its own checks in a `problems(self, p)` method; `from_dict` calls it.
The command line's flags are generated from the same fields (cli/flags.py).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
import types
import typing
from typing import Any, Literal, Union

from .errors import Problems, did_you_mean


def field(default: Any, help: str, **kw: Any) -> Any:
    """A dataclass field with its help text; mutable defaults are copied per instance."""
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=lambda d=default: _copy(d), metadata={"help": help}, **kw)
    return dataclasses.field(default=default, metadata={"help": help}, **kw)


def _copy(x: Any) -> Any:
    return dataclasses.replace(x) if dataclasses.is_dataclass(x) else type(x)(x)


def is_config_class(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def check_type(value: Any, tp: Any) -> bool:
    """A small runtime check of JSON/YAML values against a field annotation. Floats must be
    finite: NaN and infinities are never a valid setting."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(check_type(value, a) for a in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return isinstance(value, list) and all(check_type(v, inner) for v in value)
    if origin is dict:
        k, v = typing.get_args(tp)
        return isinstance(value, dict) and all(check_type(a, k) and check_type(b, v) for a, b in value.items())
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return False


def _non_finite(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def from_dict(cls: type, data: Any, problems: Problems | None = None, where: str = "") -> Any:
    """Build config `cls` from plain data. Unknown keys, wrong types and non-finite numbers
    are problems; fields with bad values keep their defaults so that every problem is found.
    With `problems` given, they are added there; otherwise raised together here."""
    own = problems is None
    problems = problems if problems is not None else Problems(f"invalid {cls.__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    if not isinstance(data, dict):
        problems.add(f"{where.rstrip('.') or cls.__name__}={data!r}", "expected a mapping of fields",
                     f"use keys from {names}")
        data = {}
    for key, value in data.items():
        path = f"{where}{key}"
        if key not in names:
            problems.add(f"key {path!r}", f"{cls.__name__} has no such field{did_you_mean(str(key), names)}",
                         f"remove it or use one of {names}")
            continue
        tp = hints[key]
        if is_config_class(tp):
            kwargs[key] = from_dict(tp, value, problems, f"{path}.")
        elif check_type(value, tp):
            kwargs[key] = value
        elif _non_finite(value):
            problems.add(f"{path}={value!r}", "not a finite number", "give a finite value")
        else:
            problems.add(f"{path}={value!r}", f"expected a value of type {type_name(tp)}", "give a value of that type")
    cfg = cls(**kwargs)
    if hasattr(cfg, "problems") and not where:  # nested configs are checked by their owner
        cfg.problems(problems)
    if own:
        problems.raise_if_any()
    return cfg


def to_dict(cfg: Any) -> dict:
    """Plain data (JSON-safe) of a config, nested configs included."""
    return dataclasses.asdict(cfg)


def merge_overrides(base: dict, over: dict) -> dict:
    """`base` with `over`'s keys on top; nested mappings (A: {mode: ...}) merge key by key."""
    return {**base, **{k: merge_overrides(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                       for k, v in over.items()}}


def choice(p: Problems, name: str, value: Any, allowed: tuple | list) -> None:
    """A problem unless `value` is one of `allowed`."""
    if value not in allowed:
        p.add(f"{name}={value!r}", "not an allowed value" + did_you_mean(str(value), [str(a) for a in allowed]),
              f"use one of {list(allowed)}")


def at_least(p: Problems, name: str, value: Any, low: float) -> None:
    if value < low:
        p.add(f"{name}={value!r}", f"must be at least {low}", f"set {name} >= {low}")


def out_directory(p: Problems, name: str, value, fix: str = "give the path of a directory (it is created if missing)"
                  ) -> None:
    """A problem if `value`, a directory to write into, is an existing file."""
    if Path(value).exists() and not Path(value).is_dir():
        p.add(f"{name}={str(value)!r}", "it is a file, not a directory", fix)
