"""The low-rank family: LoRA, VeRA and Tied-LoRA as one formula.

    h = W0 x + s · Λ_b B Λ_d A x          A: (r, in)   B: (out, r)   d: (r,)   b: (out,)

- LoRA (Hu et al., 2021, arXiv:2106.09685): A, B per layer and trained; d, b absent; s = α/r.
- VeRA (Kopiczko et al., ICLR 2024, arXiv:2310.11454): A, B one frozen random pair for the
  whole model, sized to the largest layer and sliced; d, b per layer and trained; s = 1.
- Tied-LoRA (Renduchintala et al., NAACL 2024, arXiv:2311.09578): A, B tied across layers
  of one kind and trained; d (the paper's u) and b (its v) trained per layer or absent.

Which of A, B, d, b is absent, trained, tied, random or frozen is data (`LowRankConfig`);
this module only resolves each part to a tensor and applies the formula.

Two forms compute it (forms.py picks the one with fewer multiply-adds): per token,
b ⊙ (B (d ⊙ (A x))), and dense, (W0 + s · ΔW) x, whose backward reads x or a = x Aᵀ; all are
autograd functions with hand-written backwards (fused.py). Over a quantised base, whose W0 is
never materialised, plain autograd runs the per-token formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..targets import weight_oi
from .base import AdapterLayer, SharedTensors
from .forms import TwoForms
from .fused import DenseLowRank, PerTokenLowRank, diag_rows, scaled_factors


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


class LowRankLinear(TwoForms, AdapterLayer):
    def __init__(self, base: nn.Module, config, shared: SharedTensors, shared_keys: dict[str, str],
                 local: dict[str, tuple[torch.Tensor, bool]]):
        super().__init__(base)
        self.r, self.scale = config.r, config.scale
        self.drop = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self._shared = (shared,)  # a tuple, so the model-level module is not registered twice
        self.shared_keys = shared_keys  # part name -> name in SharedTensors
        self.trained_names = [n for n, (_, trained) in local.items() if trained]
        for name, (tensor, trained) in local.items():  # per-layer parts
            if trained:
                self.register_parameter(name, nn.Parameter(tensor))
            else:
                self.register_buffer(name, tensor, persistent=False)
        self.frozen_names = [n for n, (_, trained) in local.items() if not trained]
        self._choices: dict[tuple, str] = {}  # form's answers: the same for every call of a shape

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {n: getattr(self, n) for n in self.trained_names}

    def frozen_tensors(self) -> dict[str, torch.Tensor]:
        return {n: getattr(self, n) for n in self.frozen_names}

    def part(self, name: str) -> torch.Tensor | None:
        """A, B, d or b for this layer: its own tensor, a slice of a shared one, or None (absent)."""
        key = self.shared_keys.get(name)
        if key is None:
            return getattr(self, name, None)
        t = getattr(self._shared[0], key)
        # Slice only a larger tensor: a full slice would still cost a zero-filled gradient per layer.
        if name == "A":
            return t if t.shape[1] == self.in_features else t[:, : self.in_features]  # (r, in)
        if name in ("B", "b") and t.shape[0] != self.out_features:
            return t[: self.out_features]  # B (out, r), b (out,)
        return t

    def delta_weight(self) -> torch.Tensor:
        """ΔW = Λ_b B Λ_d A, (out, in)."""
        Ad, Bb = scaled_factors(*(self.part(n) for n in "ABdb"))  # (r, in), (out, r)
        return Bb @ Ad  # (out, in)

    def same_a(self) -> tuple:
        """The sibling layers (this one included) that read the same x with the same A."""
        return self._shared[0].siblings.same_a(self)

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        parts = [self.part(n) for n in "ABdb"]  # resolved once per call: ~1 µs each
        xa = self.drop(x) if self.dropping() else None  # None: the adapter reads x itself
        if not self.fusable():  # quantised base: plain autograd through the same formula
            A, B, d, b = parts
            y = self.base(x)  # (B, T, out)
            h = F.linear((x if xa is None else xa).to(A.dtype), A)  # (B, T, r)
            h = h if d is None else h * d  # (B, T, r)
            Bb = diag_rows(b, B)  # (out, r): b folded in, no (B, T, out) intermediate
            out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, self.r).to(y.dtype), Bb.T.to(y.dtype),
                              alpha=self.scale)
            return out.view(y.shape)
        form = self.form(x, parts=parts)
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # the functions compute in autocast's dtype, cast here as autocast would
            with torch.autocast(dev, enabled=False):
                return self._forms(x, xa, parts, form, torch.get_autocast_dtype(dev))
        return self._forms(x, xa, parts, form, x.dtype)

    def _forms(self, x: torch.Tensor, xa: torch.Tensor | None, parts: list, form: str, dtype) -> torch.Tensor:
        siblings, a = self._shared[0].siblings, None
        # the adapter reads x itself: layers reading the same x can share a = x Aᵀ (not under
        # torch.compile, whose fusion does that job and which would recompile per layer for it)
        share = xa is None and not torch.compiler.is_compiling()
        if share:
            siblings.observe(self, x)
        xc, W0, bias = _cast(x, dtype), _cast(weight_oi(self.base), dtype), _cast(self.base.bias, dtype)
        A, B, d, b = parts
        if share and form != "dense":  # "dense" reads x, not a
            a = siblings.down(self, x, xc.reshape(-1, self.in_features))
        if form != "per-token":  # on "dense-a", a only stands in for x in ∂ΔW Aᵀ = gᵀa: no gradient through it
            return DenseLowRank.apply(xc, W0, bias, *(_cast(t, dtype) for t in parts), self.scale,
                                      form == "dense-a", None if a is None else a.detach())
        # given a, A's gradient flows through the group's product: A is not even cast
        return PerTokenLowRank.apply(xc, _cast(xa, dtype), W0, bias, None if a is not None else _cast(A, dtype),
                                     _cast(B, dtype), _cast(d, dtype), _cast(b, dtype), self.scale, a)

    def merge_into(self, weight, bias):
        return weight + self.scale * self.delta_weight().float(), bias

    def unmerge_from(self, weight, bias):
        return weight - self.scale * self.delta_weight().float(), bias
