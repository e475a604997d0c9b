"""Full fine-tuning of the linear layers, as an adapter: every targeted weight trains.

    h = (W0 + ΔW) x + b        ΔW (out, in), trained, starts at 0

The update is kept apart from the frozen W0, so full fine-tuning goes through the same
contract as every method: the trained tensors are declared (group `matrix`), the base stays
untouched until merged, and `merge` (or `export --format merged`) writes the fine-tuned
weights. This is the paper's setting for gisting (Mu et al. fine-tune the whole model; the
embedding and norms stay frozen here, the gist row trains through adapters/gist.py). It costs
a second copy of every targeted weight plus AdamW's two moments: four times the targeted
weights, against the base's one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..configs import field
from ..models.layers import dims, get_module, weight_oi
from .protocol import AdapterRoot, SiteAdapter
from .registry import AdapterConfig, Method, register_method, register_preset
from .targets import match_targets


@dataclass
class FullConfig(AdapterConfig):
    """Full fine-tuning of the targeted linear layers (a trained ΔW per layer)."""

    method: str = field("full", "adapter family")
    preset: str = field("full", "the preset this config came from (informational)")
    targets: list[str] = field(["all-linear"], "layers that train: 'all-linear', 'ffn', 'attention', names, globs")


class FullLinear(SiteAdapter):
    """(W0 + ΔW) x + b."""

    def __init__(self, base: nn.Module, root: AdapterRoot):
        super().__init__(root)
        self.in_features, self.out_features = dims(base)
        w = weight_oi(base)
        dtype = w.dtype if torch.is_floating_point(w) else torch.float32
        self.declare("delta", torch.zeros(self.out_features, self.in_features, device=w.device, dtype=dtype), "matrix")

    def forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return base(x) + x @ self.delta.to(x.dtype).T  # W0 x + b + ΔW x                       (B, T, out)

    def merge_into(self, weight, bias):
        return weight + self.delta.float(), bias

    def unmerge_from(self, weight, bias):
        return weight - self.delta.float(), bias


def inject_full(model: nn.Module, cfg: FullConfig, root: AdapterRoot) -> dict[str, FullLinear]:
    return {name: FullLinear(get_module(model, name), root) for name in match_targets(model, cfg.targets)}


register_method(Method("full", FullConfig, inject_full))
register_preset("full", lambda: FullConfig(), aliases=("full-finetune",))
