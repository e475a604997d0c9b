"""The `slimtune` command line. Adapter flags are generated from the config dataclasses.

    slimtune params --model llama-2-7b --method vera --rank 256
    slimtune new    --model DIR --method lora --r 16 --out adapter/
    slimtune merge  --model DIR --adapter adapter/ --out merged/
    slimtune check                      # the core on the default model, end to end
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import types
import typing
from pathlib import Path

import yaml

from . import config as C
from .errors import SlimtuneError
from .models import DEFAULT_MODEL, shipped_configs
from .presets import ALIASES, PRESETS, preset


def _number_or_str(s: str) -> float | str:
    try:
        return float(s)
    except ValueError:
        return s


def _flag_type(tp):
    """(converter, nargs) for a field annotation."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return _flag_type(args[0]) if len(args) == 1 else (_number_or_str, None)
    if origin is list:
        return str, "+"
    if tp is bool:
        return (lambda s: s.lower() in ("1", "true", "yes")), None
    return (tp if tp in (int, float) else str), None


def add_config_flags(parser: argparse.ArgumentParser, classes=(C.LowRankConfig, C.IA3Config), prefix: str = ""):
    """One flag per config field (nested parts as --A.mode); defaults come from the preset."""
    seen = set()
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            name = prefix + f.name
            if name in seen or f.name in ("method", "preset"):
                continue
            seen.add(name)
            tp = hints[f.name]
            if C._is_dataclass_type(tp):
                add_config_flags(parser, (tp,), prefix=f"{name}.")
                continue
            conv, nargs = _flag_type(tp)
            flags = [f"--{name}"] + (["--rank"] if name == "r" else [])
            parser.add_argument(*flags, dest=f"cfg:{name}", type=conv, nargs=nargs, default=argparse.SUPPRESS,
                                metavar=f.name.upper(),
                                help=f"{f.metadata.get('help', '')} [{cls.__name__}]")


def adapter_config(args: argparse.Namespace) -> C.AdapterConfig:
    """Preset (or --config file), then flags on top; unknown or misplaced keys are errors."""
    overrides = {k[4:]: v for k, v in vars(args).items() if k.startswith("cfg:")}
    if getattr(args, "config", None):
        text = Path(args.config).read_text(encoding="utf-8")
        data = yaml.safe_load(text) if args.config.endswith((".yaml", ".yml")) else json.loads(text)
        base = C.to_dict(C.config_from_dict(data))
    else:  # the rank first: presets derive other defaults from it
        base = C.to_dict(preset(args.method, **({"r": overrides.pop("r")} if "r" in overrides else {})))
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = base
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return C.config_from_dict(base)  # validates too


def cmd_params(args) -> int:
    from .inject import add_adapter
    from .models import build_on_meta
    from .ops import count_parameters

    model = build_on_meta(args.model)
    cfg = adapter_config(args)
    add_adapter(model, cfg)
    count = count_parameters(model)
    rows = [("model", args.model), ("method", f"{cfg.preset} ({cfg.method})"),
            ("rank", str(getattr(cfg, "r", "-"))), ("trainable", f"{count.trainable:,}"),
            ("shared frozen", f"{count.shared_frozen:,}"), ("base model", f"{count.base:,}"),
            ("trainable / base", f"{100 * count.share:.4f} %")]
    if args.json:
        print(json.dumps({"model": args.model, "method": cfg.preset, "trainable": count.trainable,
                          "shared_frozen": count.shared_frozen, "base": count.base}))
    else:
        print("\n".join(f"{k:>17}  {v}" for k, v in rows))
    return 0


def cmd_new(args) -> int:
    import slimtune

    model = slimtune.load_model(args.model)
    slimtune.add_adapter(model, adapter_config(args))
    slimtune.save_adapter(model, args.out)
    print(f"wrote {args.out} ({slimtune.count_parameters(model)})")
    return 0


def cmd_merge(args) -> int:
    import slimtune

    model = slimtune.load_adapter(slimtune.load_model(args.model), args.adapter)
    base = slimtune.load_model(args.model)
    base.load_state_dict(slimtune.merged_state_dict(model))
    base.save_pretrained(args.out)
    try:
        slimtune.load_tokenizer(args.model).save_pretrained(args.out)
    except (OSError, ValueError):
        pass  # a model directory without a tokenizer
    print(f"wrote merged model to {args.out}")
    return 0


def cmd_check(args) -> int:
    from .check import run_check

    return run_check(args.model, args.prompt)


def build_parser() -> argparse.ArgumentParser:
    methods = list(PRESETS) + list(ALIASES)
    parser = argparse.ArgumentParser(prog="slimtune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("params", help="count trainable parameters; builds the model on the meta device")
    p.add_argument("--model", default=DEFAULT_MODEL, help=f"one of {shipped_configs()} or a config.json path")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    for q, fn in ((p, cmd_params), (sub.add_parser("new", help="write a freshly initialised adapter"), cmd_new)):
        q.add_argument("--method", default="lora", help=f"one of {methods}")
        q.add_argument("--config", help="an adapter config file (YAML or JSON) instead of --method")
        add_config_flags(q)
        q.set_defaults(fn=fn)
    sub.choices["new"].add_argument("--model", default=DEFAULT_MODEL)
    sub.choices["new"].add_argument("--out", required=True)
    m = sub.add_parser("merge", help="fold an adapter into its base model and save the result")
    m.add_argument("--model", default=DEFAULT_MODEL)
    m.add_argument("--adapter", required=True)
    m.add_argument("--out", required=True)
    m.set_defaults(fn=cmd_merge)
    c = sub.add_parser("check", help="load the default model and check every method on it end to end")
    c.add_argument("--model", default=DEFAULT_MODEL)
    c.add_argument("--prompt", default="What is the capital of France?")
    c.set_defaults(fn=cmd_check)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except SlimtuneError as e:
        print(f"slimtune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
