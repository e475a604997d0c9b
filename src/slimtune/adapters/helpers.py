"""Free helpers on the adapter contract: train, count, group, disable, merge, collect.

Each reads the declarations (`adapter_params`, `frozen_tensors`, `param_groups`) of the
active adapter's sites and root, or of the adapter named; none looks at parameter names.
Tensors are keyed as saved: a site's under its module's name (`...q_proj.A`), a root's
under `slimtune_shared.` (`slimtune_shared.A__model`).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..errors import Problems
from ..models.layers import is_linear, is_quantized, weight_oi
from .inject import adapter_names, adapter_set, delete_adapter, get_config, holder, hosts, root, sites
from .protocol import AdapterSet, AuxLoss, Declares

SHARED_PREFIX = "slimtune_shared"


def declaring(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, Declares]]:
    """(key prefix, module) of every module of the adapter that declares tensors."""
    r = root(model, name)
    if r is None:
        return
    yield SHARED_PREFIX, r
    yield from sites(model, r.name)


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def trainable_parameters(model: nn.Module, name: str | None = None) -> dict[str, nn.Parameter]:
    """Every trained tensor of the adapter (the active one by default), by its saved key."""
    return {_join(m, n): p for m, mod in declaring(model, name) for n, p in mod.adapter_params().items()}


def frozen_adapter_tensors(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    return {_join(m, n): t for m, mod in declaring(model, name) for n, t in mod.frozen_tensors().items()}


def param_groups(model: nn.Module, name: str | None = None) -> dict[str, list[nn.Parameter]]:
    """The adapter's trained tensors by declared optimiser group (matrix, vector, router, embedding)."""
    out: dict[str, list[nn.Parameter]] = {}
    for _, mod in declaring(model, name):
        params = mod.adapter_params()
        for n, group in mod.param_groups().items():
            out.setdefault(group, []).append(params[n])
    return out


def set_trainable(model: nn.Module, name: str | None = None) -> list[nn.Parameter]:
    """requires_grad on the adapter's declared tensors only; returns them (for the optimiser)."""
    for p in model.parameters():
        p.requires_grad_(False)
    params = list(trainable_parameters(model, name).values())
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


def count_parameters(model: nn.Module, name: str | None = None) -> ParamCount:
    """Parameters of the adapter (the active one) against the base model's own."""
    aset = adapter_set(model)
    every = set()
    for n in ([] if aset is None else aset.roots):
        every |= {id(p) for p in trainable_parameters(model, n).values()}
    trained = trainable_parameters(model, name)
    base = sum(p.numel() for p in model.parameters() if id(p) not in every)
    return ParamCount(sum(p.numel() for p in trained.values()),
                      sum(t.numel() for t in frozen_adapter_tensors(model, name).values()), base)


@contextlib.contextmanager
def disable_adapters(model: nn.Module):
    """Within the block the model computes as its base model (a merged adapter is unmerged)."""
    aset = adapter_set(model)
    if aset is None:
        yield model
        return
    merged = {h.merged for _, h in hosts(model)} - {None}
    if merged:
        unmerge_adapters(model)
    was = aset.state.enabled
    aset.state.enabled = False
    try:
        yield model
    finally:
        aset.state.enabled = was
        if merged:
            merge_adapters(model, next(iter(merged)))


def _method(model: nn.Module, name: str | None) -> str:
    cfg = get_config(model, name)
    return f"{getattr(cfg, 'preset', '?')} ({getattr(cfg, 'method', '?')})"


def _refuse_unmergeable(model: nn.Module, name: str | None, p: Problems) -> None:
    for module_name, site in sites(model, name):
        if not site.mergeable:
            p.add(f"adapter {_method(model, name)} at {module_name}", "this method does not fold into the base "
                  "weights: its output depends on each token beyond a fixed weight change",
                  "keep the adapter unmerged: save it with save_adapter and serve it with its base model")
            return


def _folded(model: nn.Module, module_name: str, host, site, p: Problems, merge: bool = True):
    """(W, b) of host's base with site folded in (or out), float32; None with a problem added."""
    base = host.base
    if not (is_linear(base) or isinstance(base, nn.Embedding)):  # an embedding: the gist row (gist.py)
        p.add(f"layer {module_name} ({type(base).__name__})", "only linear layers can take a merged adapter",
              "keep the adapter unmerged")
        return None
    if is_quantized(base):
        p.add(f"layer {module_name} ({type(base).__name__}, {base.weight.dtype})",
              "its base weight is quantised; folding would need a lossy requantisation",
              "merge into the full-precision base: `slimtune export --format merged --model BASE --adapter DIR` "
              "loads the base unquantised")
        return None
    bias = None if getattr(base, "bias", None) is None else base.bias.float()
    w, b = (site.merge_into if merge else site.unmerge_from)(weight_oi(base).float(), bias)
    if not torch.isfinite(w).all() or (b is not None and not torch.isfinite(b).all()):
        p.add(f"layer {module_name}", "the merged weight would contain inf or NaN (a diverged adapter?)",
              "check the adapter's values; nothing was changed")
        return None
    return w, b


@torch.no_grad()
def _fold(model: nn.Module, name: str | None, merge: bool, reversible: bool = True) -> None:
    r = root(model, name)
    if r is None:
        return
    p = Problems("merge refused" if merge else "unmerge refused")
    if merge:
        _refuse_unmergeable(model, r.name, p)
        p.raise_if_any()
    todo = [(n, h, h.adapters[r.name]) for n, h in hosts(model)
            if r.name in h.adapters and (h.merged is None if merge else h.merged == r.name)]
    if merge and reversible:  # an in-place merge promises that unmerge_adapters restores the base
        for module_name, _, site in todo:
            why = site.irreversible()
            if why:
                p.add(f"adapter {r.name!r} at {module_name}", f"{why}; unmerging could not restore the base",
                      "use merge_and_unload (or `slimtune export --format merged`), which does not unmerge, or "
                      "keep the adapter unmerged")
        p.raise_if_any()
    new = {}
    for module_name, host, site in todo:
        folded = _folded(model, module_name, host, site, p, merge)
        if folded is not None:
            new[module_name] = folded
    p.raise_if_any()  # all or nothing
    for module_name, host, _ in todo:
        w, b = new[module_name]
        weight_oi(host.base).copy_(w)
        if b is not None:
            host.base.bias.copy_(b)
        host.merged = r.name if merge else None


def merge_adapters(model: nn.Module, name: str | None = None) -> nn.Module:
    """Fold the adapter (the active one) into its base weights, in place; twice is harmless."""
    _fold(model, name, merge=True)
    return model


def unmerge_adapters(model: nn.Module) -> nn.Module:
    """Undo merge_adapters (up to floating-point rounding)."""
    merged = {h.merged for _, h in hosts(model)} - {None}
    for name in merged:
        _fold(model, name, merge=False)
    return model


def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold the active adapter into its base layers, then remove every adapter, in place
    (PEFT's name). What is left is the plain base model with the merged weights, under the
    base's own parameter names: `save_pretrained` writes it as any transformers model, and
    `add_adapter` accepts it again. Refused, with nothing changed, where merging is."""
    _fold(model, None, merge=True, reversible=False)  # never unmerged: the adapters go
    for _, host in hosts(model):
        host.merged = None  # the weights stay folded; the adapters go
    for n in adapter_names(model):
        delete_adapter(model, n)
    return model


@torch.no_grad()
def fold_mergeable(model: nn.Module, name: str | None = None) -> nn.Module:
    """Fold the adapter's mergeable sites (PESC's LoRA, say) into their base weights and remove
    them, in place; the sites that cannot merge stay. All or nothing, like merge_adapters."""
    r = root(model, name)
    if r is None:
        return model
    p = Problems("merge refused")
    todo = [(n, h, h.adapters[r.name]) for n, h in hosts(model) if r.name in h.adapters and h.adapters[r.name].mergeable]
    new = {n: _folded(model, n, h, site, p) for n, h, site in todo}
    p.raise_if_any()
    for module_name, host, _ in sorted(todo, key=lambda t: -t[0].count(".")):  # inner hosts first
        w, b = new[module_name]
        weight_oi(host.base).copy_(w)
        if b is not None:
            host.base.bias.copy_(b)
        del host.adapters[r.name]
        if not len(host.adapters):
            parent, attr = holder(model, module_name)
            setattr(parent, attr, host.base)
    return model


def _base_key(key: str, host_names: list[str]) -> str | None:
    """A state-dict key under the base model's own names; None for adapter tensors."""
    if key.startswith(AdapterSet.ATTR + "."):
        return None
    for h in host_names:  # inner hosts first: their keys also hold the outer ones' `.base.`
        if key.startswith(h + ".adapters."):
            return None
        if key.startswith(h + ".base."):
            key = h + "." + key[len(h) + len(".base."):]
    return key


@torch.no_grad()
def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The base model's state dict, under its original names, with the active adapter folded
    in. Pure: the model is not changed. Adapter tensors are not included. Refused where
    merging is, and where a folded weight would not be finite."""
    physical = {id(m): n for n, m in model.named_modules()}
    host_list = sorted(((physical[id(h)], n, h) for n, h in hosts(model)), key=lambda t: -len(t[0]))
    p = Problems("merged state dict refused")
    r = root(model)
    folded = {}
    if r is not None:
        _refuse_unmergeable(model, r.name, p)
        p.raise_if_any()
        for _, module_name, host in host_list:
            if r.name in host.adapters and host.merged is None:
                out = _folded(model, module_name, host, host.adapters[r.name], p)
                if out is not None:
                    folded[module_name] = (host, out)
        p.raise_if_any()
    out = {}
    names = [h for h, _, _ in host_list]
    for key, tensor in model.state_dict(keep_vars=True).items():
        k = _base_key(key, names)
        if k is None:
            continue
        owner, _, leaf = k.rpartition(".")
        if owner in folded and leaf in ("weight", "bias"):
            host, (w, b) = folded[owner]
            tensor = (w.T if isinstance(host.base, Conv1D) else w) if leaf == "weight" else b
            tensor = tensor.to(getattr(host.base, leaf).dtype)
        out[k] = tensor.detach().clone()
    return out


@contextlib.contextmanager
def collect_aux_losses(model: nn.Module, token_mask: torch.Tensor | None = None):
    """Collect the auxiliary losses sites report during the block, into the yielded list;
    `token_mask` (B, T) tells them which positions hold real tokens."""
    aset = adapter_set(model)
    losses: list[AuxLoss] = []
    if aset is None:
        yield losses
        return
    aset.state.aux, aset.state.token_mask = losses, token_mask
    try:
        yield losses
    finally:
        aset.state.aux, aset.state.token_mask = None, None


def router_stats(model: nn.Module, name: str | None = None) -> dict[str, dict]:
    """{site name: {load, entropy, dropped, tokens}} of every routing site of the adapter, counted
    over the training forwards since the last call (which starts a fresh count)."""
    out = {}
    for module_name, site in sites(model, name):
        take = getattr(site, "take_stats", None)
        stats = take() if take is not None else None
        if stats is not None:
            out[module_name] = stats
    return out
