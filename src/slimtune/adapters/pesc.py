"""PESC: sparse upcycling with adapter experts (Wu et al., EMNLP 2024, arXiv:2401.02731; the
Camelidae models).

Each dense FFN block E(x) becomes a mixture of n experts that share E's frozen weights and
differ only by a bottleneck adapter on its output:

    u = E(x)                                          computed once per token: every expert shares it
    w, idx = top-k of x W_rᵀ, softmax over the kept k  W_r: (n, d), no bias, float32
    y = u + s · Σ_j w_j · Adapter_{idx_j}(u)
    Adapter_i(u) = W_up,i GELU(W_down,i dropout(u))   W_down,i: (a, d), W_up,i: (d, a), no bias

W_up = 0 at init, so the mixture equals the dense model at step 0. The router learns from the
Switch load-balancing loss (routing.py) and, through w, from the language-modelling loss.
Only the adapters are dispatched, one of two ways (`dispatch`): `dense` (the default, the
faster on the machines measured: bench/mixtures.py) runs every adapter on every token as two
products with the experts stacked, W_up,cat ((w ⊗ 1_a) ⊙ GELU(W_down,cat u)), n·N token-adapters;
`gather` takes each expert's tokens and runs its adapter on them alone, k·N token-adapters. The rest of the
model trains with LoRA (`lora_*`), over a 4-bit base if the base is quantised (the QLoRA of
the paper); adapters and routers stay in full precision.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import field
from ..errors import Problems
from ..models.layers import logical_modules
from .inject import add_adapter
from .lowrank import LowRankConfig, inject_lowrank
from .protocol import AdapterRoot, SiteAdapter
from .registry import AdapterConfig, Method, preset, register_method, register_preset
from .routing import Routed, init_router, routing_problems
from .targets import FFN_BLOCKS, model_type


@dataclass
class PESCConfig(AdapterConfig):
    """PESC: each FFN block upcycled into n experts that share it and differ by an adapter."""

    method: str = field("pesc", "adapter family")
    preset: str = field("pesc", "the preset this config came from (informational)")
    experts: int = field(8, "experts per FFN block")
    top_k: int | None = field(2, "experts per token")
    renormalize: bool = field(True, "softmax over the kept logits (the paper's router)")
    width: int = field(64, "the adapters' bottleneck a (Camelidae at 7B: 512)")
    scale: float = field(0.25, "s, the adapters' scale")
    dropout: float = field(0.0, "dropout on the adapters' input u")
    block: str | None = field(None, "the FFN modules' name (null: the architecture's, e.g. mlp)")
    balance: float = field(0.01, "weight of the Switch load-balancing loss")
    z_loss: float = field(0.0, "weight of the router z-loss")
    dispatch: str = field("dense", "dense (every expert on every token, stacked: two products) | gather (each "
                          "expert's tokens alone)")
    lora_r: int = field(8, "rank of the LoRA on the rest of the model (the paper at 7B: 64); 0 = none")
    lora_alpha: float = field(16.0, "LoRA's alpha")
    lora_dropout: float = field(0.0, "LoRA's dropout (the paper: 0.1)")
    lora_targets: list[str] = field(["all-linear"], "layers that get LoRA (the shared FFN's included)")
    seed: int = field(0, "seed of the adapters', routers' and LoRA's initialisation")

    def problems(self, p: Problems) -> None:
        routing_problems(p, self.experts, self.top_k, self.balance, self.z_loss)
        if self.width < 1:
            p.add(f"width={self.width}", "the bottleneck needs at least one unit", "use e.g. width=64")
        if self.dispatch not in ("gather", "dense"):
            p.add(f"dispatch={self.dispatch!r}", "not a dispatch", "use 'gather' or 'dense'")
        if self.lora_r < 0:
            p.add(f"lora_r={self.lora_r}", "a rank is not negative", "use 0 for no LoRA, or e.g. 8")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.lora_dropout < 1.0:
            p.add(f"dropout={self.dropout}, lora_dropout={self.lora_dropout}", "dropout is a probability in [0, 1)",
                  "use e.g. 0.0 or 0.1")


class PESCBlock(Routed, SiteAdapter):
    """y = u + s · Σ_j w_j W_up,j GELU(W_down,j u), u = the shared FFN's output."""

    mergeable = False

    def __init__(self, root: AdapterRoot, cfg: PESCConfig, d: int, like: torch.Tensor, gen: torch.Generator):
        super().__init__(root)
        n, a = cfg.experts, cfg.width
        self.s, self.dispatch = cfg.scale, cfg.dispatch
        self.dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        dev, dtype = like.device, like.dtype if torch.is_floating_point(like) else torch.float32
        bound = 1 / d ** 0.5  # nn.Linear's default init for W_down
        W_down = torch.empty(n, a, d).uniform_(-bound, bound, generator=gen).to(device=dev, dtype=dtype)
        self.declare("W_r", init_router(n, d, gen, dev, dtype), "router")  # (n, d)
        self.declare("W_down", W_down, "matrix")  # (n, a, d)
        self.declare("W_up", torch.zeros(n, d, a, device=dev, dtype=dtype), "matrix")  # (n, d, a)
        self.set_routing(cfg)

    def experts_out(self, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Σ_j w_j Adapter_j(u) for rows u (N, d) and weights w (N, n), zero where not routed."""
        if self.dispatch == "dense":  # every adapter on every token, stacked: two plain products
            n, a, d = self.W_down.shape
            z = F.gelu(u @ self.W_down.reshape(n * a, d).T)  # (N, n·a)   every expert's bottleneck
            z = z * w.to(u.dtype).repeat_interleave(a, 1)  # (N, n·a)    weighted, 0 where not routed
            return z @ self.W_up.permute(0, 2, 1).reshape(n * a, d)  # (N, d)   Σ_j w_j W_up,j z_j
        out = torch.zeros_like(u)
        for i in range(w.shape[1]):  # each expert's tokens alone: k·N token-adapters in all
            idx = w[:, i].nonzero().squeeze(1)  # (N_i,)
            if idx.numel():
                z = F.gelu(u[idx] @ self.W_down[i].T)  # (N_i, a)
                out.index_add_(0, idx, (z @ self.W_up[i].T) * w[idx, i, None].to(u.dtype))  # (N_i, d)
        return out

    def forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        u = base(x)  # the shared FFN, once per token                              (B, T, d)
        w = self.route(x, self.W_r)  # (B, T, n), k non-zero per token
        moe = self.experts_out(self.dropout(u).reshape(-1, u.shape[-1]), w.reshape(-1, w.shape[-1]))
        return u + self.s * moe.view(u.shape).to(u.dtype)


def ffn_blocks(model: nn.Module, block: str | None) -> dict[str, nn.Module]:
    """The FFN modules by name: those whose last name is `block` (null: the architecture's)."""
    name = block or FFN_BLOCKS.get(model_type(model) or "")
    found = {n: m for n, m in logical_modules(model) if name and n.rsplit(".", 1)[-1] == name}
    if not found:
        p = Problems("no FFN blocks to upcycle")
        p.add(f"block={block!r} on model_type {model_type(model)!r}", "no module has that name",
              f"name the FFN module (known: {FFN_BLOCKS})")
        p.raise_if_any()
    return found


def inject_pesc(model: nn.Module, cfg: PESCConfig, root: AdapterRoot) -> dict[str, nn.Module]:
    gen = torch.Generator().manual_seed(cfg.seed)
    hidden = model.config.get_text_config().hidden_size if hasattr(model.config, "get_text_config") else None
    sites: dict[str, nn.Module] = {}
    for name, block in ffn_blocks(model, cfg.block).items():
        like = next(block.parameters())
        d = hidden or like.shape[-1]
        sites[name] = PESCBlock(root, cfg, d, like, gen)
    if cfg.lora_r:
        sites.update(inject_lowrank(model, LowRankConfig(preset="lora", r=cfg.lora_r, alpha=cfg.lora_alpha,
                                                         targets=cfg.lora_targets, dropout=cfg.lora_dropout,
                                                         seed=cfg.seed), root))
    return sites


def upcycle(model: nn.Module, **overrides) -> nn.Module:
    """Turn each FFN of `model` into PESC's mixture (in place; the model is the dense one at
    step 0). The same as add_adapter(model, preset("pesc", **overrides))."""
    return add_adapter(model, preset("pesc", **overrides))


register_method(Method("pesc", PESCConfig, inject_pesc))
register_preset("pesc", lambda experts=8, width=64: PESCConfig(experts=experts, width=width))
