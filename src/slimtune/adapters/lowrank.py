"""The low-rank family: LoRA, VeRA and Tied-LoRA as one formula.

    h = W0 x + s · Λ_b B Λ_d A x          A: (r, in)   B: (out, r)   d: (r,)   b: (out,)

- LoRA (Hu et al., 2021, arXiv:2106.09685): A, B per layer and trained; d, b absent; s = α/r
  (rsLoRA, Kalajdzievski 2023: s = α/√r).
- VeRA (Kopiczko et al., ICLR 2024, arXiv:2310.11454): A, B one frozen random pair for the
  whole model, sized to the largest layer and sliced; d, b per layer and trained; s = 1.
- Tied-LoRA (Renduchintala et al., NAACL 2024, arXiv:2311.09578): A, B tied across layers
  and trained; d (the paper's u) and b (its v) trained per layer, or absent.

Which of A, B, d, b is absent, trained, tied, random or frozen is data (`Part`); this file
resolves each part to a tensor and applies the formula. `LowRankLinear.forward` is the
reference, in plain autograd; the fast path (adapters/fast/) computes the same thing with
fused functions where it applies, and the tests hold the two equal.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..configs import field
from ..errors import Problems, did_you_mean
from ..models.layers import block, dims, get_module, kind
from .fast import lowrank as fast_path
from .fast.rows import lowrank_rows
from .protocol import AdapterRoot, SiteAdapter, init_tensor
from .registry import AdapterConfig, Method, register_method, register_preset
from .targets import match_targets

MODES = ("absent", "trained", "tied", "random", "frozen")
INITS = ("zeros", "ones", "kaiming_uniform", "he_uniform", "normal")
SHARES = ("kind", "model", "block")


@dataclass
class Part:
    """One factor of h = W0 x + s · Λ_b B Λ_d A x."""

    mode: str = field("absent", "absent (identity) | trained (per layer) | tied (shared, trained) | "
                      "random (shared, frozen, regenerated from the seed) | frozen (per layer, frozen at init)")
    init: str | float = field("zeros", "zeros | ones | kaiming_uniform (nn.Linear default, bound 1/sqrt(fan_in); "
                              "LoRA) | he_uniform (bound sqrt(6/fan_in); VeRA) | normal (std 0.02) | a number")
    share: str = field("kind", "for tied/random: 'kind' = one tensor per module kind (all q_proj share one), "
                       "'model' = one for every targeted layer, 'block' = one per transformer block; "
                       "sized to the largest layer that uses it and sliced")


@dataclass
class LowRankConfig(AdapterConfig):
    """The low-rank family h = W0 x + s · Λ_b B Λ_d A x (LoRA, VeRA, Tied-LoRA)."""

    method: str = field("lowrank", "adapter family")
    preset: str = field("custom", "the preset this config came from (informational)")
    r: int = field(8, "rank r of A (r x in) and B (out x r)")
    alpha: float | None = field(16.0, "scale s = alpha / r (alpha / sqrt(r) with rslora); null gives s = 1")
    rslora: bool = field(False, "rank-stabilised scaling s = alpha / sqrt(r) (rsLoRA)")
    A: Part = field(Part("trained", "kaiming_uniform"), "the down-projection A (r x in)")
    B: Part = field(Part("trained", "zeros"), "the up-projection B (out x r)")
    d: Part = field(Part("absent", "ones"), "the r-vector scaling A x (VeRA's d, Tied-LoRA's u)")
    b: Part = field(Part("absent", "ones"), "the out-vector scaling B (.) (VeRA's b, Tied-LoRA's v)")
    targets: list[str] = field(["all-linear"], "module-name patterns; 'all-linear' = every linear layer but the "
                               "LM head; 'attention-input' = q, k, v")
    dropout: float = field(0.0, "dropout on the adapter's input x")
    seed: int = field(0, "seed of the random and frozen tensors (regenerated from it on load)")
    save_frozen: bool = field(False, "also save frozen tensors instead of regenerating them from the seed")

    @property
    def scale(self) -> float:
        if self.alpha is None:
            return 1.0
        return self.alpha / (self.r ** 0.5 if self.rslora else self.r)

    def problems(self, p: Problems) -> None:
        if self.r <= 0:
            p.add(f"r={self.r}", "the rank must be a positive integer", "use e.g. r=8")
        if not 0.0 <= self.dropout < 1.0:
            p.add(f"dropout={self.dropout}", "dropout is a probability in [0, 1)", "use e.g. 0.0 or 0.1")
        if not self.targets:
            p.add("targets=[]", "no module would be adapted", "use ['all-linear'] or module names")
        present = {}
        for name in "ABdb":
            part: Part = getattr(self, name)
            if part.mode not in MODES:
                p.add(f"{name}.mode={part.mode!r}", "unknown mode" + did_you_mean(part.mode, MODES),
                      f"use one of {MODES}")
            if isinstance(part.init, str) and part.init not in INITS:
                p.add(f"{name}.init={part.init!r}", "unknown init" + did_you_mean(part.init, INITS),
                      f"use one of {INITS} or a number")
            if part.share not in SHARES:
                p.add(f"{name}.share={part.share!r}", "unknown sharing", f"use one of {SHARES}")
            if part.mode != "absent":
                present[name] = part
        for name in "AB":
            if name not in present:
                p.add(f"{name}.mode='absent'", "A and B carry the rank; the formula needs both",
                      "use trained/tied/random")
        zeros = [n for n, q in present.items() if q.init == "zeros" or (not isinstance(q.init, str) and q.init == 0)]
        if not any(q.mode in ("trained", "tied") for q in present.values()):
            p.add("all parts frozen", "nothing would train", "make at least one of A, B, d, b 'trained' or 'tied'")
        if not zeros:
            p.add("no zero-initialised part", "delta W would not be 0 at step 0, so the model would not start as "
                  "the base", "initialise exactly one trained part to zeros (LoRA: B, VeRA: b)")
        elif len(zeros) > 1:
            p.add(f"zero-initialised parts {zeros}", "with two zero factors every gradient of both vanishes: "
                  "they never move", "initialise only one of them to zeros (e.g. B random, b = 0)")
        elif present[zeros[0]].mode not in ("trained", "tied"):
            p.add(f"{zeros[0]}.init=zeros with mode {present[zeros[0]].mode!r}", "a frozen zero keeps delta W = 0 "
                  "forever", "train the zero-initialised part")


class LowRankLinear(SiteAdapter):
    """h = W0 x + s · Λ_b B Λ_d A x around one linear layer (nn.Linear or GPT-2's Conv1D)."""

    rows = staticmethod(lowrank_rows)  # mixed batches: every row's parts gathered (fast/rows.py)

    def __init__(self, base: nn.Module, config: LowRankConfig, root: AdapterRoot, shared_keys: dict[str, str],
                 local: dict[str, tuple[torch.Tensor, bool]]):
        super().__init__(root)
        self.in_features, self.out_features = dims(base)
        self.r, self.scale = config.r, config.scale
        self.dropout = nn.Dropout(config.dropout) if config.dropout > 0 else nn.Identity()
        self.shared_keys = shared_keys  # part name -> the root's tensor
        for name, (tensor, trained) in local.items():  # per-layer parts
            self.declare(name, tensor, ("matrix" if tensor.dim() == 2 else "vector") if trained else None)

    def part(self, name: str) -> torch.Tensor | None:
        """A, B, d or b for this layer: its own tensor, a slice of a shared one, or None (absent)."""
        key = self.shared_keys.get(name)
        if key is None:
            return getattr(self, name, None)
        t = getattr(self.root, key)
        # Slice only a larger tensor: a full slice would still cost a zero-filled gradient per layer.
        if name == "A":
            return t if t.shape[1] == self.in_features else t[:, : self.in_features]  # (r, in)
        if name in ("B", "b") and t.shape[0] != self.out_features:
            return t[: self.out_features]  # B (out, r), b (out,)
        return t

    def parts(self) -> tuple:
        return tuple(self.part(n) for n in "ABdb")

    def forward(self, base: nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = fast_path(self, base, x)  # the same formula, fused; None where it does not apply
        if y is not None:
            return y
        A, B, d, b = self.parts()
        y = base(x)  # W0 x (+ bias)                                        (B, T, out)
        h = F.linear(self.dropout(x).to(A.dtype), A)  # A x                    (B, T, r)
        if d is not None:
            h = h * d  # Λ_d A x
        h = F.linear(h, B)  # B Λ_d A x                                        (B, T, out)
        if b is not None:
            h = h * b  # Λ_b B Λ_d A x
        return y + (self.scale * h).to(y.dtype)

    def delta_weight(self) -> torch.Tensor:
        """ΔW = Λ_b B Λ_d A, (out, in)."""
        A, B, d, b = self.parts()
        A = A if d is None else d[:, None] * A  # (r, in)
        B = B if b is None else b[:, None] * B  # (out, r)
        return B @ A

    def merge_into(self, weight, bias):
        return weight + self.scale * self.delta_weight().float(), bias

    def unmerge_from(self, weight, bias):
        return weight - self.scale * self.delta_weight().float(), bias


def _shape(part: str, r: int, i: int, o: int) -> tuple[int, ...]:
    return {"A": (r, i), "B": (o, r), "d": (r,), "b": (o,)}[part]


def _shared_key(part: str, share: str, name: str) -> str:
    scope = {"model": "model", "kind": kind(name), "block": block(name)}[share]
    return f"{part}__{scope.replace('.', '_').replace('*', 'N')}"


def adapter_dtype(weight: torch.Tensor) -> torch.dtype:
    """Adapters take the base's float dtype; over a quantised (integer) base they are float32."""
    return weight.dtype if torch.is_floating_point(weight) else torch.float32


def inject_lowrank(model: nn.Module, cfg: LowRankConfig, root: AdapterRoot) -> dict[str, LowRankLinear]:
    """Every tensor is drawn from one CPU generator seeded with cfg.seed, in a fixed order:
    the shared ones first, then per layer in the order A, B, d, b. So frozen tensors can be
    regenerated on load instead of saved, and VeRA's pair equals PEFT's for the same
    `projection_prng_key` (A, then B, Kaiming-uniform with gain sqrt(2))."""
    gen = torch.Generator().manual_seed(cfg.seed)
    layers = {n: get_module(model, n) for n in match_targets(model, cfg.targets)}
    sizes: dict[str, tuple[str, int, int]] = {}  # shared key -> (part, largest in, largest out)
    for name, layer in layers.items():
        i, o = dims(layer)
        for part in "ABdb":
            spec = getattr(cfg, part)
            if spec.mode in ("tied", "random"):
                key = _shared_key(part, spec.share, name)
                _, i0, o0 = sizes.get(key, (part, 0, 0))
                sizes[key] = (part, max(i, i0), max(o, o0))
    ref = next(iter(layers.values())).weight
    for key, (part, i, o) in sizes.items():
        spec = getattr(cfg, part)
        t = init_tensor(_shape(part, cfg.r, i, o), spec.init, gen, ref.device, adapter_dtype(ref))
        root.declare(key, t, ("matrix" if t.dim() == 2 else "vector") if spec.mode == "tied" else None)
    sites = {}
    for name, layer in layers.items():
        i, o = dims(layer)
        keys, local = {}, {}
        for part in "ABdb":
            spec = getattr(cfg, part)
            if spec.mode in ("tied", "random"):
                keys[part] = _shared_key(part, spec.share, name)
            elif spec.mode in ("trained", "frozen"):
                t = init_tensor(_shape(part, cfg.r, i, o), spec.init, gen, layer.weight.device,
                                adapter_dtype(layer.weight))
                local[part] = (t, spec.mode == "trained")
        sites[name] = LowRankLinear(layer, cfg, root, keys, local)
    return sites


register_method(Method("lowrank", LowRankConfig, inject_lowrank))


def lora(r: int = 8, alpha: float = 16.0) -> LowRankConfig:
    """LoRA (Hu et al., 2021): A Kaiming-uniform, B = 0, s = alpha / r."""
    return LowRankConfig(preset="lora", r=r, alpha=alpha)


def vera(r: int = 256, d_initial: float = 0.1) -> LowRankConfig:
    """VeRA (Kopiczko et al., ICLR 2024): one frozen random pair for the model, sliced; d = 0.1, b = 0."""
    shared = dict(mode="random", init="he_uniform", share="model")
    return LowRankConfig(preset="vera", r=r, alpha=None, A=Part(**shared), B=Part(**shared),
                         d=Part("trained", d_initial), b=Part("trained", "zeros"))


def tied_lora(r: int = 8) -> LowRankConfig:
    """Tied-LoRA vBuA (TL6): A, B tied per module kind and trained; u, v per layer, trained, init 1."""
    return LowRankConfig(preset="tied-lora", r=r, alpha=None,
                         A=Part("tied", "kaiming_uniform"), B=Part("tied", "zeros"),
                         d=Part("trained", "ones"), b=Part("trained", "ones"))


def tied_lora_ba(r: int = 8) -> LowRankConfig:
    """Tied-LoRA TL5: A, B tied per module kind and trained; u, v frozen at 1 (absent)."""
    return LowRankConfig(preset="tied-lora-ba", r=r, alpha=None,
                         A=Part("tied", "kaiming_uniform"), B=Part("tied", "zeros"))


def tied_lora_paper(r: int = 8) -> LowRankConfig:
    """Tied-LoRA vBuA as the paper placed it: on the attention's input projections only, one
    pair tied across all layers. The paper's fused QKV layer becomes q, k and v reading one
    tied A (share model) with one B per projection (q, k, v's rows of the fused B, tied per
    kind); u is one r-vector per block shared by q, k, v, and v one vector per layer."""
    return LowRankConfig(preset="tied-lora-paper", r=r, alpha=None, targets=["attention-input"],
                         A=Part("tied", "kaiming_uniform", "model"), B=Part("tied", "zeros", "kind"),
                         d=Part("tied", "ones", "block"), b=Part("trained", "ones"))


register_preset("lora", lora)
register_preset("vera", vera)
register_preset("tied-lora", tied_lora, aliases=("vbua", "tl6"))
register_preset("tied-lora-ba", tied_lora_ba, aliases=("tl5",))
register_preset("tied-lora-paper", tied_lora_paper)
