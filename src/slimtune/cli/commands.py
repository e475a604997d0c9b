"""The typed configs of the commands that have no library config of their own."""

from __future__ import annotations

from dataclasses import dataclass

from ..configs import at_least, choice, field
from ..errors import Problems
from ..recipes.export import FORMATS


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
