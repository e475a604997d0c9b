"""MoV: a mixture of (IA)³ vectors (Zadouri et al., "Pushing Mixture of Experts to the Limit",
ICLR 2024, arXiv:2309.05444).

Each (IA)³ vector becomes a per-token soft mixture of E expert vectors, mixed by a router:

    p(x) = softmax(x W_rᵀ)          (per token, float32; W_r: (E, in), no bias, N(0, 0.02²))
    l(x) = p(x) V                   V: (E, n), every row initialised to 1
    k' = l(·) ⊙ (W_k x)   v' = l(·) ⊙ (W_v x)   y = W_down (l(·) ⊙ h)

V starts at 1, so l(x) = 1 whatever the router says and the model equals the base model at
step 0. The router reads, as `router_input` chooses:
- `scaled` (default, the authors' code): the tensor being scaled; at k and v, one routing per
  attention head, a head's slice of the k or v output against one router shared by the heads
  (W_r: (E, head_dim)), and each head mixing its own slice of the expert vectors;
- `hidden` (the paper's figure): the wrapped layer's input, the hidden state at k and v.
At the FFN site the scaled tensor is the FFN's intermediate activation, which is the down
projection's input, so both choices read the same. Mixing is soft by default (the released
configs); `top_k` routes each token to its k largest experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..configs import field
from ..errors import Problems
from ..models.layers import dims, get_module
from .ia3 import ia3_sites
from .protocol import AdapterRoot, SiteAdapter
from .registry import AdapterConfig, Method, register_method, register_preset
from .routing import Routed, init_router, routing_problems


@dataclass
class MoVConfig(AdapterConfig):
    """MoV: a per-token mixture of E (IA)³ vectors at each (IA)³ site."""

    method: str = field("mov", "adapter family")
    preset: str = field("mov", "the preset this config came from (informational)")
    experts: int = field(10, "expert vectors per site (MoV-10)")
    router_input: str = field("scaled", "scaled (the tensor being scaled, per head at k and v: the authors' "
                              "code) | hidden (the layer's input hidden state: the paper's figure)")
    top_k: int | None = field(None, "route each token to its k largest experts; null = soft merging of all")
    renormalize: bool = field(True, "with top_k: softmax over the kept logits (else: over all, then zeroed)")
    balance: float = field(0.0, "weight of the Switch load-balancing loss (0: none, as the paper)")
    z_loss: float = field(0.0, "weight of the router z-loss")
    scale_outputs: list[str] | None = field(None, "patterns whose outputs are scaled; null = the architecture's k, v")
    scale_inputs: list[str] | None = field(None, "patterns whose inputs are scaled; null = the FFN down projection")
    seed: int = field(0, "seed of the routers' initialisation")

    def problems(self, p: Problems) -> None:
        routing_problems(p, self.experts, self.top_k, self.balance, self.z_loss)
        if self.router_input not in ("scaled", "hidden"):
            p.add(f"router_input={self.router_input!r}", "not a router input", "use 'scaled' or 'hidden'")


class MoVLinear(Routed, SiteAdapter):
    """l(x) ⊙ (W0 x) on an output site, W0 (l(x) ⊙ x) on an input site, l(x) = p(x) V."""

    mergeable = False

    def __init__(self, base: nn.Module, root: AdapterRoot, cfg: MoVConfig, where: str, span: tuple[float, float],
                 head_dim: int | None, gen: torch.Generator):
        super().__init__(root)
        self.in_features, self.out_features = dims(base)
        self.where = where
        self.start = round(span[0] * self.out_features) if where == "output" else 0
        self.stop = round(span[1] * self.out_features) if where == "output" else self.in_features
        n = self.stop - self.start
        # per head: the scaled output read head by head, each head mixing its slice of V
        self.heads = n // head_dim if cfg.router_input == "scaled" and where == "output" and head_dim \
            and n % head_dim == 0 else 1
        width = n // self.heads if cfg.router_input == "scaled" or where == "input" else self.in_features
        w = base.weight
        dtype = w.dtype if torch.is_floating_point(w) else torch.float32
        self.declare("V", torch.ones(cfg.experts, n, device=w.device, dtype=dtype), "vector")  # (E, n)
        self.declare("W_r", init_router(cfg.experts, width, gen, w.device, dtype), "router")  # (E, width)
        self.set_routing(cfg)

    def mixed(self, r_in: torch.Tensor) -> torch.Tensor:
        """l(x) = p(x) V for the router's input (B, T, width·heads), as (B, T, n)."""
        B, T = r_in.shape[:2]
        E, n = self.V.shape
        if self.heads == 1:
            w = self.route(r_in, self.W_r)  # (B, T, E)
            return w.to(self.V.dtype) @ self.V  # (B, T, n)
        w = self.route(r_in.reshape(B, T, self.heads, -1), self.W_r)  # (B, T, H, E)
        V = self.V.view(E, self.heads, n // self.heads)  # (E, H, n/H)
        return torch.einsum("bthe,ehd->bthd", w.to(V.dtype), V).reshape(B, T, n)

    def forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.where == "input":
            return base(x * self.mixed(x).to(x.dtype))  # W0 (l(x) ⊙ x)                (B, T, out)
        y = base(x)  # (B, T, out)
        ys = y[..., self.start:self.stop]  # the scaled part (k and v for GPT-2's c_attn)
        l = self.mixed(ys if self.router_input == "scaled" else x).to(y.dtype)  # (B, T, n)
        if self.start == 0 and self.stop == self.out_features:
            return y * l
        return torch.cat([y[..., :self.start], ys * l, y[..., self.stop:]], -1)


def head_dim(model: nn.Module) -> int | None:
    cfg = model.config
    for name in ("head_dim", "d_kv"):
        if getattr(cfg, name, None):
            return getattr(cfg, name)
    heads = getattr(cfg, "num_attention_heads", None) or getattr(cfg, "n_head", None)
    hidden = getattr(cfg, "hidden_size", None) or getattr(cfg, "n_embd", None)
    return hidden // heads if heads and hidden else None


def inject_mov(model: nn.Module, cfg: MoVConfig, root: AdapterRoot) -> dict[str, MoVLinear]:
    gen = torch.Generator().manual_seed(cfg.seed)
    hd = head_dim(model)
    return {name: MoVLinear(get_module(model, name), root, cfg, where, span, hd, gen)
            for name, where, span in ia3_sites(model, cfg.scale_outputs, cfg.scale_inputs)}


register_method(Method("mov", MoVConfig, inject_mov))
register_preset("mov", lambda experts=10: MoVConfig(experts=experts))
