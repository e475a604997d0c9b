"""The low-rank family: LoRA, VeRA and Tied-LoRA as one formula.

    h = W0 x + s · Λ_b B Λ_d A x          A: (r, in)   B: (out, r)   d: (r,)   b: (out,)

- LoRA (Hu et al., 2021, arXiv:2106.09685): A, B per layer and trained; d, b absent; s = α/r.
- VeRA (Kopiczko et al., ICLR 2024, arXiv:2310.11454): A, B one frozen random pair for the
  whole model, sized to the largest layer and sliced; d, b per layer and trained; s = 1.
- Tied-LoRA (Renduchintala et al., NAACL 2024, arXiv:2311.09578): A, B tied across layers
  of one kind and trained; d (the paper's u) and b (its v) trained per layer or absent.

Which of A, B, d, b is absent, trained, tied, random or frozen is data (`LowRankConfig`);
this module only resolves each part to a tensor and applies the formula.

Two ways to compute the same thing; `forward` takes the one with fewer FLOPs:
- per token:  h = s · b ⊙ (B (d ⊙ (A x)))         ~ N·r·(in+out) multiply-adds (×3 to train)
- dense:      y = (W0 + s · ΔW) x, ΔW = Λ_b B Λ_d A  ~ r·in·out, plus N·in·out for ∂ΔW to train
At high rank (VeRA's r = 256…1024) the dense form wins for training-sized batches; it runs as
one autograd function (dense.py) that keeps only x and rebuilds ΔW in the backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..targets import weight_oi
from .base import AdapterLayer, SharedTensors
from .dense import DenseLowRank


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
        if name == "A":
            return t[:, : self.in_features]  # (r, in)
        return t[: self.out_features] if name in ("B", "b") else t  # B (out, r), b (out,), d (r,)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = Λ_b B Λ_d A, (out, in)."""
        A, B, d, b = (self.part(n) for n in "ABdb")
        if d is not None:
            A = d[:, None] * A  # (r, in)
        if b is not None:
            B = b[:, None] * B  # (out, r)
        return B @ A  # (out, in)

    def flops(self, n_tokens: int, training: bool) -> tuple[int, int]:
        """Multiply-adds of (per-token, dense) forms for n_tokens rows; used to pick one."""
        i, o, r = self.in_features, self.out_features, self.r
        per_token = n_tokens * r * (i + o)
        dense = r * i * o + i * o
        if training:  # ∂A, ∂B, ∂x through the chain vs ∂W = gᵀx then ∂A, ∂B from it
            per_token, dense = 3 * per_token, 3 * r * i * o + n_tokens * i * o
        return per_token, dense

    def use_dense(self, x: torch.Tensor) -> bool:
        parts = [p for p in (self.part(n) for n in "ABdb") if p is not None]
        training = torch.is_grad_enabled() and any(p.requires_grad for p in parts)
        if training and not isinstance(self.drop, nn.Identity) and self.drop.training:
            return False  # dropout applies to the adapter's input only: the dense form cannot express it
        if not isinstance(self.base.weight, nn.Parameter) or self.base.weight.dtype not in (
                torch.float32, torch.bfloat16, torch.float16):
            return False  # a quantised base weight is never materialised here
        per_token, dense = self.flops(x.numel() // x.shape[-1], training)
        return dense < per_token

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        A, B, d, b = (self.part(n) for n in "ABdb")
        if self.use_dense(x):
            if not torch.is_autocast_enabled(x.device.type):  # keeps only x; ΔW rebuilt in the backward
                return DenseLowRank.apply(x, weight_oi(self.base), self.base.bias, A, B, d, b, self.scale)
            W = weight_oi(self.base) + self.scale * self.delta_weight().to(self.base.weight.dtype)
            return F.linear(x, W, self.base.bias)  # (B, T, out)
        y = self.base(x)  # (B, T, out)
        h = F.linear(self.drop(x).to(A.dtype), A)  # (B, T, r)
        if d is not None:
            h = h * d  # (B, T, r)
        if b is None:  # y + s·h Bᵀ as one GEMM: no extra pass over (B, T, out) either way
            out = torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, self.r).to(y.dtype), B.T.to(y.dtype),
                              alpha=self.scale)
            return out.view(y.shape)
        h = F.linear(h, B)  # (B, T, out)
        return torch.addcmul(y, h.to(y.dtype), b.to(y.dtype), value=self.scale)  # y + s·b⊙h in one pass

    def merge_into(self, weight, bias):
        return weight + self.scale * self.delta_weight().float(), bias

    def unmerge_from(self, weight, bias):
        return weight - self.scale * self.delta_weight().float(), bias
