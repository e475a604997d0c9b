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
import os
import sys
import types
import typing
from pathlib import Path

import yaml

from . import config as C
from .errors import Problem, SlimtuneError
from .models import DEFAULT_MODEL, shipped_configs
from .presets import ALIASES, PRESETS, merge_overrides, preset_config


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
        return (lambda s: s.lower() in ("1", "true", "yes")), "?"
    return (tp if tp in (int, float) else str), None


def add_config_flags(parser: argparse.ArgumentParser, classes=(C.LowRankConfig, C.IA3Config), prefix: str = "",
                     dest: str = "cfg", skip: tuple = ("method", "preset"), aliases: dict | None = None):
    """One flag per config field (nested parts as --A.mode); values left out keep the config's default."""
    aliases = {"r": ["--rank"]} if aliases is None else aliases
    seen = set()
    for cls in classes:
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            name = prefix + f.name
            if name in seen or f.name in skip:
                continue
            seen.add(name)
            tp = hints[f.name]
            if C._is_dataclass_type(tp):
                add_config_flags(parser, (tp,), f"{name}.", dest, skip, aliases)
                continue
            conv, nargs = _flag_type(tp)
            flags = [f"--{name}"] + aliases.get(name, [])
            extra = {"const": True} if nargs == "?" else {}
            parser.add_argument(*flags, dest=f"{dest}:{name}", type=conv, nargs=nargs, default=argparse.SUPPRESS,
                                metavar=f.name.upper(), **extra,
                                help=f"{f.metadata.get('help', '')} [{cls.__name__}]")


def _set(tree: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    for p in parents:
        tree = tree.setdefault(p, {})
    tree[leaf] = value


def _read_config_file(path: str) -> dict:
    text = Path(path).read_text(encoding="utf-8")
    return yaml.safe_load(text) if path.endswith((".yaml", ".yml")) else json.loads(text)


def adapter_config(args: argparse.Namespace) -> C.AdapterConfig:
    """Preset (or --config file), then flags on top; unknown or misplaced keys are errors."""
    overrides: dict = {}
    for key, value in vars(args).items():
        if key.startswith("cfg:"):
            _set(overrides, key[4:], value)
    if getattr(args, "config", None):
        base = C.to_dict(C.config_from_dict(_read_config_file(args.config)))
        return C.config_from_dict(merge_overrides(base, overrides))  # validates too
    return preset_config(args.method, overrides)


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
    slimtune.merge_and_unload(model).save_pretrained(args.out)  # the base is loaded once
    try:
        slimtune.load_tokenizer(args.model).save_pretrained(args.out)
    except (OSError, ValueError):
        pass  # a model directory without a tokenizer
    print(f"wrote merged model to {args.out}")
    return 0


def cmd_check(args) -> int:
    from .check import run_check

    return run_check(args.model, args.prompt)


def _from_args(args, cls, dest: str) -> dict:
    """A config file (--config), then the flags on top, as plain data for `cls`."""
    data = _read_config_file(args.config) if getattr(args, "config", None) else {}
    if not isinstance(data, dict):
        raise SlimtuneError(Problem(f"config file {args.config!r}", "it does not hold a mapping of fields",
                                      f"write `key: value` lines with keys of {cls.__name__}"))
    for key, value in vars(args).items():
        if key.startswith(dest + ":"):
            _set(data, key[len(dest) + 1:], value)
        elif key.startswith("cfg:"):  # adapter flags (--adapter.r, --rank) go under `adapter`
            _set(data, key[4:], value)
    return data


def train_config_from_args(args) -> C.TrainConfig:
    from .train import train_config

    return train_config(_from_args(args, C.TrainConfig, "train"))  # the adapter part too, before any loading


def cmd_train(args) -> int:
    from .job import run_training
    from .parallel import shutdown
    from .train import Interrupted

    cfg = train_config_from_args(args)
    try:
        s = run_training(cfg)
    except Interrupted as e:
        print(f"slimtune: {e}", file=sys.stderr)
        return 130
    finally:
        shutdown()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if "after" in s:
        b, a = s["before"], s["after"]
        print(f"\nmethod {cfg.method}: {s['trainable']:,} trainable parameters "
              f"({100 * s['trainable'] / s['base']:.3f} % of {s['base']:,}), {s['steps']} steps in {s['train_seconds']:.0f} s")
        print(f"{'':>16} {'before':>8} {'after':>8}")
        for key in ("loss", "exact_match", "rouge_l"):
            if key in a:
                print(f"{key:>16} {b[key]:8.3f} {a[key]:8.3f}")
        print(f"adapter: {Path(cfg.out) / 'adapter'}   curves: {Path(cfg.out) / 'loss.png'}")
    return 0


def cmd_eval(args) -> int:
    from .evaljob import run_eval

    cfg = C.from_dict(C.EvalConfig, _from_args(args, C.EvalConfig, "eval"))
    s = run_eval(cfg)
    for k, v in s.items():
        print(f"{k:>18}  {v:.4f}" if isinstance(v, float) else f"{k:>18}  {v}")
    print(f"{'per-example':>18}  {cfg.out}")
    return 0


def cmd_generate(args) -> int:
    import slimtune
    from .data import Example
    from .evaluate import generate

    model = slimtune.load_model(args.model)
    if args.adapter:
        slimtune.load_adapter(model, args.adapter)
    tok = slimtune.load_tokenizer(args.model)
    prompts = list(args.prompt or []) + ([line for line in Path(args.file).read_text().splitlines() if line.strip()]
                                         if args.file else [])
    if not prompts:
        raise SlimtuneError(Problem("no prompt", "nothing to generate from", "pass --prompt TEXT or --file FILE"))
    examples = [Example([{"role": "user", "content": p}], "") for p in prompts]
    outs = generate(model, tok, examples, args.template, args.max_new_tokens, 16, args.sample, args.temperature,
                    args.top_p, args.seed)
    for p, o in zip(prompts, outs):
        print(json.dumps({"prompt": p, "response": o}, ensure_ascii=False) if args.jsonl else f"> {p}\n{o}\n")
    return 0


def cmd_demo_data(args) -> int:
    from .demo import demo_split

    train, evals = demo_split(args.train, args.eval)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(train)} + {len(evals)} rows to {out}")
    return 0


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
    t = sub.add_parser("train", help="fine-tune (defaults: LoRA on SmolLM2-135M with the demo data)")
    t.add_argument("--config", help="a YAML/JSON file of TrainConfig fields; flags override it")
    add_config_flags(t, (C.TrainConfig,), dest="train", skip=("adapter",), aliases={})
    add_config_flags(t, (C.LowRankConfig, C.IA3Config), prefix="adapter.", aliases={"adapter.r": ["--rank"]})
    t.set_defaults(fn=cmd_train)
    e = sub.add_parser("eval", help="loss, generation, ROUGE-L, exact match and judge scores")
    e.add_argument("--config", help="a YAML/JSON file of EvalConfig fields; flags override it")
    add_config_flags(e, (C.EvalConfig,), dest="eval", skip=(), aliases={})
    e.set_defaults(fn=cmd_eval)
    g = sub.add_parser("generate", help="generate with a base model and any adapter directory")
    g.add_argument("--model", default=DEFAULT_MODEL)
    g.add_argument("--adapter")
    g.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    g.add_argument("--file", help="a file with one prompt per line")
    g.add_argument("--template", default="chat")
    g.add_argument("--max_new_tokens", type=int, default=128)
    g.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    g.add_argument("--temperature", type=float, default=0.7)
    g.add_argument("--top_p", type=float, default=0.9)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--jsonl", action="store_true", help="print one JSON line per prompt")
    g.set_defaults(fn=cmd_generate)
    d = sub.add_parser("demo-data", help="write the built-in demo data as JSONL")
    d.add_argument("--out", required=True)
    d.add_argument("--train", type=int, default=2000)
    d.add_argument("--eval", type=int, default=100)
    d.set_defaults(fn=cmd_demo_data)
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
