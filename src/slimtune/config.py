"""Typed adapter configs: the single source of truth for the API, the files and the CLI.

Every field carries its help text in `metadata["help"]`; `from_dict` rejects unknown keys
and reports every problem at once.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

from .errors import Problems, SlimtuneError, did_you_mean

MODES = ("absent", "trained", "tied", "random", "frozen")
INITS = ("zeros", "ones", "kaiming_uniform", "he_uniform", "normal")


def _f(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)) or dataclasses.is_dataclass(default):
        return field(default_factory=lambda d=default: _copy(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


def _copy(x: Any) -> Any:
    return dataclasses.replace(x) if dataclasses.is_dataclass(x) else type(x)(x)


@dataclass
class Part:
    """One factor of h = W0 x + s * diag(b) B diag(d) A x."""

    mode: str = _f("absent", "absent (identity) | trained (per layer) | tied (shared, trained) | "
                   "random (shared, frozen, regenerated from the seed) | frozen (per layer, frozen at init)")
    init: Union[str, float] = _f("zeros", "zeros | ones | kaiming_uniform (nn.Linear default, bound 1/sqrt(fan_in); LoRA) | "
                        "he_uniform (bound sqrt(6/fan_in); VeRA) | normal (std 0.02) | a number")
    share: str = _f("kind", "for tied/random: 'kind' = one tensor per module kind (all q_proj share one), "
                    "'model' = one tensor for every targeted layer, sized to the largest and sliced")


@dataclass
class LowRankConfig:
    """The low-rank family h = W0 x + s * diag(b) B diag(d) A x (LoRA, VeRA, Tied-LoRA)."""

    method: Literal["lowrank"] = _f("lowrank", "adapter family")
    preset: str = _f("custom", "the preset this config came from (informational)")
    r: int = _f(8, "rank r of A (r x in) and B (out x r)")
    alpha: float | None = _f(16.0, "scale s = alpha / r; null gives s = 1")
    A: Part = _f(Part("trained", "kaiming_uniform"), "the down-projection A (r x in)")
    B: Part = _f(Part("trained", "zeros"), "the up-projection B (out x r)")
    d: Part = _f(Part("absent", "ones"), "the r-vector scaling A x (VeRA's d, Tied-LoRA's u)")
    b: Part = _f(Part("absent", "ones"), "the out-vector scaling B (.) (VeRA's b, Tied-LoRA's v)")
    targets: list[str] = _f(["all-linear"], "module-name patterns; 'all-linear' = every linear layer but the LM head")
    dropout: float = _f(0.0, "dropout on the adapter's input x")
    seed: int = _f(0, "seed of the random and frozen tensors (regenerated from it on load)")
    save_frozen: bool = _f(False, "also save frozen tensors instead of regenerating them from the seed")

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.r


@dataclass
class IA3Config:
    """(IA)^3: learned vectors scale the keys, the values and the FFN intermediate."""

    method: Literal["ia3"] = _f("ia3", "adapter family")
    preset: str = _f("ia3", "the preset this config came from (informational)")
    scale_outputs: list[str] | None = _f(None, "patterns whose outputs are scaled; null = the architecture's k and v")
    scale_inputs: list[str] | None = _f(None, "patterns whose inputs are scaled; null = the FFN down projection")
    init: float = _f(1.0, "initial value of every vector (1 = the base model)")


AdapterConfig = Union[LowRankConfig, IA3Config]
CONFIG_CLASSES: dict[str, type] = {"lowrank": LowRankConfig, "ia3": IA3Config}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def _check_type(value: Any, tp: Any) -> bool:
    """A small runtime check of JSON/YAML values against a field annotation."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin in (Union, types.UnionType):
        return any(_check_type(value, a) for a in typing.get_args(tp))
    if origin is Literal:
        return value in typing.get_args(tp)
    if origin is list:
        (inner,) = typing.get_args(tp)
        return isinstance(value, list) and all(_check_type(v, inner) for v in value)
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, tp)


def from_dict(cls: type, data: dict, problems: Problems | None = None, where: str = "") -> Any:
    """Build dataclass `cls` from plain data; unknown keys and wrong types are errors."""
    own = problems is None
    problems = problems or Problems(f"invalid {cls.__name__}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs: dict[str, Any] = {}
    if not isinstance(data, dict):
        problems.add(f"{where or cls.__name__}={data!r}", "expected a mapping of fields", f"use keys from {names}")
        data = {}
    for key, value in data.items():
        path = f"{where}{key}"
        if key not in names:
            problems.add(f"key {path!r}", f"{cls.__name__} has no such field{did_you_mean(key, names)}",
                         f"remove it or use one of {names}")
            continue
        tp = hints[key]
        if _is_dataclass_type(tp):
            kwargs[key] = from_dict(tp, value, problems, f"{path}.")
        elif _check_type(value, tp):
            kwargs[key] = value
        else:
            name = tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")
            problems.add(f"{path}={value!r}", f"expected a value of type {name}", "give a value of that type")
    if own:
        problems.raise_if_any()
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def config_from_dict(data: dict) -> AdapterConfig:
    """Dispatch on `method`; see `from_dict`."""
    method = data.get("method", "lowrank") if isinstance(data, dict) else None
    if method not in CONFIG_CLASSES:
        p = Problems("invalid adapter config")
        p.add(f"method={method!r}", "unknown adapter family" + did_you_mean(str(method), CONFIG_CLASSES),
              f"use one of {list(CONFIG_CLASSES)}, or a preset name via slimtune.preset()")
        p.raise_if_any()
    from .presets import validate  # presets imports this module

    problems = Problems("invalid adapter config")
    cfg = from_dict(CONFIG_CLASSES[method], data, problems)  # fields with bad values keep their defaults
    try:
        validate(cfg)
    except SlimtuneError as e:  # report value problems together with the key and type problems
        problems.items.extend(e.problems)
    problems.raise_if_any()
    return cfg


@dataclass
class TrainConfig:
    """Everything `slimtune train` does; a YAML file and the command-line flags fill the same object."""

    model: str = _f("smollm2-135m", "base model: 'smollm2-135m', a local directory, or a hub name")
    method: str = _f("lora", "adapter preset (lora, vera, tied-lora, tied-lora-ba, ia3, or a paper alias)")
    adapter: dict = _f({}, "overrides of the preset's adapter config, e.g. {r: 16, targets: [q_proj, v_proj]}")
    init_adapter: str | None = _f(None, "start from this saved adapter directory instead of a fresh one")
    data: list[str] = _f(["demo"], "training data: .json/.jsonl files, 'demo' (built in), or a hub dataset name")
    val_data: list[str] = _f([], "held-out files; empty = hold out val_fraction of the training rows")
    val_fraction: float = _f(0.05, "share of the training rows held out when val_data is empty")
    demo_rows: int = _f(1200, "rows of built-in demo data to generate for training (150 steps of 8 by default)")
    template: str = _f("chat", "chat (the tokenizer's template) | alpaca | gist")
    max_len: int = _f(256, "longest example in tokens (prompt cut from the left first)")
    truncation: str = _f("prompt", "prompt (cut the prompt, then the response, counting cuts) | error")
    packing: bool = _f(False, "concatenate examples into rows of max_len tokens")
    on_bad_rows: str = _f("error", "error (stop, listing every bad row) | skip (train on the valid rows)")
    batch_size: int = _f(8, "examples per micro-batch and process")
    grad_accum: int = _f(1, "micro-batches per optimiser step")
    steps: int = _f(0, "optimiser steps; 0 = run `epochs` epochs")
    epochs: float = _f(1.0, "passes over the data when steps = 0")
    lr: float | None = _f(None, "learning rate of adapter matrices; null = the method's default")
    lr_vectors: float | None = _f(None, "learning rate of adapter vectors (VeRA d/b, Tied-LoRA u/v, (IA)3); "
                                  "null = the method's default")
    weight_decay: float = _f(0.0, "AdamW weight decay on matrices (never on vectors)")
    schedule: str = _f("cosine", "constant | cosine (both after a linear warm-up)")
    warmup_steps: int = _f(10, "linear warm-up steps")
    max_grad_norm: float = _f(1.0, "clip the gradient norm to this; 0 = no clipping")
    precision: str = _f("auto", "fp32 | bf16 (autocast) | auto (bf16 on a GPU that has it, else fp32)")
    grad_checkpointing: bool = _f(False, "recompute activations in the backward to save memory")
    parallel: str = _f("ddp", "under torchrun: ddp (replicate the base) | fsdp (FSDP2 fully_shard: shard it)")
    quantize: str = _f("none", "none | nf4 | int8: freeze a bitsandbytes-quantised base")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    keep_freed_memory: bool = _f(True, "CPU: keep freed blocks in the process for the next step (glibc "
                                 "mallopt: mmap off, no trim below 2 GiB) instead of returning them to the OS, "
                                 "sparing the page faults of re-touching them (a fifth of a step on SmolLM2); "
                                 "the resident set stays at the step's peak")
    seed: int = _f(0, "seed of the adapter init, the shuffling and dropout")
    out: str = _f("runs/slimtune", "output directory: adapter, checkpoints, metrics.jsonl, loss.png")
    save_every: int = _f(100, "write a checkpoint every N steps (and at the end); 0 = only at the end")
    keep_checkpoints: int = _f(2, "how many checkpoints to keep")
    eval_every: int = _f(25, "validation loss every N steps (and before and after); 0 = before and after only")
    log_every: int = _f(5, "write a metrics line every N steps")
    resume: bool = _f(False, "continue from the newest checkpoint in `out`")
    eval_generate: int = _f(100, "held-out examples generated and scored before and after training; 0 = none")
    max_new_tokens: int = _f(48, "generation length for the before/after evaluation")
    progress: bool = _f(True, "show a progress bar")


@dataclass
class EvalConfig:
    """What `slimtune eval` measures and where it writes."""

    model: str = _f("smollm2-135m", "base model: 'smollm2-135m', a local directory, or a hub name")
    adapter: str | None = _f(None, "adapter directory to evaluate; null = the base model")
    data: list[str] = _f(["demo"], "rows with responses (.json/.jsonl, any training shape), question files "
                         "with 'turns' (vicuna_bench, mt_bench), or 'demo'")
    references: str | None = _f(None, "FastChat reference answers (.jsonl) for question files")
    template: str = _f("chat", "chat | alpaca | gist")
    limit: int = _f(0, "evaluate only the first N rows; 0 = all")
    batch_size: int = _f(16, "generation batch size")
    max_len: int = _f(512, "longest example for the loss, in tokens")
    max_new_tokens: int = _f(128, "longest generated response")
    do_sample: bool = _f(False, "sample instead of greedy decoding")
    temperature: float = _f(0.7, "sampling temperature")
    top_p: float = _f(0.9, "nucleus sampling threshold")
    seed: int = _f(0, "seed of sampling and of the pairwise order")
    quantize: str = _f("none", "none | nf4 | int8")
    device: str = _f("auto", "auto | cpu | cuda | cuda:N")
    out: str = _f("eval.jsonl", "per-example results; the summary goes to OUT with .summary.json")
    judge_url: str | None = _f(None, "OpenAI-compatible base URL of a judge, e.g. http://127.0.0.1:8080/v1")
    judge_model: str = _f("judge", "model name sent to the judge")
    judge_key_env: str = _f("SLIMTUNE_JUDGE_KEY", "environment variable holding the judge's API key")
    pairwise_against: str | None = _f(None, "another eval's JSONL: judge pairwise win rate against its answers")
