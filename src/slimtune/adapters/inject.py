"""Named adapters on a model: add, activate, list and delete them.

    add_adapter(model, preset("vera"), name="support")   # the first one added is active
    set_active_adapter(model, "support")                  # or None: the base model
    delete_adapter(model, "support")

`add_adapter` asks the method (registry.py) for its site adapters, then places each around
its module: a module that carries no adapter yet is replaced by an `AdapterHost` holding it,
one that does gains the new adapter beside the others. Nothing is placed unless the method
built every site, so a failure leaves the model as it was.
"""

from __future__ import annotations

import contextlib
import re
from typing import Iterator

import torch
from torch import nn

from ..errors import Problems
from .protocol import AdapterHost, AdapterRoot, AdapterSet, SiteAdapter
from .registry import METHODS, AdapterConfig, validate

DEFAULT_NAME = "default"
# An adapter's name keys torch submodules, which cannot hold '.'; kept to plain, short names.
ADAPTER_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
NAME_RULE = "names are 1-64 letters, digits, '_' or '-', starting with a letter or digit (no '.': torch module keys)"


def adapter_set(model: nn.Module) -> AdapterSet | None:
    return getattr(model, AdapterSet.ATTR, None)


def adapter_names(model: nn.Module) -> list[str]:
    aset = adapter_set(model)
    return [] if aset is None else list(aset.roots)


def active_adapter(model: nn.Module) -> str | None:
    aset = adapter_set(model)
    return None if aset is None else aset.state.active


def root(model: nn.Module, name: str | None = None) -> AdapterRoot | None:
    """The named adapter's root, or the active one's (None if there is none)."""
    aset = adapter_set(model)
    if aset is None:
        return None
    name = aset.state.active if name is None else name
    if name not in aset.roots:
        if name is not None:
            _no_such(model, name)
        return None
    return aset.roots[name]


def get_config(model: nn.Module, name: str | None = None) -> AdapterConfig | None:
    """The named adapter's config, or the active one's."""
    r = root(model, name)
    return None if r is None else r.config


def _no_such(model: nn.Module, name: str) -> None:
    p = Problems("no such adapter")
    p.add(f"adapter {name!r}", f"the model carries {adapter_names(model) or 'no adapters'}",
          "use one of those names, or add/load the adapter first")
    p.raise_if_any()


def hosts(model: nn.Module) -> Iterator[tuple[str, AdapterHost]]:
    """(name, host) of every host, named as the module it stands for (a host inside another
    host's base is named without the outer `.base`)."""
    def walk(module: nn.Module, prefix: str):
        for child_name, child in module.named_children():
            name = f"{prefix}.{child_name}" if prefix else child_name
            if isinstance(child, AdapterHost):
                yield name, child
                yield from walk(child.base, name)
            elif not isinstance(child, AdapterSet):
                yield from walk(child, name)
    yield from walk(model, "")


def sites(model: nn.Module, name: str | None = None) -> Iterator[tuple[str, SiteAdapter]]:
    """(module name, site adapter) of the named adapter, or of the active one."""
    r = root(model, name)
    if r is None:
        return
    for host_name, host in hosts(model):
        if r.name in host.adapters:
            yield host_name, host.adapters[r.name]


def holder(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    """(parent, attribute) that holds the module `name` (a logical name: hosts looked through)."""
    parent = module = model
    for part in name.split("."):
        parent = module.base if isinstance(module, AdapterHost) else module
        module = getattr(parent, part)
    return parent, name.rsplit(".", 1)[-1]


def place(model: nn.Module, name: str, adapter_name: str, site: SiteAdapter, aset: AdapterSet) -> None:
    """Put `site` around the module `name`, in a host (a new one, or the one already there)."""
    parent, attr = holder(model, name)
    current = getattr(parent, attr)
    if not isinstance(current, AdapterHost):
        current = AdapterHost(current, aset.state)
        setattr(parent, attr, current)
    current.adapters[adapter_name] = site


def add_adapter(model: nn.Module, config: AdapterConfig, name: str = DEFAULT_NAME, share: bool = True) -> nn.Module:
    """Freeze the base model and add the adapter `config` describes under `name`, in place.
    The first adapter added becomes the active one. With `share`, frozen tensors equal to
    another adapter's become that adapter's (`share_frozen`)."""
    p = Problems("cannot add an adapter")
    if getattr(config, "method", None) not in METHODS:
        p.add(f"config {type(config).__name__}", "its method is not registered",
              "build it with slimtune.preset(), or register the method first (adapters/registry.py)")
        p.raise_if_any()
    validate(config)
    if not isinstance(name, str) or not ADAPTER_NAME.fullmatch(name):
        p.add(f"adapter name {str(name)[:80]!r}", NAME_RULE, "pass e.g. name='support' or name='lr_0-3'")
    aset = adapter_set(model)
    if aset is not None and name in aset.roots:
        p.add(f"adapter name {name!r}", "the model already carries an adapter of that name",
              "pass another name=, or delete_adapter(model, name) first")
    if any(h.merged is not None for _, h in hosts(model)):
        p.add("a merged adapter", "the model's base weights hold a merged adapter",
              "unmerge_adapters(model) first, or merge_and_unload(model) and add to the result")
    p.raise_if_any()
    if aset is None:
        for param in model.parameters():
            param.requires_grad_(False)
        aset = AdapterSet()
    adapter = AdapterRoot(name, config, aset.state)
    placed = METHODS[config.method].inject(model, config, adapter)  # builds every site, places none
    if AdapterSet.ATTR not in model._modules:
        model.add_module(AdapterSet.ATTR, aset)
    for module_name, site in placed.items():
        site.train(model.training)  # new modules start in training mode; they follow the model's
        place(model, module_name, name, site, aset)
    aset.roots[name] = adapter
    if aset.state.active is None:
        aset.state.active = name
    aset.state.version += 1
    if share:
        share_frozen(model, name)
    return model


@torch.no_grad()
def share_frozen(model: nn.Module, name: str) -> None:
    """Frozen tensors of adapter `name` equal to another adapter's (VeRA's random pair drawn
    from the same seed) become that adapter's own: one copy in memory for any number of
    adapters, and a mixed batch computes their product once (fast/rows.py)."""
    aset = adapter_set(model)
    new = aset.roots[name]
    for key, t in new.frozen_tensors().items():
        for other_name, other in aset.roots.items():
            o = other.frozen_tensors().get(key) if other_name != name else None
            if (o is not None and o is not t and o.shape == t.shape and o.dtype == t.dtype and o.device == t.device
                    and torch.equal(o, t)):
                new._buffers[key] = o
                break
    aset.state.version += 1


@contextlib.contextmanager
def adapter_rows(model: nn.Module, rows: list[str | None]):
    """Within the block, row i of every batch computes with adapter rows[i] (None: the base
    model): a mixed batch, for inference."""
    known = set(adapter_names(model))
    bad = sorted({r for r in rows if r is not None and r not in known})
    if bad:
        _no_such(model, bad[0])
    aset = adapter_set(model)
    if aset is None:
        yield model
        return
    before = aset.state.rows
    aset.state.rows = tuple(rows)
    try:
        yield model
    finally:
        aset.state.rows = before


def set_active_adapter(model: nn.Module, name: str | None) -> None:
    """Compute with adapter `name` from now on; None computes with the base model."""
    if name is not None and name not in adapter_names(model):
        _no_such(model, name)
    merged = {h.merged for _, h in hosts(model)} - {None}
    if merged and name not in merged:
        p = Problems("cannot switch adapters")
        p.add(f"adapter {sorted(merged)[0]!r} merged", "its weights are folded into the base layers",
              "unmerge_adapters(model) first")
        p.raise_if_any()
    aset = adapter_set(model)
    if aset is not None:
        aset.state.active = name


def delete_adapter(model: nn.Module, name: str) -> None:
    """Remove adapter `name`; a module left with no adapter gets its plain base module back, and
    a model left with none is the plain base model again."""
    if name not in adapter_names(model):
        _no_such(model, name)
    if any(h.merged == name for _, h in hosts(model)):
        p = Problems("cannot delete a merged adapter")
        p.add(f"adapter {name!r}", "its weights are folded into the base layers", "unmerge_adapters(model) first")
        p.raise_if_any()
    for host_name, host in sorted(hosts(model), key=lambda nh: -nh[0].count(".")):  # inner hosts first
        if name in host.adapters:
            del host.adapters[name]
        if not len(host.adapters):
            parent, attr = holder(model, host_name)
            setattr(parent, attr, host.base)
    aset = adapter_set(model)
    del aset.roots[name]
    aset.state.version += 1
    if aset.state.active == name:
        aset.state.active = None
    if not len(aset.roots):
        delattr(model, AdapterSet.ATTR)
