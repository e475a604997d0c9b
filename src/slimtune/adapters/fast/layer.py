"""The fast path's record of one low-rank site: its form choices, its sibling group, and the
call into the fused functions.

The site (adapters/lowrank.py's LowRankLinear) knows nothing of this: the record is made the
first time the fast path runs the site, kept beside it, and reads only what the formula reads
(its parts, rank, scale and dropout).
"""

from __future__ import annotations

import torch
from torch import nn

from ...models.layers import weight_oi
from .forms import FORMS, flops
from .fused import DenseLowRank, PerTokenLowRank
from .siblings import Siblings


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def fusable(base: nn.Module) -> bool:
    """A plain float base weight: the fused functions can read it (a quantised one they cannot)."""
    w = getattr(base, "weight", None)
    return isinstance(w, nn.Parameter) and w.dtype in (torch.float32, torch.bfloat16, torch.float16)


def siblings_of(site) -> Siblings:
    """The sibling groups of the site's adapter, kept beside its root."""
    root = site.root
    if "_fast_siblings" not in root.__dict__:
        root.__dict__["_fast_siblings"] = Siblings()
    return root.__dict__["_fast_siblings"]


class FastLayer:
    def __init__(self, site):
        self.site = site
        self.i, self.o, self.r = site.in_features, site.out_features, site.r
        self.a_key = site.shared_keys.get("A")  # a shared A (VeRA's, a tied one): siblings stack it once
        self.choices: dict[tuple, str] = {}  # the same answer for every call of a shape

    @staticmethod
    def of(site) -> "FastLayer":
        if "_fast" not in site.__dict__:
            site.__dict__["_fast"] = FastLayer(site)
        return site.__dict__["_fast"]

    def A(self) -> torch.Tensor:
        return self.site.part("A")

    def trained(self, parts) -> dict[str, bool]:
        """Which of A, B, d, b take a gradient (present and requiring grad)."""
        return {n: t is not None and t.requires_grad for n, t in zip("ABdb", parts)}

    def dropping(self) -> bool:
        drop = self.site.dropout
        return not isinstance(drop, nn.Identity) and drop.training

    def flops(self, n: int, training: bool, trains: dict[str, bool], sharing: int = 1) -> dict[str, int]:
        return flops(self.i, self.o, self.r, n, training, trains, sharing)

    def same_a(self) -> tuple:
        return siblings_of(self.site).same_a(self)

    def form(self, x: torch.Tensor, parts) -> str:
        """One of FORMS for this call: the cheapest for its batch, summed over its siblings. A
        site whose d is per token (MoLoRA) has no weight to fold: always per token."""
        if getattr(self.site, "per_token_d", False):
            return "per-token"
        trains = self.trained(parts)
        training = torch.is_grad_enabled() and any(trains.values())
        if training and self.dropping():
            return "per-token"  # dropout applies to the adapter's input only
        n = x.numel() // x.shape[-1]
        group = (self,) if torch.compiler.is_compiling() else self.same_a()
        key = (n, training, *trains.values(), len(group))
        if key not in self.choices:
            costs = [m.flops(n, training, trains, len(group)) for m in group]
            total = {f: sum(c[f] for c in costs) for f in FORMS if all(f in c for c in costs)}
            if len(self.choices) > 1024:  # many distinct batch shapes: forget the old ones
                self.choices.clear()
            self.choices[key] = min(total, key=total.get)
        return self.choices[key]

    def shares_down(self, x: torch.Tensor) -> bool:
        """This call would compute a = x Aᵀ itself from x: the fused per-token form without
        dropout, or "dense-a" (siblings.py asks before computing the group's a)."""
        return not self.dropping() and self.form(x, self.site.parts()) != "dense"

    def __call__(self, base: nn.Module, x: torch.Tensor, d: torch.Tensor | None = None) -> torch.Tensor:
        parts = self.site.parts()  # resolved once per call
        if d is not None:  # a per-token d (..., r): its rows stand in for the vector d
            parts = (parts[0], parts[1], d.reshape(-1, d.shape[-1]), parts[3])
        form = self.form(x, parts)
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # the functions compute in autocast's dtype, cast here as autocast would
            with torch.autocast(dev, enabled=False):
                return self._run(base, x, parts, form, torch.get_autocast_dtype(dev))
        return self._run(base, x, parts, form, x.dtype)

    def _run(self, base: nn.Module, x: torch.Tensor, parts, form: str, dtype) -> torch.Tensor:
        s = self.site.scale
        xa = self.site.dropout(x) if self.dropping() else None  # None: the adapter reads x itself
        # the adapter reads x itself: layers reading the same x can share a = x Aᵀ (not under
        # torch.compile, whose fusion does that job and which would recompile per layer for it)
        share = xa is None and not torch.compiler.is_compiling()
        siblings, a = siblings_of(self.site), None
        if share:
            siblings.observe(self, x)
        xc, W0, bias = _cast(x, dtype), _cast(weight_oi(base), dtype), _cast(base.bias, dtype)
        A, B, d, b = parts
        if share and form != "dense":  # "dense" reads x, not a
            a = siblings.down(self, x, xc.reshape(-1, self.i))
        if form != "per-token":  # on "dense-a", a only stands in for x in ∂ΔW Aᵀ = gᵀa: no gradient through it
            return DenseLowRank.apply(xc, W0, bias, *(_cast(t, dtype) for t in parts), s,
                                      form == "dense-a", None if a is None else a.detach())
        # given a, A's gradient flows through the group's product: A is not even cast
        return PerTokenLowRank.apply(xc, _cast(xa, dtype), W0, bias, None if a is not None else _cast(A, dtype),
                                     _cast(B, dtype), _cast(d, dtype), _cast(b, dtype), s, a)
