"""Everything `slimtune train` does, as one typed config: a YAML file and the command-line
flags fill the same object (`train_config`), and the checkpoint keeps it for resuming."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..adapters.registry import AdapterConfig, is_method, preset, preset_config, unknown_method
from ..configs import at_least, choice, field, from_dict
from ..data.templates import TEMPLATES
from ..models.gist import check_gist
from ..errors import Problems, SlimtuneError

PRECISIONS = ("fp32", "bf16", "auto")  # a training run's precision

# What may change when a run resumes: how it reports and how long it runs, not what it computes.
RESUMABLE = ("steps", "epochs", "out", "resume", "allow_config_change", "save_every", "keep_checkpoints",
             "eval_every", "log_every", "eval_generate", "max_new_tokens", "progress", "device", "keep_freed_memory",
             "jobs")


@dataclass
class TrainConfig:
    """Everything `slimtune train` does; a YAML file and the command-line flags fill the same object."""

    model: str = field("smollm2-135m", "base model: 'smollm2-135m', a local directory, or a hub name")
    method: str = field("lora", "adapter preset (lora, vera, tied-lora, tied-lora-ba, tied-lora-paper, ia3, or a "
                        "paper alias)")
    adapter: AdapterConfig | None = field(None, "the adapter: the preset named by `method` with these fields "
                                          "overridden, e.g. {r: 16, targets: [q_proj, v_proj]}")
    init_adapter: str | None = field(None, "start from this saved adapter directory instead of a fresh one")
    data: list[str] = field(["demo"], "training data: .json/.jsonl files, 'demo' (built in), or a hub dataset name")
    val_data: list[str] = field([], "held-out files; empty = hold out val_fraction of the training rows")
    val_fraction: float = field(0.05, "share of the training rows held out when val_data is empty")
    demo_rows: int = field(1200, "rows of built-in demo data to generate for training (150 steps of 8 by default)")
    template: str = field("chat", "chat (the tokenizer's template) | alpaca | gist (the default with --gist)")
    gist: int = field(0, "k gist tokens between instruction and input (Mu et al. 2023), trained with the adapter; "
                      "0 = no gisting")
    gist_condition: str = field("gist", "gist (the gist mask) | pos_control (plain causal) | neg_control (nothing "
                                "up to the last gist visible after it)")
    max_len: int = field(256, "longest example in tokens (prompt cut from the left first)")
    truncation: str = field("prompt", "prompt (cut the prompt, then the response, counting cuts) | error")
    packing: bool = field(False, "concatenate examples into rows of max_len tokens, masked apart")
    on_bad_rows: str = field("error", "error (stop, listing every bad row) | skip (train on the valid rows)")
    batch_size: int = field(8, "examples per micro-batch and process")
    grad_accum: int = field(1, "micro-batches per optimiser step")
    steps: int = field(0, "optimiser steps; 0 = run `epochs` epochs")
    epochs: float = field(1.0, "passes over the data when steps = 0")
    lr: float | None = field(None, "learning rate of adapter matrices; null = 1e-3")
    lr_vectors: float | None = field(None, "learning rate of adapter vectors (VeRA d/b, Tied-LoRA u/v, (IA)3); "
                                     "null = 1e-2")
    lr_router: float | None = field(None, "learning rate of routers (mixtures); null = the matrices' rate")
    lr_embedding: float | None = field(None, "learning rate of trained embedding rows (gist tokens); null = 1e-3")
    weight_decay: float = field(0.0, "AdamW weight decay on adapter matrices")
    weight_decay_vectors: float = field(0.0, "AdamW weight decay on adapter vectors (0: vectors scale, "
                                        "and decay would pull them to 0 rather than to their init)")
    weight_decay_router: float = field(0.0, "AdamW weight decay on routers")
    weight_decay_embedding: float = field(0.0, "AdamW weight decay on trained embedding rows")
    schedule: str = field("cosine", "constant | cosine (both after a linear warm-up)")
    warmup_steps: int = field(10, "linear warm-up steps")
    max_grad_norm: float = field(1.0, "clip the gradient norm to this; 0 = no clipping")
    precision: str = field("auto", "fp32 | bf16 (autocast) | auto (bf16 on a GPU that has it, else fp32)")
    grad_checkpointing: bool = field(False, "recompute activations in the backward to save memory")
    parallel: str = field("ddp", "under torchrun: ddp (replicate the base) | fsdp (FSDP2 fully_shard: shard it)")
    quantize: str = field("none", "none | nf4 | int8: freeze a bitsandbytes-quantised base")
    device: str = field("auto", "auto | cpu | cuda | cuda:N")
    keep_freed_memory: bool = field(True, "CPU: keep freed blocks in the process for the next step (glibc mallopt) "
                                    "instead of returning them to the OS and faulting them back in")
    seed: int = field(0, "seed of the adapter init, the shuffling and dropout")
    out: str = field("runs/slimtune", "output directory: adapter, checkpoints, metrics.jsonl, loss.png")
    save_every: int = field(100, "write a checkpoint every N steps (and at the end); 0 = only at the end")
    keep_checkpoints: int = field(2, "how many checkpoints to keep")
    eval_every: int = field(25, "validation loss every N steps (and before and after); 0 = before and after only")
    log_every: int = field(5, "write a metrics line every N steps")
    resume: bool = field(False, "continue from the newest checkpoint in `out`")
    allow_config_change: bool = field(False, "resume even though settings other than length and reporting "
                                      "changed (they are listed)")
    eval_generate: int = field(100, "held-out examples generated and scored before and after training; 0 = none")
    max_new_tokens: int = field(48, "generation length for the before/after evaluation")
    progress: bool = field(True, "show a progress bar")
    jobs: str | None = field(None, "a YAML file of jobs (`jobs:`, a list of mappings of these fields) trained "
                             "together over one base model in one process; the flags set what they share")

    def __post_init__(self):
        if self.gist and self.template == "chat":  # the gist template is the one that places the gists
            self.template = "gist"
        if self.adapter is None:  # the preset, as named
            self.adapter = preset(self.method)
        elif isinstance(self.adapter, dict):  # overrides of the preset, as plain data (Python callers)
            self.adapter = preset_config(self.method, self.adapter)

    def problems(self, p: Problems) -> None:
        for name, allowed in (("schedule", ("constant", "cosine")), ("precision", PRECISIONS),
                              ("template", TEMPLATES), ("truncation", ("prompt", "error")),
                              ("on_bad_rows", ("error", "skip")), ("quantize", ("none", "nf4", "int8")),
                              ("parallel", ("ddp", "fsdp"))):
            choice(p, name, getattr(self, name), allowed)
        for name in ("batch_size", "grad_accum", "max_len", "log_every"):
            at_least(p, name, getattr(self, name), 1)
        for name in ("warmup_steps", "save_every", "eval_every", "eval_generate", "demo_rows"):
            at_least(p, name, getattr(self, name), 0)
        at_least(p, "keep_checkpoints", self.keep_checkpoints, 1)
        if self.steps < 0 or self.epochs <= 0:
            p.add(f"steps={self.steps}, epochs={self.epochs}", "nothing to train", "give steps > 0 or epochs > 0")
        for name in ("lr", "lr_vectors", "lr_router", "lr_embedding"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                p.add(f"{name}={value!r}", "a learning rate must be positive", "give a value > 0 or null")
        for name in ("weight_decay", "weight_decay_vectors", "weight_decay_router", "weight_decay_embedding",
                     "max_grad_norm"):
            at_least(p, name, getattr(self, name), 0)
        if self.gist:
            check_gist(self.gist, self.gist_condition, p)
            if self.template != "gist":
                p.add(f"template={self.template!r} with gist={self.gist}", "only the gist template places gist "
                      "tokens", "use --template gist (the default with --gist)")
        elif self.template == "gist" and not (self.init_adapter):
            p.add("template='gist' with gist=0", "the gist template places gist tokens, and none are added",
                  "pass --gist 1 (k gist tokens), or use another template")
        if not 0 <= self.val_fraction < 1:
            p.add(f"val_fraction={self.val_fraction}", "a share of the rows in [0, 1)", "give e.g. 0.05")


def train_config(data: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from plain data (a YAML file, flags): `adapter` holds overrides of the
    preset `method` names. Unknown keys, bad values and a bad adapter section are reported
    together."""
    p = Problems("invalid training config")
    data = dict(data) if isinstance(data, dict) else {}
    overrides = data.pop("adapter", None)
    method_ok = is_method(data.get("method", "lora"))
    if not method_ok:
        p.items += unknown_method(str(data.pop("method"))).problems
    cfg = from_dict(TrainConfig, data, p)
    if overrides is not None and not isinstance(overrides, dict):
        p.add(f"adapter={overrides!r}", "expected a mapping of adapter fields", "write e.g. adapter: {r: 16}")
        overrides = None
    if method_ok:
        try:
            cfg.adapter = preset_config(cfg.method, overrides or {})
        except SlimtuneError as e:
            p.items += [dataclasses.replace(x, what=f"adapter: {x.what}") for x in e.problems]
    p.raise_if_any()
    return cfg
