"""Which layers an adapter goes on: module-name patterns, layer kinds, architecture tables.

A pattern matches a module whose dotted name equals it, ends with "." + it, or matches
it as a glob (`*.mlp.*`). `all-linear` is every nn.Linear / transformers Conv1D in the
model except the output embedding (the LM head), as in PEFT.
"""

from __future__ import annotations

import fnmatch
import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .errors import Problems

ALL_LINEAR = "all-linear"

# (IA)^3 sites per architecture: (pattern, "output" | "input", span of output features scaled).
# GPT-2 fuses q, k, v into c_attn (out = 3 * hidden); only the k and v thirds are scaled.
_LLAMA_LIKE = [("k_proj", "output", (0.0, 1.0)), ("v_proj", "output", (0.0, 1.0)), ("down_proj", "input", (0.0, 1.0))]
IA3_SITES: dict[str, list[tuple[str, str, tuple[float, float]]]] = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE, "gemma2": _LLAMA_LIKE, "phi3": _LLAMA_LIKE,
    "gpt2": [("attn.c_attn", "output", (1 / 3, 1.0)), ("mlp.c_proj", "input", (0.0, 1.0))],
    "t5": [("k", "output", (0.0, 1.0)), ("v", "output", (0.0, 1.0)), ("wo", "input", (0.0, 1.0))],
}


def is_adaptable(module: nn.Module) -> bool:
    """nn.Linear (quantised subclasses such as bitsandbytes' Linear4bit included) or Conv1D."""
    return isinstance(module, (nn.Linear, Conv1D)) and not hasattr(module, "adapter_params")


def dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]  # Conv1D stores (in, out)
    return module.in_features, module.out_features


def weight_oi(module: nn.Module) -> torch.Tensor:
    """The weight as an (out, in) view, whatever the layer stores."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def kind(name: str) -> str:
    """The module kind: its name with layer indices replaced, e.g. model.layers.*.self_attn.q_proj."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def pattern_matches(pattern: str, name: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def adaptable_layers(model: nn.Module) -> dict[str, nn.Module]:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {n: m for n, m in model.named_modules() if is_adaptable(m) and m is not head}


def match_targets(model: nn.Module, patterns: list[str], what: str = "targets") -> list[str]:
    """Names of the layers the patterns select; a pattern that selects nothing is an error."""
    layers = adaptable_layers(model)
    if not layers:
        p = Problems("no adaptable layers")
        p.add(f"model {type(model).__name__}", "it has no nn.Linear or Conv1D layers", "use a transformer LM")
        p.raise_if_any()
    chosen: dict[str, None] = {}
    problems = Problems(f"invalid {what}")
    leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
    for pat in patterns:
        hits = list(layers) if pat == ALL_LINEAR else [n for n in layers if pattern_matches(pat, n)]
        if not hits:
            problems.add(f"{what} pattern {pat!r}", f"it matches no linear layer of {type(model).__name__}",
                         f"use '{ALL_LINEAR}', one of the layer names {leaves}, or a glob such as "
                         f"'{kind(next(iter(layers))).replace('*', '[0-3]')}'")
        chosen.update(dict.fromkeys(hits))
    problems.raise_if_any()
    return list(chosen)


def ia3_sites(model: nn.Module, outputs: list[str] | None, inputs: list[str] | None):
    """[(name, where, span)] for (IA)^3; None means the architecture's default sites."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    table = IA3_SITES.get(model_type or "")
    if (outputs is None or inputs is None) and table is None:
        p = Problems("(IA)3 needs its sites")
        p.add(f"model_type={model_type!r}", "no default k/v/FFN sites are known for this architecture",
              f"pass scale_outputs=[...] and scale_inputs=[...] (known: {sorted(IA3_SITES)})")
        p.raise_if_any()
    sites: dict[str, tuple[str, tuple[float, float]]] = {}
    groups = [(outputs, "output"), (inputs, "input")]
    for pats, where in groups:
        spec = [(p, (0.0, 1.0)) for p in pats] if pats is not None else [(p, s) for p, w, s in table if w == where]
        for pat, span in spec:
            for name in match_targets(model, [pat], f"(IA)3 {where}s"):
                sites[name] = (where, span)
    return [(n, w, s) for n, (w, s) in sites.items()]
