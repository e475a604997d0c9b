"""Facts about the layers of a transformers model that adapters wrap: which layers are linear,
their shapes, their weights as (out, in), their kind, and whether they are quantised.

An adapter host (adapters/protocol.py) is transparent here: `adaptable_layers` names a wrapped
layer by the name it had before it was wrapped (`...q_proj`, not `...q_proj.base`), so a second
adapter finds the same targets as the first.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def is_linear(module: nn.Module) -> bool:
    """nn.Linear (quantised subclasses such as bitsandbytes' Linear4bit included) or Conv1D."""
    return isinstance(module, (nn.Linear, Conv1D))


def dims(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of a Linear or Conv1D."""
    if isinstance(module, Conv1D):
        return module.weight.shape[0], module.weight.shape[1]  # Conv1D stores (in, out)
    return module.in_features, module.out_features


def weight_oi(module: nn.Module) -> torch.Tensor:
    """The weight as an (out, in) view, whatever the layer stores."""
    return module.weight.T if isinstance(module, Conv1D) else module.weight


def is_quantized(layer: nn.Module) -> bool:
    """A layer whose weight is stored as integers (bitsandbytes NF4 / int8): it cannot be folded into."""
    w = getattr(layer, "weight", None)
    return w is not None and not torch.is_floating_point(w)


def kind(name: str) -> str:
    """The module kind: its name with layer indices replaced, e.g. model.layers.*.self_attn.q_proj."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def block(name: str) -> str:
    """The transformer block a module belongs to: its name up to the first layer index
    (model.layers.3.self_attn.q_proj -> model.layers.3); the whole name if it has none."""
    m = re.match(r"(.*?\.\d+)(?=\.|$)", name)
    return m.group(1) if m else name


def logical_modules(model: nn.Module):
    """(name, module) of every module as the base model names it: an adapter host stands for
    the layer it wraps, under that layer's name, and its own adapters are not listed."""
    def walk(module: nn.Module, prefix: str):
        module = unhost(module)
        yield prefix, module
        for child_name, child in module.named_children():
            yield from walk(child, f"{prefix}.{child_name}" if prefix else child_name)
    yield from walk(model, "")


def adaptable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every linear layer but the output embedding (the LM head), as in PEFT's all-linear."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = None if head is None else unhost(head)
    return {n: m for n, m in logical_modules(model) if is_linear(m) and m is not head and n}


def unhost(module: nn.Module) -> nn.Module:
    """The module itself, or the base module an adapter host stands for."""
    base = getattr(module, "slimtune_host_base", None)
    return module if base is None else base()


def get_module(model: nn.Module, name: str) -> nn.Module:
    """The base module called `name` (hosts looked through, the way adaptable_layers names it)."""
    module = model
    for part in name.split("."):
        module = getattr(unhost(module), part)
    return unhost(module)
