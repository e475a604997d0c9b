"""(IA)³: Infused Adapter by Inhibiting and Amplifying Inner Activations.

Liu et al., "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", NeurIPS 2022 (arXiv:2205.05638). Learned vectors rescale the keys, the values and
the FFN intermediate activation:

    k' = l_k ⊙ (W_k x)        v' = l_v ⊙ (W_v x)        y = W_down (l_ff ⊙ γ(W_1 x))

So a site scales either a layer's output (k, v) or its input (the FFN down projection).
Vectors start at 1: the model equals the base model at step 0. GPT-2 fuses q, k, v into one
layer; there `span` picks the fraction of output features that is scaled (k and v).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..configs import field
from ..errors import Problems
from ..models.layers import dims, get_module
from .fast.rows import ia3_rows
from .protocol import AdapterRoot, SiteAdapter
from .registry import AdapterConfig, Method, register_method, register_preset
from .targets import match_targets, model_type

# The sites per architecture: (pattern, "output" | "input", span of output features scaled).
# GPT-2 fuses q, k, v into c_attn (out = 3 * hidden); only the k and v thirds are scaled.
_LLAMA_LIKE = [("k_proj", "output", (0.0, 1.0)), ("v_proj", "output", (0.0, 1.0)), ("down_proj", "input", (0.0, 1.0))]
SITES: dict[str, list[tuple[str, str, tuple[float, float]]]] = {
    "llama": _LLAMA_LIKE, "mistral": _LLAMA_LIKE, "qwen2": _LLAMA_LIKE, "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE, "gemma2": _LLAMA_LIKE, "phi3": _LLAMA_LIKE,
    "gpt2": [("attn.c_attn", "output", (1 / 3, 1.0)), ("mlp.c_proj", "input", (0.0, 1.0))],
    "t5": [("k", "output", (0.0, 1.0)), ("v", "output", (0.0, 1.0)), ("wo", "input", (0.0, 1.0))],
}


@dataclass
class IA3Config(AdapterConfig):
    """(IA)³: learned vectors scale the keys, the values and the FFN intermediate."""

    method: str = field("ia3", "adapter family")
    preset: str = field("ia3", "the preset this config came from (informational)")
    scale_outputs: list[str] | None = field(None, "patterns whose outputs are scaled; null = the architecture's k, v")
    scale_inputs: list[str] | None = field(None, "patterns whose inputs are scaled; null = the FFN down projection")
    init: float = field(1.0, "initial value of every vector (1 = the base model)")

    def problems(self, p: Problems) -> None:
        if self.scale_outputs == [] and self.scale_inputs == []:
            p.add("scale_outputs=[] and scale_inputs=[]", "no site would be scaled", "leave them null or name layers")


class IA3Linear(SiteAdapter):
    """l ⊙ (W0 x) on an output site, W0 (l ⊙ x) on an input site."""

    rows = staticmethod(ia3_rows)  # mixed batches: every row's l gathered (fast/rows.py)

    def __init__(self, base: nn.Module, root: AdapterRoot, where: str, span: tuple[float, float], init: torch.Tensor):
        super().__init__(root)
        if where not in ("output", "input"):
            raise ValueError(f"where={where!r}: an (IA)3 site scales the 'output' or the 'input'")
        self.in_features, self.out_features = dims(base)
        self.where = where
        self.start = round(span[0] * self.out_features) if where == "output" else 0
        self.stop = round(span[1] * self.out_features) if where == "output" else self.in_features
        self.declare("l", init, "vector")  # (stop - start,)

    def full_vector(self) -> torch.Tensor:
        """l padded with ones to the whole scaled dimension, (out,) or (in,)."""
        n = self.out_features if self.where == "output" else self.in_features
        if self.start == 0 and self.stop == n:
            return self.l
        ones = self.l.new_ones
        return torch.cat([ones(self.start), self.l, ones(n - self.stop)])

    def forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        if self.where == "input":
            return base(x * self.full_vector().to(x.dtype))  # W0 (l ⊙ x)          (B, T, out)
        y = base(x)  # W0 x (+ bias)                                                (B, T, out)
        return y * self.full_vector().to(y.dtype)  # l ⊙ (W0 x + bias)

    def merge_into(self, weight, bias):
        l = self.full_vector().float()
        if self.where == "input":
            return weight * l[None, :], bias  # scale columns
        return weight * l[:, None], (None if bias is None else bias * l)  # scale rows and bias

    def irreversible(self) -> str | None:
        zeros = int((self.l == 0).sum())
        return f"{zeros} entries of its vector l are 0, so the base weight they scale is lost" if zeros else None

    def unmerge_from(self, weight, bias):
        l = self.full_vector().float()
        if (l == 0).any():
            p = Problems("cannot unmerge (IA)3")
            p.add("a vector entry of 0", "the base weight it scaled was lost when merging",
                  "reload the base model and the adapter instead")
            p.raise_if_any()
        if self.where == "input":
            return weight / l[None, :], bias
        return weight / l[:, None], (None if bias is None else bias / l)


def ia3_sites(model: nn.Module, outputs: list[str] | None, inputs: list[str] | None):
    """[(name, where, span)]; None means the architecture's default sites."""
    table = SITES.get(model_type(model) or "")
    if (outputs is None or inputs is None) and table is None:
        p = Problems("(IA)3 needs its sites")
        p.add(f"model_type={model_type(model)!r}", "no default k/v/FFN sites are known for this architecture",
              f"pass scale_outputs=[...] and scale_inputs=[...] (known: {sorted(SITES)})")
        p.raise_if_any()
    sites: dict[str, tuple[str, tuple[float, float]]] = {}
    for pats, where in ((outputs, "output"), (inputs, "input")):
        spec = [(p, (0.0, 1.0)) for p in pats] if pats is not None else [(p, s) for p, w, s in table if w == where]
        for pat, span in spec:
            for name in match_targets(model, [pat], f"(IA)3 {where}s"):
                sites[name] = (where, span)
    return [(n, w, s) for n, (w, s) in sites.items()]


def inject_ia3(model: nn.Module, cfg: IA3Config, root: AdapterRoot) -> dict[str, IA3Linear]:
    out = {}
    for name, where, span in ia3_sites(model, cfg.scale_outputs, cfg.scale_inputs):
        layer = get_module(model, name)
        i, o = dims(layer)
        n = i if where == "input" else round(span[1] * o) - round(span[0] * o)
        dtype = layer.weight.dtype if torch.is_floating_point(layer.weight) else torch.float32
        out[name] = IA3Linear(layer, root, where, span, torch.full((n,), cfg.init, device=layer.weight.device,
                                                                   dtype=dtype))
    return out


register_method(Method("ia3", IA3Config, inject_ia3))
register_preset("ia3", lambda: IA3Config())
