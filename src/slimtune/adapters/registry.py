"""The method registry: a method is one file that registers itself.

    register_method(Method("ia3", IA3Config, inject_ia3))     # its config class and injection
    register_preset("ia3", ia3)                               # its presets, with aliases

A method's config is a dataclass deriving from `AdapterConfig`, with a `method` field naming
the family and a `preset` field naming the preset it came from; its `problems(p)` adds what
is wrong with it. Its injection returns the site adapters to place, by module name.
Nothing else in slimtune names a method: adding an adapter, saving, loading, the optimiser
and the command line all read this registry.
"""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..configs import from_dict, merge_overrides, to_dict
from ..errors import Problems, SlimtuneError, did_you_mean


class AdapterConfig:
    """Base of every method's config dataclass."""

    method: str
    preset: str

    def problems(self, p: Problems) -> None:
        """Add what is wrong with this config to p (nothing by default)."""


@dataclass(frozen=True)
class Method:
    family: str  # the config's `method` value, as written in files
    config: type  # its AdapterConfig dataclass
    # inject(model, config, root) -> {module name: SiteAdapter}: creates, places nothing
    inject: Callable[..., dict[str, nn.Module]]


METHODS: dict[str, Method] = {}
PRESETS: dict[str, Callable[..., AdapterConfig]] = {}
ALIASES: dict[str, str] = {}


def register_method(method: Method) -> Method:
    if not (dataclasses.is_dataclass(method.config) and issubclass(method.config, AdapterConfig)):
        raise TypeError(f"{method.config!r}: a method's config is a dataclass deriving from AdapterConfig")
    METHODS[method.family] = method
    return method


def register_preset(name: str, factory: Callable[..., AdapterConfig], aliases: tuple[str, ...] = ()) -> None:
    """A preset: `factory(**kw)` returns its config; its keyword parameters (such as r) are
    the overrides that other defaults derive from."""
    PRESETS[name] = factory
    for a in aliases:
        ALIASES[a] = name


def method_names() -> list[str]:
    return list(PRESETS) + list(ALIASES)


def is_method(name) -> bool:
    return isinstance(name, str) and ALIASES.get(name.lower(), name.lower()) in PRESETS


def config_classes() -> list[type]:
    return [m.config for m in METHODS.values()]


def validate(cfg: AdapterConfig) -> None:
    """Raise every problem of a config together."""
    p = Problems(f"invalid {type(cfg).__name__} (preset {getattr(cfg, 'preset', '?')!r})")
    cfg.problems(p)
    p.raise_if_any()


def unknown_method(name: str) -> SlimtuneError:
    names = method_names()
    p = Problems("unknown method")
    p.add(f"method={name!r}", "no such preset" + did_you_mean(name.lower(), names), f"use one of {names}")
    return SlimtuneError(p.items, p.context)


def preset(name: str, **overrides: Any) -> AdapterConfig:
    """A preset by name (or alias), with field overrides (`r=`, `targets=`...), validated."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        raise unknown_method(name)
    factory = PRESETS[key]
    params = inspect.signature(factory).parameters
    cfg = factory(**{k: overrides.pop(k) for k in list(overrides) if k in params})
    fields = {f.name for f in dataclasses.fields(cfg)}
    p = Problems(f"invalid options for method {name!r}")
    for k in overrides:
        if k not in fields:
            p.add(f"{k}={overrides[k]!r}", f"{type(cfg).__name__} has no field {k!r}{did_you_mean(k, fields)}",
                  f"use one of {sorted(fields)}")
    p.raise_if_any()
    cfg = dataclasses.replace(cfg, **overrides)
    validate(cfg)
    return cfg


def config_from_dict(data: Any, problems: Problems | None = None) -> AdapterConfig:
    """A method's config from plain data (a file, flags), dispatched on its `method` field;
    unknown keys, wrong types, non-finite numbers and invalid values are reported together."""
    own = problems is None
    p = problems if problems is not None else Problems("invalid adapter config")
    family = data.get("method", "lowrank") if isinstance(data, dict) else None
    if family not in METHODS:
        p.add(f"method={family!r}", "unknown adapter family" + did_you_mean(str(family), METHODS),
              f"use one of {list(METHODS)}, or a preset name via slimtune.preset()")
        p.raise_if_any()
    cfg = from_dict(METHODS[family].config, data, p)
    if own:
        p.raise_if_any()
    return cfg


def preset_config(method: str, overrides: dict, problems: Problems | None = None) -> AdapterConfig:
    """The preset `method` with nested overrides given as plain data (flags, a YAML section),
    validated. Overrides the preset's factory takes (the rank) go to it first: other defaults
    derive from them."""
    key = ALIASES.get(method.lower(), method.lower())
    if key not in PRESETS:
        raise unknown_method(method)
    params = inspect.signature(PRESETS[key]).parameters
    first = {k: v for k, v in overrides.items() if k in params and isinstance(v, (int, float)) and
             not isinstance(v, bool)}
    try:
        base = preset(method, **first)
    except SlimtuneError:  # a bad value there: reported below, with the others, against the plain preset
        base = preset(method)
    return config_from_dict(merge_overrides(to_dict(base), overrides), problems)
