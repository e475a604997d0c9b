"""The adapter contract.

Four kinds of module take part:

- `SiteAdapter`: one adapter at one place (a *site*) of the base model, a linear layer or any
  other module (a whole MLP block). `forward(base, *args)` is the adapted call of the module
  it sits on. It says whether it can be folded into the base weight (`mergeable`,
  `merge_into`) and may report auxiliary losses (`report`).
- `AdapterHost`: stands in the model where the base module was, keeps that module as `base`
  and the site adapters around it by adapter name, and calls the active one (or none).
- `AdapterRoot`: one per named adapter, at model level: its config and the tensors several
  sites share (tied trained matrices, frozen random ones), created once.
- `AdapterSet` (`model.slimtune_adapters`): the roots by name, and the `AdapterState` every
  host reads: which adapter is active, whether adapters are enabled, and the auxiliary losses
  being collected.

Every tensor is declared in one place, `declare(name, tensor, group)`: a trained one with its
optimiser group (matrix, vector, router, embedding), a frozen one with group None. Freezing,
counting, saving, merging and the optimiser read these declarations; nothing finds adapter
tensors by their names.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

GROUPS = ("matrix", "vector", "router", "embedding")  # optimiser groups, each with its own LR and decay


def init_tensor(shape: tuple[int, ...], init: str | float, gen: torch.Generator, device, dtype) -> torch.Tensor:
    """A tensor drawn on the CPU from `gen` (so it can be regenerated from the seed), then moved."""
    if torch.device(device).type == "meta":
        return torch.empty(shape, device="meta", dtype=dtype)
    fan_in = shape[1] if len(shape) == 2 else shape[0]
    if init == "zeros":
        t = torch.zeros(shape)
    elif init == "ones":
        t = torch.ones(shape)
    elif init == "normal":
        t = torch.randn(shape, generator=gen) * 0.02
    elif init in ("kaiming_uniform", "he_uniform"):
        # kaiming_uniform: nn.Linear's default (a = sqrt(5)), bound 1/sqrt(fan_in), as LoRA/PEFT use;
        # he_uniform: gain sqrt(2), bound sqrt(6 / fan_in), as VeRA's reference code uses.
        bound = 1 / math.sqrt(fan_in) if init == "kaiming_uniform" else math.sqrt(6 / fan_in)
        t = torch.empty(shape).uniform_(-bound, bound, generator=gen)
    else:
        t = torch.full(shape, float(init))
    return t.to(device=device, dtype=dtype)


@dataclass
class AuxLoss:
    """An auxiliary loss a site reported during a forward.

    `total` is token-additive: the sum over the micro-batch's real tokens of a per-token
    quantity, or a per-batch loss times its number of tokens. The loop divides the window's
    totals by the window's real tokens (all ranks), as it divides the LM loss by the labelled
    tokens, so the split into micro-batches does not change it. `weight` comes from the
    method's config."""

    name: str
    total: torch.Tensor
    weight: float
    adapter: str | None = None  # the adapter that reported it (mixed batches split the losses by it)


@dataclass
class AdapterState:
    """What every host of a model reads; shared, not copied, between them."""

    active: str | None = None  # the adapter the model computes with
    enabled: bool = True
    token_mask: torch.Tensor | None = None  # (B, T) real tokens of the batch being run, for aux losses
    aux: list[AuxLoss] | None = None  # collecting when a list
    count_routing: bool = True  # routers count what they route in training forwards (the loop: on logged steps)
    rows: tuple[str | None, ...] | None = None  # mixed batches: the adapter of each row (None: the base)
    version: int = 0  # bumped when adapters are added, removed or loaded: per-row stacks are rebuilt


class Declares(nn.Module):
    """Declared tensors: the one bookkeeping of trained and frozen adapter tensors."""

    def __init__(self):
        super().__init__()
        self.declared: dict[str, str | None] = {}  # name -> optimiser group; None = frozen

    def declare(self, name: str, tensor: torch.Tensor, group: str | None) -> None:
        """A trained tensor (a Parameter in optimiser `group`) or, with group None, a frozen one
        (a buffer, regenerated from the seed rather than saved unless the config asks)."""
        if group is not None and group not in GROUPS:
            raise ValueError(f"group={group!r}: an optimiser group is one of {GROUPS}")
        if group is None:
            self.register_buffer(name, tensor, persistent=False)
        else:
            self.register_parameter(name, nn.Parameter(tensor))
        self.declared[name] = group

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {n: getattr(self, n) for n, g in self.declared.items() if g is not None}

    def frozen_tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n, g in self.declared.items() if g is None}

    def param_groups(self) -> dict[str, str]:
        return {n: g for n, g in self.declared.items() if g is not None}


class SiteAdapter(Declares):
    """One adapter at one site. Subclasses implement `forward(base, *args, **kwargs)`; the
    mergeable ones `merge_into` and `unmerge_from` on the base's (out, in) weight."""

    mergeable: ClassVar[bool] = True
    # Mixed batches: `rows(base, sites, x, every)` computes every row with its own site (None: the
    # base) in one batched computation, or returns None; the host then runs each adapter's rows
    # apart. `every`: all the module's sites of that kind (the order of stacked tensors).
    rows: ClassVar = None

    def __init__(self, root: "AdapterRoot"):
        super().__init__()
        self._root = (root,)  # a tuple: the model-level root is not registered here a second time

    @property
    def root(self) -> "AdapterRoot":
        return self._root[0]

    def forward(self, base: nn.Module, *args, **kwargs):
        raise NotImplementedError

    def merge_into(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """(W', b') with the adapter folded in; weight is (out, in) in float32. Pure."""
        raise NotImplementedError

    def unmerge_from(self, weight: torch.Tensor, bias: torch.Tensor | None):
        """The inverse of merge_into. Pure."""
        raise NotImplementedError

    def irreversible(self) -> str | None:
        """Why merge_into could not be undone by unmerge_from with these values, or None."""
        return None

    def report(self, name: str, total: torch.Tensor, weight: float) -> None:
        """Report an auxiliary loss (see AuxLoss); dropped unless the loop is collecting."""
        state = self.root.state
        if state.aux is not None:
            state.aux.append(AuxLoss(name, total, weight, self.root.name))

    def token_mask(self, like: torch.Tensor) -> torch.Tensor:
        """(B, T) bool of the real tokens of `like` (B, T, ...): the batch's, or all."""
        mask = self.root.state.token_mask
        if mask is None or mask.shape != like.shape[:2]:
            return torch.ones(like.shape[:2], dtype=torch.bool, device=like.device)
        return mask


class AdapterHost(nn.Module):
    """A module of the base model, with the site adapters around it by adapter name."""

    def __init__(self, base: nn.Module, state: AdapterState):
        super().__init__()
        self.base = base
        self.adapters = nn.ModuleDict()
        self._state = (state,)
        self.merged: str | None = None  # the adapter folded into base's weight, if any

    def slimtune_host_base(self) -> nn.Module:  # models/layers.py looks through a host by this
        return self.base

    def active(self) -> SiteAdapter | None:
        state = self._state[0]
        if not state.enabled or self.merged is not None:
            return None  # disabled, or the adapter is folded into the base already
        return self.adapters[state.active] if state.active in self.adapters else None

    def forward(self, *args, **kwargs):
        state = self._state[0]
        if state.rows is not None and state.enabled and self.merged is None:
            return self.forward_rows(state.rows, *args, **kwargs)
        site = self.active()
        return self.base(*args, **kwargs) if site is None else site(self.base, *args, **kwargs)

    def forward_rows(self, rows: tuple[str | None, ...], x: torch.Tensor, *args, **kwargs):
        """A mixed batch: row i of x through adapter rows[i] (None or an adapter this module does
        not carry: the base). Sites of one kind that can (`SiteAdapter.rows`) compute all rows
        together; otherwise each adapter's rows run as a sub-batch, the reference."""
        if x.shape[0] != len(rows):
            raise ValueError(f"a mixed batch names {len(rows)} rows' adapters, but the input has {x.shape[0]} rows")
        sites = [self.adapters[n] if n in self.adapters else None for n in rows]
        kinds = {type(s) for s in sites if s is not None}
        if not kinds:
            return self.base(x, *args, **kwargs)
        if len(kinds) == 1 and not args and not kwargs:
            kind = next(iter(kinds))
            if kind.rows is not None:
                y = kind.rows(self.base, sites, x, self.every(kind))
                if y is not None:
                    return y
        return self.grouped_rows(rows, x, *args, **kwargs)

    def every(self, kind: type) -> list:
        """The site adapters of one kind at this module, in order (kept until adapters change)."""
        version = self._state[0].version
        cached = self.__dict__.get("_every")
        if cached is None or cached[0] != version or cached[1] is not kind:
            cached = self.__dict__["_every"] = (version, kind, [s for s in self.adapters.values() if type(s) is kind])
        return cached[2]

    def grouped_rows(self, rows: tuple[str | None, ...], x: torch.Tensor, *args, **kwargs):
        """The reference for mixed batches: each adapter's rows as a sub-batch of their own, run
        with that adapter active (so hosts inside this module's base, PESC's FFN layers, use it
        too)."""
        state = self._state[0]
        saved = state.rows, state.active, state.enabled, state.token_mask
        mask = saved[3] if saved[3] is not None and saved[3].shape[:2] == x.shape[:2] else None
        out = None
        try:
            state.rows = None
            for name in dict.fromkeys(rows):
                idx = torch.tensor([i for i, n in enumerate(rows) if n == name], device=x.device)
                state.active, state.enabled = name, name is not None
                state.token_mask = None if mask is None else mask[idx]  # the sub-batch's real tokens
                site = self.adapters[name] if name in self.adapters else None
                y = self.base(x[idx], *args, **kwargs) if site is None else site(self.base, x[idx], *args, **kwargs)
                if out is None:
                    out = y.new_empty((len(rows),) + tuple(y.shape[1:]))
                out[idx] = y
        finally:
            state.rows, state.active, state.enabled, state.token_mask = saved
        return out

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base", "adapters", "_state", "merged"):
                raise
            return getattr(self.base, name)  # code in transformers reads layer.weight, in_features...


class AdapterRoot(Declares):
    """One named adapter at model level: its config and its shared tensors."""

    def __init__(self, name: str, config, state: AdapterState):
        super().__init__()
        self.name, self.config = name, config
        self.state = state


class AdapterSet(nn.Module):
    """`model.slimtune_adapters`: every named adapter's root, and the state hosts read."""

    ATTR = "slimtune_adapters"

    def __init__(self):
        super().__init__()
        self.roots = nn.ModuleDict()
        self.state = AdapterState()
