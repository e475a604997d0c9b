"""The typed configs of the commands that have no library config of their own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..configs import at_least, choice, field, out_directory
from ..data.tasks import SPLITS
from ..errors import Problems
from ..formats.adapter import CONFIG_NAME, WEIGHTS_NAME
from ..recipes.export import FORMATS

ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME)


@dataclass
class ParamsConfig:
    """`slimtune params`: count an adapter's parameters on the meta device (no weights)."""

    model: str = field("smollm2-135m", "a shipped config name (llama-2-7b, ...) or a config.json path")
    method: str = field("lora", "adapter preset")
    config: str | None = field(None, "an adapter config file (YAML or JSON) instead of --method")
    json: bool = field(False, "print one JSON line")


@dataclass
class NewConfig:
    """`slimtune new`: write a freshly initialised adapter."""

    model: str = field("smollm2-135m", "base model: 'smollm2-135m', a local directory, or a hub name")
    method: str = field("lora", "adapter preset")
    config: str | None = field(None, "an adapter config file (YAML or JSON) instead of --method")
    out: str = field("adapter", "directory to write the adapter to")
    overwrite: bool = field(False, "replace an adapter already in `out` (refused otherwise)")

    def problems(self, p: Problems) -> None:
        out_directory(p, "out", self.out)
        out = Path(self.out)
        if not self.overwrite and out.is_dir() and any((out / n).exists() for n in ADAPTER_FILES):
            p.add(f"out={self.out!r}", "it already holds an adapter, which this would overwrite",
                  "give another directory, or pass --overwrite to replace it")


@dataclass
class ExportConfig:
    """`slimtune export`: an adapter in the form another tool serves."""

    model: str = field("smollm2-135m", "the base model the adapter was trained on")
    adapter: str = field("runs/slimtune/adapter", "the adapter directory (slimtune's or PEFT's format)")
    out: str = field("export", "directory to write")
    format: str = field("peft-lora", "peft-lora (exact plain-LoRA equivalent, for vLLM and other LoRA servers) | "
                        "peft (PEFT's own LoRA, VeRA or IA3) | merged (a standalone transformers model)")

    def problems(self, p: Problems) -> None:
        choice(p, "format", self.format, FORMATS)


@dataclass
class UpcycleConfig:
    """`slimtune upcycle`: a PESC-upcycled model as a standalone transformers directory."""

    model: str = field("smollm2-135m", "the dense base model")
    adapter: str | None = field(None, "a trained PESC adapter; null = upcycle at step 0 (equal to the dense "
                                "model), with the PESC flags given")
    out: str = field("upcycled", "directory to write: loads with AutoModelForCausalLM.from_pretrained("
                     "OUT, trust_remote_code=True)")


@dataclass
class CheckConfig:
    """`slimtune check`: the core's checks for every method on a real model."""

    model: str = field("smollm2-135m", "base model")
    prompt: str = field("What is the capital of France?", "the prompt the checks run on")


@dataclass
class DemoDataConfig:
    """`slimtune demo-data`: the built-in demo data as JSONL."""

    out: str = field("demo", "directory to write train.jsonl and eval.jsonl into")
    train: int = field(2000, "training rows")
    eval: int = field(100, "evaluation rows")

    def problems(self, p: Problems) -> None:
        at_least(p, "train", self.train, 1)
        at_least(p, "eval", self.eval, 1)
        out_directory(p, "out", self.out)


GIST_TASK_FILES = tuple(f"{split}.jsonl" for split in SPLITS)


@dataclass
class GistTasksConfig:
    """`slimtune gist-tasks`: the gist task family (data/tasks.py) as JSONL, one file per split."""

    out: str = field("gist-tasks", "directory to write train.jsonl, seen.jsonl, unseen.jsonl and novel.jsonl into")
    seed: int = field(0, "generation seed: the same seed writes the same rows")
    train: int = field(4000, "training rows")
    eval: int = field(200, "rows in each evaluation split (seen, unseen, novel)")
    overwrite: bool = field(False, "replace split files already in `out` (refused otherwise)")

    def problems(self, p: Problems) -> None:
        at_least(p, "seed", self.seed, 0)
        at_least(p, "train", self.train, 1)
        at_least(p, "eval", self.eval, 1)
        out_directory(p, "out", self.out)
        there = [n for n in GIST_TASK_FILES if (Path(self.out) / n).is_file()]
        if there and not self.overwrite:
            p.add(f"out={self.out!r}", f"it already holds {', '.join(there)}, which this would overwrite",
                  "give another directory, or pass --overwrite to replace them")


@dataclass
class GistCompressConfig:
    """`slimtune gist compress`: an instruction's gist cache, as a small safetensors file."""

    model: str = field("smollm2-135m", "the base model the gist adapter was trained on")
    adapter: str = field("runs/slimtune/adapter", "an adapter trained with gist tokens (slimtune train --gist K)")
    instruction: str = field("", "the instruction to compress")
    out: str = field("gist.safetensors", "the cache file to write")
    device: str = field("auto", "auto | cpu | cuda | cuda:N")

    def problems(self, p: Problems) -> None:
        if not self.instruction.strip():
            p.add("instruction ''", "nothing to compress", "pass --instruction TEXT")
