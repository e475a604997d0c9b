"""PESC, upcycled: a transformers causal LM whose FFN blocks are mixtures of adapter experts.

This file travels with a model that `slimtune upcycle` exported, as its modelling code; it needs
torch and transformers only. Load the directory with

    AutoModelForCausalLM.from_pretrained(directory, trust_remote_code=True)

The directory's config.json has a model_type of its own, "slimtune_pesc" (PESCConfig below, the
base's config class under that name), and an `auto_map` to this file: without the flag,
transformers refuses the directory rather than build the dense base with its FFNs left random.

Each FFN block E(x) of the base architecture becomes (Wu et al., EMNLP 2024):

    u = E(x);  w = top-k softmax of x W_rᵀ;  y = u + s · Σ_j w_j W_up,j GELU(W_down,j u)

with the FFN computed once per token and only the chosen experts' adapters run. The settings
are the config's `pesc` section; the LoRA the model was trained with is merged into its weights.
"""

import torch
import torch.nn.functional as F
import transformers
from torch import nn

BASE_CLASS = "LlamaForCausalLM"  # the exporter writes the base architecture's class here


class PESCBlock(nn.Module):
    def __init__(self, base: nn.Module, experts: int, top_k, renormalize: bool, width: int, scale: float,
                 hidden: int):
        super().__init__()
        self.base = base
        self.W_r = nn.Parameter(torch.zeros(experts, hidden))  # (n, d)
        self.W_down = nn.Parameter(torch.zeros(experts, width, hidden))  # (n, a, d)
        self.W_up = nn.Parameter(torch.zeros(experts, hidden, width))  # (n, d, a)
        self.top_k, self.renormalize, self.scale = top_k, renormalize, scale

    def weights(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x.float(), self.W_r.float())  # (..., n), float32
        probs = torch.softmax(logits, -1)
        if self.top_k is None or self.top_k >= logits.shape[-1]:
            return probs
        kept, idx = logits.topk(self.top_k, -1)
        if self.renormalize:
            return torch.zeros_like(probs).scatter(-1, idx, torch.softmax(kept, -1))
        return probs * torch.zeros_like(probs).scatter(-1, idx, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = self.base(x)  # the shared FFN, once per token                        (B, T, d)
        w = self.weights(x).reshape(-1, self.W_r.shape[0])  # (N, n)
        rows = u.reshape(-1, u.shape[-1])  # (N, d)
        out = torch.zeros_like(rows)
        for i in range(w.shape[1]):  # each expert's tokens alone
            idx = w[:, i].nonzero().squeeze(1)
            if idx.numel():
                z = F.gelu(rows[idx] @ self.W_down[i].T)  # (N_i, a)
                out.index_add_(0, idx, (z @ self.W_up[i].T) * w[idx, i, None].to(rows.dtype))
        return u + self.scale * out.view(u.shape)


def upcycle(model: nn.Module, pesc: dict) -> None:
    """Replace every FFN block (modules named pesc['block']) with its PESC mixture, in place."""
    for name, module in list(model.named_modules()):
        if name.rsplit(".", 1)[-1] == pesc["block"]:
            parent, _, leaf = name.rpartition(".")
            holder = model.get_submodule(parent) if parent else model
            setattr(holder, leaf, PESCBlock(module, pesc["experts"], pesc["top_k"], pesc["renormalize"],
                                            pesc["width"], pesc["scale"], pesc["hidden"]))


Base = getattr(transformers, BASE_CLASS)


class PESCConfig(Base.config_class):
    """The base architecture's config, plus `pesc` (this file's settings), under a model_type of its own."""

    model_type = "slimtune_pesc"


class PESCForCausalLM(Base):
    config_class = PESCConfig

    def __init__(self, config):
        super().__init__(config)
        upcycle(self, config.pesc)
