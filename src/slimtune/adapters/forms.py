"""Which form a low-rank layer computes (lowrank.py), from multiply-add counts.

    per token:  h = s · b ⊙ (B (d ⊙ (A x)))         ~ N·r·(in+out) multiply-adds (×2–3 to train)
    dense:      y = (W0 + s · ΔW) x, ΔW = Λ_b B Λ_d A  ~ r·in·out, plus, to train, ∂ΔW Aᵀ for
                B, b and d, taken one of two ways:
      "dense"    keeps x:      G = gᵀx (N·in·out), then G Aᵀ (r·in·out)
      "dense-a"  keeps a = x Aᵀ (N, r): gᵀa (N·r·out), a made in the forward (N·r·in)

At high rank (VeRA's r = 256…1024) a dense form wins for most training-sized batches; at
LoRA's r = 8 the per-token one always does. "dense-a" wins roughly where r < in·out / (in + out)
and A is frozen (VeRA at r = 256); where A trains, ∂A needs G anyway. All are fused autograd
functions (fused.py) that read W0 itself. With dropout on the adapter's input while training,
the layer takes the per-token form, which reads the dropped-out copy; over a quantised base,
whose W0 is never materialised, it runs the per-token formula through plain autograd.

Sibling layers that read the same x with the same A (siblings.py) choose together: they
compute a = x Aᵀ once, so its cost is split between them.
"""

from __future__ import annotations

import torch
from torch import nn

FORMS = ("per-token", "dense", "dense-a")  # on equal costs, the first


class TwoForms:
    """Mixed into LowRankLinear: the cost model and the choice, kept per shape."""

    def flops(self, n_tokens: int, training: bool, trains: dict[str, bool] | None = None,
              sharing: int = 1) -> dict[str, int]:
        """Multiply-adds of each form for n_tokens rows, as the functions in fused.py compute
        them (the gradient into x assumed wanted); used to pick one. `sharing` layers read the
        same x with the same A (siblings.py): a = x Aᵀ is theirs to split."""
        i, o, r, n = self.in_features, self.out_features, self.r, n_tokens
        trains = trains or self.trained()
        if not training:
            return {"per-token": n * r * i // sharing + n * r * o, "dense": r * i * o}
        out_side = trains["B"] or trains["b"] or trains["d"]  # they all read ∂ΔW Aᵀ
        # per token: a and ∂x += ∂a A (and ∂A if it trains) on the x side; the up-projection,
        # ∂(a ⊙ d) = g B̄ (and ∂B̄ if B or b trains) on the output side
        x_side = n * r * i * (2 + trains["A"])
        per_token = x_side // sharing + n * r * 2 * o + n * r * o * (trains["B"] or trains["b"])
        # dense: ΔW in the forward and again in the backward (for ∂x); ∂A = Λ_d B̄ᵀ G needs G
        both = 2 * r * i * o + (n * i * o + r * i * o) * trains["A"]
        dense = both + (n * i * o * (not trains["A"]) + r * i * o) * out_side
        dense_a = both + (n * r * i // sharing + n * r * o) * out_side
        return {"per-token": per_token, "dense": dense, "dense-a": dense_a}

    def trained(self, parts: list | None = None) -> dict[str, bool]:
        """Which of A, B, d, b take a gradient (present and requiring grad)."""
        parts = parts or [self.part(n) for n in "ABdb"]
        return {n: t is not None and t.requires_grad for n, t in zip("ABdb", parts)}

    def fusable(self) -> bool:
        """A plain float base weight: the fused functions can read it (a quantised one they cannot)."""
        w = self.base.weight
        return isinstance(w, nn.Parameter) and w.dtype in (torch.float32, torch.bfloat16, torch.float16)

    def dropping(self) -> bool:
        return not isinstance(self.drop, nn.Identity) and self.drop.training

    def form(self, x: torch.Tensor, parts: list | None = None) -> str:
        """One of FORMS for this call: the cheapest for its batch, summed over its siblings."""
        trains = self.trained(parts)
        training = torch.is_grad_enabled() and any(trains.values())
        if (training and self.dropping()) or not self.fusable():
            return "per-token"  # dropout applies to the adapter's input only; a quantised W0 is never materialised
        n = x.numel() // x.shape[-1]
        group = (self,) if torch.compiler.is_compiling() else self.same_a()
        key = (n, training, *trains.values(), len(group))
        if key not in self._choices:
            costs = [m.flops(n, training, trains if m is self else None, len(group)) for m in group]
            total = {f: sum(c[f] for c in costs) for f in FORMS if all(f in c for c in costs)}
            if len(self._choices) > 1024:  # many distinct batch shapes: forget the old ones
                self._choices.clear()
            self._choices[key] = min(total, key=total.get)
        return self._choices[key]

    def shares_down(self, x: torch.Tensor) -> bool:
        """This call would compute a = x Aᵀ itself from x (siblings.py): the fused per-token
        form without dropout, or "dense-a"."""
        return self.enabled and not self.merged and self.fusable() and not self.dropping() \
            and self.form(x) != "dense"
