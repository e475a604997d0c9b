"""Put an adapter on a model: match targets, create shared tensors once, wrap each layer.

Every tensor is drawn from one CPU generator seeded with the config's seed, in a fixed order
(shared tensors first, then per layer, parts in the order A, B, d, b), so frozen tensors can
be regenerated on load instead of saved. For VeRA this gives the same pair as PEFT's
`projection_prng_key` (A, then B, Kaiming-uniform with gain sqrt(2)).
"""

from __future__ import annotations

import torch
from torch import nn

from . import targets as T
from .adapters.base import SharedTensors, init_tensor
from .adapters.ia3 import IA3Linear
from .adapters.lowrank import LowRankLinear
from .adapters.siblings import Siblings
from .config import AdapterConfig, IA3Config, LowRankConfig
from .errors import Problems
from .presets import validate

SHARED_ATTR = "slimtune_shared"


def get_config(model: nn.Module) -> AdapterConfig | None:
    shared = getattr(model, SHARED_ATTR, None)
    return None if shared is None else shared.config


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def _shape(part: str, r: int, i: int, o: int) -> tuple[int, ...]:
    return {"A": (r, i), "B": (o, r), "d": (r,), "b": (o,)}[part]


def _shared_key(part: str, share: str, name: str) -> str:
    scope = "model" if share == "model" else T.kind(name).replace(".", "_").replace("*", "N")
    return f"{part}__{scope}"


def add_adapter(model: nn.Module, config: AdapterConfig) -> nn.Module:
    """Freeze the base model and add the adapter described by `config`, in place."""
    validate(config)
    if hasattr(model, SHARED_ATTR):
        p = Problems("cannot add an adapter")
        p.add(f"model with adapter {get_config(model).preset!r}", "this model already carries an adapter",
              "load a fresh base model, or fold this adapter in first: slimtune.merge_and_unload(model)")
        p.raise_if_any()
    for param in model.parameters():
        param.requires_grad_(False)
    shared = SharedTensors(config)
    gen = torch.Generator().manual_seed(config.seed if isinstance(config, LowRankConfig) else 0)
    if isinstance(config, LowRankConfig):
        _add_lowrank(model, config, shared, gen)
    else:
        _add_ia3(model, config)
    model.add_module(SHARED_ATTR, shared)
    return model


def _add_lowrank(model: nn.Module, cfg: LowRankConfig, shared: SharedTensors, gen: torch.Generator) -> None:
    names = T.match_targets(model, cfg.targets)
    shared.siblings = Siblings()  # the layers that read the same input, learned in the forward
    layers = {n: model.get_submodule(n) for n in names}
    # Pass 1: every shared tensor, sized to the largest layer that uses it.
    sizes: dict[str, tuple[str, int, int]] = {}
    for name, layer in layers.items():
        i, o = T.dims(layer)
        for part in "ABdb":
            spec = getattr(cfg, part)
            if spec.mode in ("tied", "random"):
                key = _shared_key(part, spec.share, name)
                _, i0, o0 = sizes.get(key, (part, 0, 0))
                sizes[key] = (part, max(i, i0), max(o, o0))
    ref = next(iter(layers.values())).weight
    ref_dtype = adapter_dtype(ref)
    for key, (part, i, o) in sizes.items():
        spec = getattr(cfg, part)
        shared.add(key, init_tensor(_shape(part, cfg.r, i, o), spec.init, gen, ref.device, ref_dtype),
                   trained=spec.mode == "tied")
    # Pass 2: wrap each layer with its own parts and references to the shared ones.
    for name, layer in layers.items():
        i, o = T.dims(layer)
        w = layer.weight
        keys, local = {}, {}
        for part in "ABdb":
            spec = getattr(cfg, part)
            if spec.mode in ("tied", "random"):
                keys[part] = _shared_key(part, spec.share, name)
            elif spec.mode in ("trained", "frozen"):
                t = init_tensor(_shape(part, cfg.r, i, o), spec.init, gen, w.device, adapter_dtype(w))
                local[part] = (t, spec.mode == "trained")
        _replace(model, name, LowRankLinear(layer, cfg, shared, keys, local))


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters take the base's float dtype; over a quantised (integer) base they are float32."""
    return weight.dtype if torch.is_floating_point(weight) else torch.float32


def _add_ia3(model: nn.Module, cfg: IA3Config) -> None:
    for name, where, span in T.ia3_sites(model, cfg.scale_outputs, cfg.scale_inputs):
        layer = model.get_submodule(name)
        i, o = T.dims(layer)
        n = i if where == "input" else round(span[1] * o) - round(span[0] * o)
        init = torch.full((n,), cfg.init, device=layer.weight.device, dtype=adapter_dtype(layer.weight))
        _replace(model, name, IA3Linear(layer, where, span, init))
