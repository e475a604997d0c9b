"""Routers for the mixtures (MoV, MoLoRA, PESC): per-token expert weights, their auxiliary
losses and their statistics.

    logits = x W_rᵀ                        W_r: (E, in), no bias, init N(0, 0.02²), in float32
    soft:   p = softmax(logits)            every expert, weighted (MoV's and MoLoRA's default)
    top-k:  keep the k largest; softmax over the kept logits (renormalise: PESC, MixLoRA), or
            softmax over all and zero the rest (the MoV/MoLoRA code's top-k ablation)

Load balancing, the Switch Transformer's loss (Fedus et al., 2021), over a group of tokens:

    L_balance = n · Σ_i f_i · P_i          f_i: share of the group's token slots sent to expert i
                                           (under soft routing: each token's top-1 expert, as Switch)
                                           P_i: mean over the group of softmax(logits)_i (all experts)

f is a count and carries no gradient; the router learns through P. It is 1 for a uniform router
and n for one that sends everything to one expert. A group is one sequence: the loss is then a
sum over sequences, so however a window is split into micro-batches (and ranks) it gives the
same loss and gradient. Router z-loss (Zoph et al., 2022): mean over tokens of logsumexp(logits)².
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field as dc_field

import torch
import torch.nn.functional as F

from ..errors import Problems


@dataclass
class Routing:
    """How a site routes: soft (top_k None) or top-k, renormalised or not."""

    experts: int
    top_k: int | None = None
    renormalize: bool = True

    @property
    def soft(self) -> bool:
        return self.top_k is None or self.top_k >= self.experts

    def weights(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(w, probs): per-token expert weights (…, E), zero where an expert is not chosen, and the
        softmax over every expert (…, E), both float32, from float32 logits."""
        probs = softmax(logits)  # (..., E)
        if self.soft:
            return probs, probs
        kept, idx = logits.topk(self.top_k, -1)  # (..., k)
        if self.renormalize:  # softmax over the kept logits only
            w = torch.zeros_like(probs).scatter(-1, idx, softmax(kept))
        else:
            w = probs * torch.zeros_like(probs).scatter(-1, idx, 1.0)
        return w, probs


def slots(w: torch.Tensor, soft: bool) -> torch.Tensor:
    """(…, E) 1 where a token sends a slot to an expert: its top-1 under soft routing, else the
    experts it was routed to."""
    if soft:
        return F.one_hot(w.argmax(-1), w.shape[-1]).to(w.dtype)
    return (w > 0).to(w.dtype)


def balance_loss(w: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor, soft: bool) -> torch.Tensor:
    """Σ over sequences of (real tokens of the sequence) × n Σ_i f_i P_i (token-additive: the loop
    divides by the window's real tokens). w, probs: (B, T, E); mask: (B, T) real tokens."""
    m = mask.to(probs.dtype)[..., None]  # (B, T, 1)
    tokens = m.sum(1).clamp(min=1)  # (B, 1)
    chosen = slots(w, soft) * m  # (B, T, E) the slots each token sends
    f = chosen.sum(1) / chosen.sum((1, 2)).clamp(min=1)[:, None]  # (B, E) share of the sequence's slots
    P = (probs * m).sum(1) / tokens  # (B, E) mean router probability
    n = probs.shape[-1]
    return (tokens[:, 0] * n * (f.detach() * P).sum(-1)).sum()


def z_loss(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over real tokens of logsumexp(logits)² (token-additive)."""
    return (torch.logsumexp(logits, -1) ** 2 * mask.to(logits.dtype)).sum()


@dataclass
class RouterStats:
    """What a router did over the steps since it was last read: token slots per expert, the
    summed entropy of its distributions, and tokens seen."""

    load: torch.Tensor  # (E,) token slots per expert (soft routing: probability mass)
    entropy: float = 0.0  # summed over tokens, in nats
    tokens: int = 0
    groups: int = 1  # heads or other independent routings per token
    extra: dict = dc_field(default_factory=dict)

    def add(self, w: torch.Tensor, probs: torch.Tensor, mask: torch.Tensor, soft: bool) -> None:
        """Count one forward's routing: w, probs (..., E); mask (B, T) of real tokens, w's leading dims."""
        keep = mask.reshape(mask.shape + (1,) * (w.dim() - 1 - mask.dim())).expand(w.shape[:-1]).bool()
        with torch.no_grad():
            sent = w if soft else (w > 0).to(w.dtype)
            self.load += (sent * keep[..., None]).sum(tuple(range(w.dim() - 1))).to(self.load)
            ent = -(probs * probs.clamp_min(1e-12).log()).sum(-1)  # (...,)
            self.entropy += float((ent * keep).sum())
            self.tokens += int(keep.sum())

    def summary(self) -> dict:
        """{load: shares per expert, entropy: mean per token over its maximum log E, dropped: the
        share of tokens no expert took (none: slimtune's routers drop nothing), tokens}."""
        total = float(self.load.sum())
        E = self.load.numel()
        return {"load": [round(float(v) / total, 4) if total else 0.0 for v in self.load],
                "entropy": (self.entropy / self.tokens / math.log(E)) if self.tokens and E > 1 else 0.0,
                "dropped": 0.0, "tokens": self.tokens}


def init_router(experts: int, width: int, gen: torch.Generator, device, dtype) -> torch.Tensor:
    """W_r (E, in) ~ N(0, 0.02²), as the MoV/MoLoRA code initialises its routers."""
    return (torch.randn(experts, width, generator=gen) * 0.02).to(device=device, dtype=dtype)


def router_logits(x: torch.Tensor, W_r: torch.Tensor) -> torch.Tensor:
    """x W_rᵀ in float32 (…, E), whatever dtype the model runs in."""
    with torch.autocast(x.device.type, enabled=False):
        return F.linear(x.float(), W_r.float())


def softmax(logits: torch.Tensor) -> torch.Tensor:
    """softmax over the last dimension. Over a handful of experts CPU's kernel runs faster on the
    transposed layout (the experts as rows); the same values."""
    if logits.is_cpu and logits.shape[-1] <= 64:
        return torch.softmax(logits.transpose(-1, -2), -2).transpose(-1, -2)
    return torch.softmax(logits, -1)


class Routed:
    """Mixed into a site adapter that routes: its Routing, its auxiliary losses (reported while
    training) and its statistics (counted in training forwards while the adapter state's
    `count_routing` is on, read and reset by `take_stats`)."""

    def set_routing(self, cfg) -> None:
        self.routing = Routing(cfg.experts, cfg.top_k, cfg.renormalize)
        self.router_input = getattr(cfg, "router_input", "hidden")
        self.balance, self.z_weight = cfg.balance, cfg.z_loss
        self.stats: RouterStats | None = None

    def route(self, r_in: torch.Tensor, W_r: torch.Tensor) -> torch.Tensor:
        """Per-token expert weights (B, T, [H,] E) for the router input (B, T, [H,] width)."""
        logits = router_logits(r_in, W_r)  # (B, T, [H,] E), float32
        w, probs = self.routing.weights(logits)
        if self.training and torch.is_grad_enabled():  # a training forward: losses and statistics
            mask = self.token_mask(r_in)  # (B, T)
            soft = self.routing.soft
            if self.balance:
                if w.dim() == 4:  # one routing per head: each head of each sequence is a group
                    H = w.shape[2]
                    flat = (lambda t: t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[-1]))
                    total = balance_loss(flat(w), flat(probs), mask.repeat_interleave(H, 0), soft) / H
                else:
                    total = balance_loss(w, probs, mask, soft)
                self.report("balance", total, self.balance)
            if self.z_weight:
                m = mask if logits.dim() == 3 else mask[..., None].expand(logits.shape[:-1]) / logits.shape[2]
                self.report("z_loss", z_loss(logits, m), self.z_weight)
            if self.root.state.count_routing:
                if self.stats is None:
                    self.stats = RouterStats(torch.zeros(w.shape[-1], device=w.device))
                self.stats.add(w, probs, mask, soft)
        return w

    def take_stats(self) -> dict | None:
        """The routing counted since the last call, summarised, and a fresh count."""
        stats, self.stats = self.stats, None
        return None if stats is None or not stats.tokens else stats.summary()


def routing_problems(p: Problems, experts: int, top_k: int | None, balance: float, z: float) -> None:
    if experts < 1:
        p.add(f"experts={experts}", "a mixture needs at least one expert", "use e.g. experts=8")
    if top_k is not None and not 1 <= top_k <= experts:
        p.add(f"top_k={top_k}", f"must lie in 1..experts ({experts})", "use e.g. top_k=2, or null for soft mixing")
    for name, value in (("balance", balance), ("z_loss", z)):
        if value < 0:
            p.add(f"{name}={value}", "a loss weight is not negative", "give a value >= 0")
