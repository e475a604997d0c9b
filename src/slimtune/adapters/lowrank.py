"""The low-rank family: LoRA, VeRA and Tied-LoRA as one formula.

    h = W0 x + s · Λ_b B Λ_d A x          A: (r, in)   B: (out, r)   d: (r,)   b: (out,)

- LoRA (Hu et al., 2021, arXiv:2106.09685): A, B per layer and trained; d, b absent; s = α/r.
- VeRA (Kopiczko et al., ICLR 2024, arXiv:2310.11454): A, B one frozen random pair for the
  whole model, sized to the largest layer and sliced; d, b per layer and trained; s = 1.
- Tied-LoRA (Renduchintala et al., NAACL 2024, arXiv:2311.09578): A, B tied across layers
  of one kind and trained; d (the paper's u) and b (its v) trained per layer or absent.

Which of A, B, d, b is absent, trained, tied, random or frozen is data (`LowRankConfig`);
this module only resolves each part to a tensor and applies the formula.

Two ways to compute the same thing; `forward` takes the one with fewer FLOPs (`flops`):
- per token:  h = s · b ⊙ (B (d ⊙ (A x)))         ~ N·r·(in+out) multiply-adds (×2–3 to train)
- dense:      y = (W0 + s · ΔW) x, ΔW = Λ_b B Λ_d A  ~ r·in·out, plus N·in·out for ∂ΔW to train
At high rank (VeRA's r = 256…1024) the dense form wins for most training-sized batches. Both run
as autograd functions with hand-written backwards (fused.py); over a quantised base, whose W0
is never materialised, plain autograd runs the per-token formula.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..targets import weight_oi
from .base import AdapterLayer, SharedTensors
from .fused import DenseLowRank, PerTokenLowRank, diag_rows, scaled_factors


def _cast(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


class LowRankLinear(AdapterLayer):
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
        self._choices: dict[tuple, bool] = {}  # use_dense's answers: the same for every call of a shape

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

    def flops(self, n_tokens: int, training: bool, trains: dict[str, bool] | None = None,
              sharing: int = 1) -> tuple[int, int]:
        """Multiply-adds of the (per-token, dense) forms for n_tokens rows, as the functions in
        fused.py compute them (the gradient into x assumed wanted); used to pick one. `sharing`
        layers read the same x with the same A (siblings.py): the x side is theirs to split."""
        i, o, r, n = self.in_features, self.out_features, self.r, n_tokens
        trains = trains or self.trained()
        if not training:
            return n * r * i // sharing + n * r * o, r * i * o
        # per token: a and ∂x += ∂a A (and ∂A if it trains) on the x side; the up-projection,
        # ∂(a ⊙ d) = g B̄ (and ∂B̄ if B or b trains) on the output side
        x_side = n * r * i * (2 + trains["A"])
        per_token = x_side // sharing + n * r * 2 * o + n * r * o * (trains["B"] or trains["b"])
        # dense: ΔW in the forward and again in the backward, G = gᵀx; then G Aᵀ and B̄ᵀ G if needed
        dense = 2 * r * i * o + n * i * o + r * i * o * (trains["B"] or trains["b"] or trains["d"]) \
            + r * i * o * trains["A"]
        return per_token, dense

    def same_a(self) -> tuple:
        """The sibling layers (this one included) that read the same x with the same A."""
        return self._shared[0].siblings.same_a(self)

    def fusable(self) -> bool:
        """A plain float base weight: the fused functions can read it (a quantised one they cannot)."""
        w = self.base.weight
        return isinstance(w, nn.Parameter) and w.dtype in (torch.float32, torch.bfloat16, torch.float16)

    def dropping(self) -> bool:
        return not isinstance(self.drop, nn.Identity) and self.drop.training

    def trained(self, parts: list | None = None) -> dict[str, bool]:
        """Which of A, B, d, b take a gradient (present and requiring grad)."""
        parts = parts or [self.part(n) for n in "ABdb"]
        return {n: t is not None and t.requires_grad for n, t in zip("ABdb", parts)}

    def use_dense(self, x: torch.Tensor, parts: list | None = None) -> bool:
        trains = self.trained(parts)
        training = torch.is_grad_enabled() and any(trains.values())
        if (training and self.dropping()) or not self.fusable():
            return False  # dropout applies to the adapter's input only; a quantised W0 is never materialised
        n = x.numel() // x.shape[-1]
        group = (self,) if torch.compiler.is_compiling() else self.same_a()
        key = (n, training, *trains.values(), len(group))
        if key not in self._choices:
            if len(group) == 1:
                per_token, dense = self.flops(n, training, trains)
            else:  # siblings with one A choose together: per token they compute a = x Aᵀ once
                costs = [m.flops(n, training, trains if m is self else None, len(group)) for m in group]
                per_token, dense = sum(c[0] for c in costs), sum(c[1] for c in costs)
            if len(self._choices) > 1024:  # many distinct batch shapes: forget the old ones
                self._choices.clear()
            self._choices[key] = dense < per_token
        return self._choices[key]

    def shares_down(self, x: torch.Tensor) -> bool:
        """This call would compute a = x Aᵀ itself from x (siblings.py): the fused per-token form
        without dropout."""
        return self.enabled and not self.merged and self.fusable() and not self.dropping() \
            and not self.use_dense(x)

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
        dense = self.use_dense(x, parts=parts)
        dev = x.device.type
        if torch.is_autocast_enabled(dev):  # the functions compute in autocast's dtype, cast here as autocast would
            with torch.autocast(dev, enabled=False):
                return self._forms(x, xa, parts, dense, torch.get_autocast_dtype(dev))
        return self._forms(x, xa, parts, dense, x.dtype)

    def _forms(self, x: torch.Tensor, xa: torch.Tensor | None, parts: list, dense: bool, dtype) -> torch.Tensor:
        siblings, a = self._shared[0].siblings, None
        # the adapter reads x itself: layers reading the same x can share a = x Aᵀ (not under
        # torch.compile, whose fusion does that job and which would recompile per layer for it)
        share = xa is None and not torch.compiler.is_compiling()
        if share:
            siblings.observe(self, x)
        xc, W0, bias = _cast(x, dtype), _cast(weight_oi(self.base), dtype), _cast(self.base.bias, dtype)
        A, B, d, b = parts
        if dense:
            return DenseLowRank.apply(xc, W0, bias, *(_cast(t, dtype) for t in parts), self.scale)
        if share:
            a = siblings.down(self, x, xc.reshape(-1, self.in_features))
        # given a, A's gradient flows through the group's product: A is not even cast
        return PerTokenLowRank.apply(xc, _cast(xa, dtype), W0, bias, None if a is not None else _cast(A, dtype),
                                     _cast(B, dtype), _cast(d, dtype), _cast(b, dtype), self.scale, a)

    def merge_into(self, weight, bias):
        return weight + self.scale * self.delta_weight().float(), bias

    def unmerge_from(self, weight, bias):
        return weight - self.scale * self.delta_weight().float(), bias
