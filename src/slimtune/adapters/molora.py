"""MoLoRA: a mixture of LoRA experts (Zadouri et al., ICLR 2024, arXiv:2309.05444), and MixLoRA's
top-2 configuration of it (Li et al., 2024, arXiv:2404.15159).

E LoRA experts of rank r at a layer, mixed per token by a router:

    h = W0 x + s · Σ_i p_i(x) B_i A_i x           p(x) = softmax(x W_rᵀ) (float32), s = α / r

Stacked along the rank, that is the low-rank family's formula with a per-token d:

    h = W0 x + s · B_cat diag(p(x) ⊗ 1_r) A_cat x      A_cat = [A_1; …; A_E] (E·r, in)
                                                       B_cat = [B_1 … B_E]   (out, E·r)

so a MoLoRA layer is a low-rank layer of rank E·r whose d is the router's weights, each
repeated r times. It runs through the same fast path as LoRA (the fused per-token form, its
down-projection shared with sibling layers); no Python loop over experts. A_i ~ N(0, 0.02²)
and B_i = 0, as the authors' code: the model equals the base at step 0 whatever the router.
The router reads the layer's input x (the authors' code). `top_k` keeps each token's k largest
experts; MixLoRA's preset puts top-2 MoLoRA with the load-balancing loss on the FFN and plain
LoRA on the attention (`lora_targets`), as MixLoRA does. MixLoRA shares one router between the
FFN's projections; here each projection routes on its own (one router per site).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import field
from ..errors import Problems
from ..models.layers import dims, get_module
from .fast import lowrank as fast_path
from .lowrank import LowRankConfig, adapter_dtype, inject_lowrank
from .protocol import AdapterRoot, SiteAdapter
from .registry import AdapterConfig, Method, register_method, register_preset
from .routing import Routed, init_router, routing_problems
from .targets import match_targets


@dataclass
class MoLoRAConfig(AdapterConfig):
    """MoLoRA: E LoRA experts per layer, mixed per token by a router."""

    method: str = field("molora", "adapter family")
    preset: str = field("molora", "the preset this config came from (informational)")
    experts: int = field(10, "LoRA experts per layer")
    r: int = field(4, "rank of each expert")
    alpha: float = field(16.0, "scale s = alpha / r")
    targets: list[str] = field(["all-linear"], "layers that get a mixture ('ffn', 'attention', names, globs)")
    lora_targets: list[str] = field([], "layers that get plain LoRA of the same rank and alpha, in the same "
                                    "adapter (MixLoRA: the attention)")
    top_k: int | None = field(None, "route each token to its k largest experts; null = soft merging of all")
    renormalize: bool = field(True, "with top_k: softmax over the kept logits (else: over all, then zeroed)")
    balance: float = field(0.0, "weight of the Switch load-balancing loss (MixLoRA: 0.01)")
    z_loss: float = field(0.0, "weight of the router z-loss")
    dropout: float = field(0.0, "dropout on the experts' input x")
    seed: int = field(0, "seed of the experts' and routers' initialisation")

    @property
    def scale(self) -> float:
        return self.alpha / self.r

    def problems(self, p: Problems) -> None:
        routing_problems(p, self.experts, self.top_k, self.balance, self.z_loss)
        if self.r <= 0:
            p.add(f"r={self.r}", "the rank must be a positive integer", "use e.g. r=4")
        if not 0.0 <= self.dropout < 1.0:
            p.add(f"dropout={self.dropout}", "dropout is a probability in [0, 1)", "use e.g. 0.0 or 0.1")
        if not self.targets:
            p.add("targets=[]", "no layer would get a mixture", "use e.g. ['all-linear'] or ['ffn']")


class MoLoRALinear(Routed, SiteAdapter):
    """h = W0 x + s · B_cat diag(p(x) ⊗ 1_r) A_cat x around one linear layer."""

    mergeable = False
    per_token_d = True  # the fast path keeps the per-token form: there is no single ΔW to fold

    def __init__(self, base: nn.Module, root: AdapterRoot, cfg: MoLoRAConfig, gen: torch.Generator):
        super().__init__(root)
        self.in_features, self.out_features = dims(base)
        self.experts, self.expert_rank = cfg.experts, cfg.r
        self.r, self.scale = cfg.experts * cfg.r, cfg.scale  # the stacked rank E·r, as the fast path reads it
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.shared_keys: dict[str, str] = {}  # nothing shared between layers
        w = base.weight
        dtype = adapter_dtype(w)
        A = (torch.randn(self.r, self.in_features, generator=gen) * 0.02).to(device=w.device, dtype=dtype)
        self.declare("A", A, "matrix")  # (E·r, in)    experts stacked along the rank
        self.declare("B", torch.zeros(self.out_features, self.r, device=w.device, dtype=dtype), "matrix")  # (out, E·r)
        self.declare("W_r", init_router(cfg.experts, self.in_features, gen, w.device, dtype), "router")  # (E, in)
        self.set_routing(cfg)

    def part(self, name: str) -> torch.Tensor | None:
        return getattr(self, name) if name in ("A", "B") else None

    def parts(self) -> tuple:
        return self.A, self.B, None, None

    def gate(self, x: torch.Tensor) -> torch.Tensor:
        """d(x) = p(x) ⊗ 1_r: each expert's weight repeated over its r rank slots, (B, T, E·r)."""
        w = self.route(x, self.W_r)  # (B, T, E)
        return w[..., None].expand(*w.shape, self.expert_rank).reshape(*w.shape[:-1], -1)

    def forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        d = self.gate(x)  # (B, T, E·r)
        y = fast_path(self, base, x, d)  # the same formula, fused; None where it does not apply
        if y is not None:
            return y
        y = base(x)  # W0 x (+ bias)                                          (B, T, out)
        a = F.linear(self.dropout(x).to(self.A.dtype), self.A)  # A_cat x         (B, T, E·r)
        h = F.linear(a * d.to(a.dtype), self.B)  # B_cat diag(p ⊗ 1_r) A_cat x    (B, T, out)
        return y + (self.scale * h).to(y.dtype)


def inject_molora(model: nn.Module, cfg: MoLoRAConfig, root: AdapterRoot) -> dict[str, nn.Module]:
    gen = torch.Generator().manual_seed(cfg.seed)
    mixed = match_targets(model, cfg.targets)
    sites = {name: MoLoRALinear(get_module(model, name), root, cfg, gen) for name in mixed}
    if cfg.lora_targets:
        lora = LowRankConfig(preset="lora", r=cfg.r, alpha=cfg.alpha, targets=cfg.lora_targets,
                             dropout=cfg.dropout, seed=cfg.seed)
        plain = inject_lowrank(model, lora, root)
        both = sorted(set(plain) & set(sites))
        if both:
            p = Problems("invalid MoLoRA targets")
            p.add(f"layers {both[:3]}", "they are in both targets and lora_targets",
                  "give each layer either a mixture or plain LoRA")
            p.raise_if_any()
        sites.update(plain)
    return sites


register_method(Method("molora", MoLoRAConfig, inject_molora))
register_preset("molora", lambda experts=10, r=4: MoLoRAConfig(experts=experts, r=r))
register_preset("mixlora", lambda experts=8, r=8: MoLoRAConfig(
    preset="mixlora", experts=experts, r=r, targets=["ffn"], lora_targets=["attention"], top_k=2,
    renormalize=True, balance=0.01))
