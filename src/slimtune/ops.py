"""Free helpers on the adapter contract: train, count, disable, merge.

Each reads the declarations `adapter_params()` / `frozen_tensors()` of the modules that
take part (AdapterLayer and SharedTensors); none looks at parameter names.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from .adapters.base import AdapterLayer
from .errors import Problems
from .quantize import is_quantized
from .targets import weight_oi


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) for every module that declares adapter tensors."""
    for name, module in model.named_modules():
        if hasattr(module, "adapter_params"):
            yield name, module


def adapter_layers(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in adapter_modules(model):
        if isinstance(module, AdapterLayer):
            yield name, module


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """Every trained adapter tensor, by its name in the model."""
    return {_join(m, n): p for m, mod in adapter_modules(model) for n, p in mod.adapter_params().items()}


def frozen_adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {_join(m, n): t for m, mod in adapter_modules(model) for n, t in mod.frozen_tensors().items()}


def set_trainable(model: nn.Module) -> list[nn.Parameter]:
    """requires_grad on the declared adapter tensors only; returns them (for the optimiser)."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(trainable_parameters(model).values())
    for p in params:
        p.requires_grad_(True)
    return params


@dataclass(frozen=True)
class ParamCount:
    trainable: int  # trained adapter parameters
    shared_frozen: int  # frozen adapter tensors (VeRA's random pair); regenerated, not saved
    base: int  # parameters of the base model

    @property
    def share(self) -> float:
        """Trainable parameters as a fraction of the base model."""
        return self.trainable / self.base

    def __str__(self) -> str:
        return (f"trainable {self.trainable:,} | shared frozen {self.shared_frozen:,} | "
                f"base {self.base:,} | trainable/base {100 * self.share:.4f} %")


def count_parameters(model: nn.Module) -> ParamCount:
    trained = trainable_parameters(model)
    adapter_ids = {id(t) for t in trained.values()}
    base = sum(p.numel() for p in model.parameters() if id(p) not in adapter_ids)
    return ParamCount(sum(p.numel() for p in trained.values()),
                      sum(t.numel() for t in frozen_adapter_tensors(model).values()), base)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model computes as its base model (a merged adapter is unmerged)."""
    layers = [layer for _, layer in adapter_layers(model)]
    was_merged = any(layer.merged for layer in layers)
    if was_merged:
        unmerge_adapters(model)
    states = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, state in zip(layers, states):
            layer.enabled = state
        if was_merged:
            merge_adapters(model)


@torch.no_grad()
def _fold(model: nn.Module, merge: bool) -> None:
    todo = [(n, layer) for n, layer in adapter_layers(model) if layer.merged != merge]
    new = {}
    problems = Problems("merge refused" if merge else "unmerge refused")
    for name, layer in todo:
        base = layer.base
        if is_quantized(base):
            problems.add(f"layer {name} ({type(base).__name__}, {base.weight.dtype})",
                         "its base weight is quantised; folding would need a lossy requantisation",
                         "merge into the full-precision base: `slimtune merge --model BASE --adapter DIR` "
                         "loads the base unquantised")
            continue
        bias = None if base.bias is None else base.bias.float()
        fold = layer.merge_into if merge else layer.unmerge_from
        w, b = fold(weight_oi(base).float(), bias)
        if not torch.isfinite(w).all() or (b is not None and not torch.isfinite(b).all()):
            problems.add(f"layer {name}", "the merged weight would contain inf or NaN (a diverged adapter?)",
                         "check the adapter's values; nothing was changed")
        new[name] = (w, b)
    problems.raise_if_any()  # all or nothing
    for name, layer in todo:
        w, b = new[name]
        weight_oi(layer.base).copy_(w)
        if b is not None:
            layer.base.bias.copy_(b)
        layer.merged = merge


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, in place; merging twice is harmless."""
    _fold(model, merge=True)
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo merge_adapters (up to floating-point rounding)."""
    _fold(model, merge=False)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base layer, then remove the adapter, in place (PEFT's name).

    What is left is the plain base model with the merged weights, under the base's own
    parameter names: `save_pretrained` writes it as any transformers model, and
    `add_adapter` accepts it again. Refused, with nothing changed, where merging is.
    """
    from .inject import SHARED_ATTR, _replace  # inject builds on the adapters, as ops does

    merge_adapters(model)
    for name, layer in list(adapter_layers(model)):
        _replace(model, name, layer.base)
    if hasattr(model, SHARED_ATTR):
        delattr(model, SHARED_ATTR)
    return model


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict, under its original names, with every adapter folded in.

    Pure: the model is not changed. Adapter tensors are not included.
    """
    layers = dict(adapter_layers(model))
    adapter_ids = {id(t) for t in list(trainable_parameters(model).values())
                   + list(frozen_adapter_tensors(model).values())}
    out = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in adapter_ids:
            continue
        owner, _, leaf = key.rpartition(".base.")
        if owner in layers and "." not in leaf:
            layer = layers[owner]
            if is_quantized(layer.base):
                _fold(model, merge=True)  # raises the quantised-base error
            if not layer.merged:
                bias = None if layer.base.bias is None else layer.base.bias.float()
                w, b = layer.merge_into(weight_oi(layer.base).float(), bias)
                tensor = (w.T if isinstance(layer.base, Conv1D) else w) if leaf == "weight" else b
            out[f"{owner}.{leaf}"] = tensor.detach().to(getattr(layer.base, leaf).dtype).clone()
        else:
            out[key] = tensor.detach().clone()
    return out
