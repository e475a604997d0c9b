"""The `slimtune` command line. Every command's flags are generated from its typed config.

    slimtune train  [--method vera] [--config run.yaml] [--adapter.r 16] ...
    slimtune eval   --adapter runs/slimtune/adapter
    slimtune generate --adapter DIR --prompt "..."
    slimtune gist compress --adapter DIR --instruction "..." --out gist.safetensors
    slimtune generate --adapter DIR --gist gist.safetensors --input "..." --input "..."
    slimtune params --model llama-2-7b --method vera --rank 256
    slimtune new    --model DIR --method lora --r 16 --out adapter/
    slimtune export --adapter DIR --format peft-lora|peft|merged --out OUT
    slimtune serve  --adapter support=runs/support/adapter   # OpenAI-compatible, 127.0.0.1:8000
    slimtune check                      # the core on the default model, end to end
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
from pathlib import Path

from ..adapters.helpers import count_parameters
from ..adapters.inject import add_adapter
from ..adapters.pesc import PESCConfig
from ..adapters.registry import config_classes, config_from_dict, is_method, method_names, preset, preset_config
from ..configs import from_dict, merge_overrides, to_dict
from ..data.demo import demo_split
from ..data.tasks import gist_task_splits
from ..errors import Problems, SlimtuneError
from ..eval.config import EvalConfig, GenerateConfig
from ..formats.adapter import save_adapter
from ..models.load import build_on_meta, load_model, shipped_configs
from ..recipes.check import run_check
from ..recipes.evaluate import run_eval
from ..recipes.export import run_export, run_upcycle
from ..recipes.generate import print_answers, run_generate
from ..recipes.gist import run_compress, run_gist_generate
from ..serve.config import ServeConfig
from ..serve.server import run_server
from ..recipes.study import StudyConfig, run_study, study_config, study_failures
from ..recipes.jobs import job_configs, run_jobs
from ..recipes.train import run_training
from ..train.config import TrainConfig, train_config
from ..train.loop import Interrupted
from ..train.parallel import shutdown
from .commands import (CheckConfig, DemoDataConfig, ExportConfig, GistCompressConfig, GistTasksConfig, NewConfig,
                       ParamsConfig, UpcycleConfig)
from .flags import (add_config_flags, flag_values, join_negative_numbers, masked_values, read_config_file,
                    unknown_flags_message)

ADAPTER_ALIASES = {"r": ["--rank"]}


def _config(args, cls, dest: str = "cmd"):
    """A command's config: its --config file (where the command takes one), then its flags."""
    data = read_config_file(args.config) if getattr(args, "file_config", False) and args.config else {}
    flags = flag_values(args, dest)
    p = Problems(f"invalid {cls.__name__}")
    masked_values(cls, data, flags, p)
    cfg = from_dict(cls, merge_overrides(data, flags), p)
    p.raise_if_any()
    return cfg


def adapter_config(args, method: str, config_file: str | None):
    """Preset (or an adapter config file), then the adapter flags on top."""
    overrides = flag_values(args, "adapter")
    if config_file:
        p = Problems("invalid adapter config")
        base = to_dict(config_from_dict(read_config_file(config_file), p))
        return config_from_dict(merge_overrides(base, overrides))
    return preset_config(method, overrides)


def cmd_params(args) -> int:
    cfg = _config(args, ParamsConfig)
    model = build_on_meta(cfg.model)
    adapter = adapter_config(args, cfg.method, cfg.config)
    add_adapter(model, adapter)
    count = count_parameters(model)
    if cfg.json:
        print(json.dumps({"model": cfg.model, "method": adapter.preset, "trainable": count.trainable,
                          "shared_frozen": count.shared_frozen, "base": count.base}))
        return 0
    rows = [("model", cfg.model), ("method", f"{adapter.preset} ({adapter.method})"),
            ("rank", str(getattr(adapter, "r", "-"))), ("trainable", f"{count.trainable:,}"),
            ("shared frozen", f"{count.shared_frozen:,}"), ("base model", f"{count.base:,}"),
            ("trainable / base", f"{100 * count.share:.4f} %")]
    print("\n".join(f"{k:>17}  {v}" for k, v in rows))
    return 0


def cmd_new(args) -> int:
    cfg = _config(args, NewConfig)
    adapter = adapter_config(args, cfg.method, cfg.config)
    model = add_adapter(load_model(cfg.model), adapter)
    save_adapter(model, cfg.out)
    print(f"wrote {cfg.out} ({count_parameters(model)})")
    return 0


def cmd_export(args, fmt: str | None = None) -> int:
    cfg = _config(args, ExportConfig)
    out = run_export(cfg.model, cfg.adapter, cfg.out, fmt or cfg.format)
    print(f"wrote {fmt or cfg.format} export to {out}")
    return 0


def cmd_upcycle(args) -> int:
    cfg = _config(args, UpcycleConfig)
    pesc = preset_config("pesc", flag_values(args, "adapter"))
    out = run_upcycle(cfg.model, cfg.adapter, cfg.out, pesc)
    print(f"wrote the upcycled model to {out}; load it with "
          f"AutoModelForCausalLM.from_pretrained({str(out)!r}, trust_remote_code=True), which runs the "
          f"modelling code written there: {out / 'modeling_slimtune_pesc.py'} (read it first)")
    return 0


def cmd_check(args) -> int:
    cfg = _config(args, CheckConfig)
    return run_check(cfg.model, cfg.prompt)


def cmd_train(args) -> int:
    file = read_config_file(args.config) if args.config else {}
    flags, overrides = flag_values(args, "cmd"), flag_values(args, "adapter")
    data = merge_overrides(file, flags)
    if overrides:
        data["adapter"] = merge_overrides(data.get("adapter") or {}, overrides)
    p = Problems("invalid training config")
    masked_values(TrainConfig, file, flags, p)
    if overrides and isinstance(file.get("adapter"), dict) and is_method(data.get("method", "lora")):
        masked_values(type(preset(data.get("method", "lora"))), file["adapter"], overrides, p, "adapter.")
    try:
        cfg = train_config(data)  # the adapter part too, before any loading
    except SlimtuneError as e:
        p.items += e.problems
    p.raise_if_any()
    if cfg.jobs:
        cfgs, names = job_configs({k: v for k, v in data.items() if k != "jobs"}, read_config_file(cfg.jobs, "--jobs"))
        report = run_jobs(cfgs, names, progress=cfg.progress)
        for name, c in zip(names, cfgs):
            if name in report.finished:
                print(f"{name}: adapter {Path(c.out) / 'adapter'}")
        return 0
    try:
        s = run_training(cfg)
    finally:
        shutdown()
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    if "after" in s:
        b, a = s["before"], s["after"]
        print(f"\nmethod {cfg.method}: {s['trainable']:,} trainable parameters "
              f"({100 * s['trainable'] / s['base']:.3f} % of {s['base']:,}), {s['steps']} steps in "
              f"{s['train_seconds']:.0f} s")
        print(f"{'':>16} {'before':>8} {'after':>8}")
        for key in ("loss", "exact_match", "rouge_l"):
            if key in a:
                print(f"{key:>16} {b[key]:8.3f} {a[key]:8.3f}")
        print(f"adapter: {Path(cfg.out) / 'adapter'}   curves: {Path(cfg.out) / 'loss.png'}")
    return 0


def cmd_eval(args) -> int:
    cfg = _config(args, EvalConfig)
    s = run_eval(cfg)
    for k, v in s.items():
        print(f"{k:>18}  {v:.4f}" if isinstance(v, float) else f"{k:>18}  {v}")
    print(f"{'per-example':>18}  {cfg.out}")
    return 0


def cmd_generate(args) -> int:
    cfg = _config(args, GenerateConfig)
    if cfg.gist:
        answers = run_gist_generate(cfg.model, cfg.adapter, cfg.gist, cfg.input, cfg.max_new_tokens, cfg.batch_size,
                                    cfg.device)
        for a in answers:
            print(json.dumps(a, ensure_ascii=False) if cfg.jsonl else f"> {a['input']}\n{a['response']}\n")
        return 0
    print_answers(run_generate(cfg), cfg.jsonl)
    return 0


def cmd_serve(args) -> int:
    cfg = _config(args, ServeConfig)
    run_server(cfg)
    return 0


def cmd_gist_compress(args) -> int:
    cfg = _config(args, GistCompressConfig)
    cache = run_compress(cfg.model, cfg.adapter, cfg.instruction, cfg.out, cfg.device)
    print(f"wrote {cfg.out}: {cache.instruction_tokens} instruction tokens in {cache.num} gist token(s), "
          f"compression {cache.compression:.1f}x; cache {cache.nbytes:,} bytes, {cache.bytes_saved():,} bytes "
          "fewer than the instruction's own")
    return 0


def cmd_study(args) -> int:
    path = args.config_file or args.config
    file = read_config_file(path) if path else {}
    flags = flag_values(args, "cmd")
    p = Problems("invalid study config")
    masked_values(StudyConfig, file, flags, p)
    p.raise_if_any()
    cfg = study_config(merge_overrides(file, flags))
    page = run_study(cfg)
    print(f"wrote {page}")
    failed = study_failures(cfg)
    if failed:
        print(f"slimtune study: {len(failed)} stages failed, e.g. {failed[0]}; they are listed on the page. "
              "Fix the cause, then `slimtune study --retry_failed true` runs them again", file=sys.stderr)
        return 1
    return 0


def cmd_demo_data(args) -> int:
    cfg = _config(args, DemoDataConfig)
    train, evals = demo_split(cfg.train, cfg.eval)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in (("train.jsonl", train), ("eval.jsonl", evals)):
        (out / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(train)} + {len(evals)} rows to {out}")
    return 0


def cmd_gist_tasks(args) -> int:
    cfg = _config(args, GistTasksConfig)  # refuses to overwrite split files unless --overwrite
    splits = gist_task_splits(cfg.seed, cfg.train, cfg.eval)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in splits.items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {', '.join(f'{len(rows)} {name}' for name, rows in splits.items())} rows to {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="slimtune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    methods = f"adapter preset: one of {method_names()}"

    def command(name: str, cls, fn, help: str, adapter: bool | tuple = False, adapter_prefix: str = "",
                config_file: str | None = None):
        p = sub.add_parser(name, help=help, description=help)
        if config_file:
            p.add_argument("--config", help=config_file)
        add_config_flags(p, (cls,), dest="cmd", skip=("config",) if config_file else ())
        if adapter:
            add_config_flags(p, adapter if isinstance(adapter, tuple) else config_classes(), dest="adapter", skip=("method", "preset"), aliases={"r": ["--rank"]},
                             flag_prefix=adapter_prefix)
        p.set_defaults(fn=fn, file_config=config_file is not None and cls is not ParamsConfig and cls is not NewConfig)
        return p

    command("train", TrainConfig, cmd_train, "fine-tune (defaults: LoRA on SmolLM2-135M with the demo data)",
            adapter=True, adapter_prefix="adapter.", config_file="a YAML/JSON file of TrainConfig fields; flags override it")
    command("eval", EvalConfig, cmd_eval, "loss, generation, ROUGE-L, exact match and judge scores",
            config_file="a YAML/JSON file of EvalConfig fields; flags override it")
    command("generate", GenerateConfig, cmd_generate, "generate with a base model and any adapter directory",
            config_file="a YAML/JSON file of GenerateConfig fields; flags override it")
    command("params", ParamsConfig, cmd_params, "count trainable parameters; builds the model on the meta device "
            f"(models: {shipped_configs()} or a config.json path)", adapter=True)
    command("new", NewConfig, cmd_new, "write a freshly initialised adapter", adapter=True)
    command("export", ExportConfig, cmd_export, "export an adapter: its exact plain-LoRA equivalent (peft-lora), "
            "PEFT's own format (peft), or a merged transformers model (merged)")
    command("merge", ExportConfig, lambda a: cmd_export(a, "merged"),
            "fold an adapter into its base model and save the result (export --format merged)")
    command("upcycle", UpcycleConfig, cmd_upcycle, "PESC: upcycle a dense model into a mixture of adapter experts "
            "and write it as a standalone transformers directory (LoRA merged)", adapter=(PESCConfig,))
    command("check", CheckConfig, cmd_check, "load the default model and check every method on it end to end")
    study = sub.add_parser("study", help=StudyConfig.__doc__, description=StudyConfig.__doc__)
    study.add_argument("config_file", nargs="?", metavar="CONFIG", help="a YAML/JSON file of StudyConfig fields "
                       "(grid: a list of {name, method, adapter, lr, lr_vectors}); flags override it")
    study.add_argument("--config", help="the same file, as a flag")
    add_config_flags(study, (StudyConfig,), dest="cmd", skip=("grid",))
    study.set_defaults(fn=cmd_study, file_config=False)
    command("demo-data", DemoDataConfig, cmd_demo_data, "write the built-in demo data as JSONL")
    command("serve", ServeConfig, cmd_serve, "an OpenAI-compatible server (/v1/completions, /v1/chat/completions, "
            "streaming) for the base model and any number of adapters, in one continuous batch")
    command("gist-tasks", GistTasksConfig, cmd_gist_tasks, "write the gist task family's splits as JSONL")
    gist = sub.add_parser("gist", help="gist caches: compress an instruction into its gist tokens' keys and values",
                          description="gist caches: compress an instruction into its gist tokens' keys and values")
    gist_sub = gist.add_subparsers(dest="gist_command", required=True)
    compress = gist_sub.add_parser("compress", help=GistCompressConfig.__doc__, description=GistCompressConfig.__doc__)
    add_config_flags(compress, (GistCompressConfig,), dest="cmd")
    compress.set_defaults(fn=cmd_gist_compress, file_config=False)
    for name in ("params", "new"):
        for action in sub.choices[name]._actions:
            if action.dest == "cmd:method":
                action.help = methods
    return parser


def _command_parser(parser: argparse.ArgumentParser, args) -> argparse.ArgumentParser:
    """The (sub)parser of the command given: its flags are the ones a typo is compared with."""
    for dest in ("command", "gist_command"):
        sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
        if sub is None or getattr(args, dest, None) not in sub.choices:
            break
        parser = sub.choices[getattr(args, dest)]
    return parser


def _interrupt_on_sigterm() -> None:
    """SIGTERM (`kill`, a scheduler's preemption, a background job's stop) ends a command as
    Ctrl-C does: a training run writes its checkpoint first. A background process started by a
    shell without job control ignores SIGINT, so SIGTERM is the way to stop one cleanly."""
    def handler(signum, frame):
        raise KeyboardInterrupt("stopped by SIGTERM")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def main(argv: list[str] | None = None) -> int:
    _interrupt_on_sigterm()
    parser = build_parser()
    args, extras = parser.parse_known_args(join_negative_numbers(sys.argv[1:] if argv is None else list(argv)))
    if extras:
        command = _command_parser(parser, args)
        command.error(unknown_flags_message(command, extras))
    try:
        return args.fn(args)
    except SlimtuneError as e:
        print(f"slimtune: error: {e}", file=sys.stderr)
        return 2
    except (Interrupted, KeyboardInterrupt) as e:
        print(f"slimtune: {str(e) or 'interrupted'}", file=sys.stderr)
        return 130
    except OSError as e:  # a file the command could not write or read: the system's own words
        print(f"slimtune: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
