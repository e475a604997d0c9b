"""Command-line flags generated from typed configs, and config files read into plain data.

One flag per config field (`--lr`, nested parts as `--adapter.A.mode`; a list field takes
several values and may be repeated: `--input a b` = `--input a --input b`); a flag left out keeps
the config's value, so a YAML or JSON file (`--config`) and the flags fill the same object
(configs.from_dict checks it). A value that does not parse as the field's type is an argparse
error (exit code 2, the flag named); everything else is checked by the config.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import types
import typing
from pathlib import Path

import yaml

from ..adapters.registry import AdapterConfig
from ..configs import check_type, is_config_class, type_name
from ..errors import Problems, did_you_mean


def _number_or_str(s: str) -> float | str:
    try:
        return float(s)
    except ValueError:
        return s


def _bool(s: str) -> bool:
    if s.lower() in ("1", "true", "yes", "on"):
        return True
    if s.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"{s!r} is not true or false")


def _flag_type(tp):
    """(converter, nargs) for a field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _flag_type(args[0]) if len(args) == 1 else (_number_or_str, None)
    if origin is list:
        (inner,) = typing.get_args(tp) or (str,)
        return (inner if inner in (int, float) else str), "+"
    if tp is bool:
        return _bool, "?"
    return (tp if tp in (int, float) else str), None


def add_config_flags(parser: argparse.ArgumentParser, classes, prefix: str = "", dest: str = "cfg",
                     skip: tuple = (), aliases: dict | None = None, flag_prefix: str = "") -> None:
    """One flag per field of the config classes (the first class to name a field types it),
    named `--{flag_prefix}{prefix}{field}`; values left out are not set, so the config's
    defaults stand. `flag_values(args, dest)` returns the values given."""
    aliases = aliases or {}
    seen = set()
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            name = prefix + f.name
            tp = hints[f.name]
            if name in seen or f.name in skip or _is_adapter(tp):
                continue
            seen.add(name)
            if is_config_class(tp):
                add_config_flags(parser, (tp,), f"{name}.", dest, skip, aliases, flag_prefix)
                continue
            conv, nargs = _flag_type(tp)
            extra = {"const": True} if nargs == "?" else {"action": "extend"} if nargs == "+" else {}
            parser.add_argument(f"--{flag_prefix}{name}", *aliases.get(name, []), dest=f"{dest}:{name}", type=conv,
                                nargs=nargs,
                                default=argparse.SUPPRESS, metavar=f.name.upper(), **extra,
                                help=f"{f.metadata.get('help', '')} [{cls.__name__}]")


def _is_adapter(tp) -> bool:
    args = typing.get_args(tp) or (tp,)
    return any(isinstance(a, type) and issubclass(a, AdapterConfig) for a in args)


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def flag_values(args: argparse.Namespace, dest: str) -> dict:
    """The flags given for `dest`, as nested plain data."""
    out: dict = {}
    for key, value in vars(args).items():
        if key.startswith(dest + ":"):
            _set(out, key[len(dest) + 1:], value)
    return out


def read_config_file(path: str, flag: str = "--config") -> dict:
    """A YAML (.yaml/.yml) or JSON config file (given as `flag`) as a mapping; a missing,
    unreadable or malformed file is one clear error."""
    file = Path(path)
    p = Problems(f"cannot read the {'config' if flag == '--config' else flag.lstrip('-')} file")
    if not file.is_file():
        p.add(f"{flag} {path!r}", "a directory, not a file" if file.is_dir() else "no such file",
              "give the path of a YAML or JSON file")
        p.raise_if_any()
    try:
        text = file.read_text(encoding="utf-8-sig")
        data = yaml.safe_load(text) if file.suffix in (".yaml", ".yml") else json.loads(text)
    except UnicodeDecodeError as e:
        p.add(f"{flag} {path!r}", f"not UTF-8 text ({e.reason})", "save it as UTF-8")
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        p.add(f"{flag} {path!r}", f"not valid YAML{where} ({getattr(e, 'problem', None) or e})",
              "fix the YAML there")
    except json.JSONDecodeError as e:
        p.add(f"{flag} {path!r}", f"not valid JSON at line {e.lineno} ({e.msg})",
              "fix the JSON there, or name the file .yaml")
    p.raise_if_any()
    if data is None:
        data = {}
    if not isinstance(data, dict):
        p.add(f"{flag} {path!r}", f"it holds a {type(data).__name__}, not a mapping of fields",
              "write `key: value` lines")
        p.raise_if_any()
    return data


def masked_values(cls, file_data: dict, flags: dict, p: Problems, where: str = "") -> None:
    """Problems for the config file's values of the wrong type that a flag overrides: the run
    would not see them, but the file stays wrong and would fail the next run without the flag."""
    hints = typing.get_type_hints(cls)
    for key in file_data.keys() & flags.keys():
        tp, value = hints.get(key), file_data[key]
        if tp is None:
            continue  # an unknown key: reported by the config itself
        if is_config_class(tp) and isinstance(value, dict) and isinstance(flags[key], dict):
            masked_values(tp, value, flags[key], p, f"{where}{key}.")
        elif not check_type(value, tp):
            p.add(f"{where}{key}={value!r} in the --config file", f"expected a value of type {type_name(tp)} (the "
                  f"flag --{where}{key} overrides it for this run)", "fix the value in the file")


NUMBER = re.compile(r"-(\d+\.?\d*|\.\d+)(e[-+]?\d+)?|-inf(inity)?|-nan", re.I)


def join_negative_numbers(argv: list[str]) -> list[str]:
    """`--lr -1e-3` as `--lr=-1e-3`: argparse reads a value that starts with '-' as a flag unless
    it looks like a plain negative number, so `-1e-3` would get "expected one argument" instead of
    slimtune's own check of the value."""
    out: list[str] = []
    for arg in argv:
        if out and NUMBER.fullmatch(arg) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] = f"{out[-1]}={arg}"
        else:
            out.append(arg)
    return out


def unknown_flags_message(parser: argparse.ArgumentParser, extras: list[str]) -> str:
    """argparse's "unrecognized arguments" with a did-you-mean for each unknown flag."""
    options = [o for a in parser._actions for o in a.option_strings if o.startswith("--")]
    parts = []
    for arg in extras:
        flag = arg.split("=", 1)[0]
        parts.append(arg + (did_you_mean(flag, options) if flag.startswith("-") else ""))
    return "unrecognized arguments: " + " ".join(parts)
