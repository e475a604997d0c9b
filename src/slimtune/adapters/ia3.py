"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations.

Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", NeurIPS 2022 (arXiv:2205.05638). Learned vectors rescale the keys, the values and
the FFN intermediate activation:

    k' = l_k ⊙ (W_k x)        v' = l_v ⊙ (W_v x)        y = W_down (l_ff ⊙ γ(W_1 x))

So a site scales either a layer's output (k, v) or its input (the FFN down projection).
Vectors start at 1: the model equals the base model at step 0. GPT-2 fuses q, k, v into one
layer; there `span` picks the fraction of output features that is scaled (k and v).
MoV (Zadouri et al., ICLR 2024) will replace `l` with a routed mixture of such vectors.
"""

from __future__ import annotations

import torch
from torch import nn

from .base import AdapterLayer


class IA3Linear(AdapterLayer):
    def __init__(self, base: nn.Module, where: str, span: tuple[float, float], init: torch.Tensor):
        super().__init__(base)
        if where not in ("output", "input"):
            raise ValueError(f"where={where!r}: an (IA)3 site scales the 'output' or the 'input'")
        self.where = where
        self.start = round(span[0] * self.out_features) if where == "output" else 0
        self.stop = round(span[1] * self.out_features) if where == "output" else self.in_features
        self.l = nn.Parameter(init)  # (stop - start,)

    def adapter_params(self) -> dict[str, nn.Parameter]:
        return {"l": self.l}

    def full_vector(self) -> torch.Tensor:
        """l padded with ones to the whole scaled dimension, (out,) or (in,)."""
        n = self.out_features if self.where == "output" else self.in_features
        if self.start == 0 and self.stop == n:
            return self.l
        ones = self.l.new_ones
        return torch.cat([ones(self.start), self.l, ones(n - self.stop)])

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        if self.where == "input":
            return self.base(x * self.full_vector().to(x.dtype))  # (B, T, in) scaled, then W0
        y = self.base(x)  # (B, T, out)
        return y * self.full_vector().to(y.dtype)

    def merge_into(self, weight, bias):
        l = self.full_vector().float()
        if self.where == "input":
            return weight * l[None, :], bias  # scale columns
        return weight * l[:, None], (None if bias is None else bias * l)  # scale rows and bias

    def unmerge_from(self, weight, bias):
        l = self.full_vector().float()
        if (l == 0).any():
            raise ValueError("cannot unmerge (IA)3: a vector entry is 0, so the base weight was lost when merging; "
                             "reload the base model and the adapter instead")
        if self.where == "input":
            return weight / l[None, :], bias
        return weight / l[:, None], (None if bias is None else bias / l)
