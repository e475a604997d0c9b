"""The low-rank family's dense form as one autograd function that keeps only its input.

    y = x (W0 + s · Λ_b B Λ_d A)ᵀ + bias

Autograd through the plain expression keeps the materialised W = W0 + s·ΔW (out × in) of
every adapted layer until the backward. This function keeps x alone (which the layers that
read the same hidden state share) and rebuilds ΔW in the backward: one extra r·in·out
product, and peak memory no higher than the per-token form's.

Backward, with G = s · gᵀx (out, in) and Ā = Λ_d A, B̄ = Λ_b B:
    ∂x = g (W0 + s B̄ Ā)        GAᵀ = G Aᵀ (out, r)  — one product serves B, b and d:
    ∂B = Λ_b (GAᵀ Λ_d)         ∂b = rowsum(GAᵀ Λ_d ⊙ B)        ∂d = colsum(GAᵀ ⊙ B̄)
    ∂A = Λ_d B̄ᵀ G              (only when A trains)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _scaled(A, B, d, b):
    """(Ā, B̄) = (Λ_d A, Λ_b B)."""
    return (A if d is None else d[:, None] * A), (B if b is None else b[:, None] * B)


class DenseLowRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W0, bias, A, B, d, b, s: float):
        Ad, Bb = _scaled(A, B, d, b)
        W = W0 + s * (Bb @ Ad).to(W0.dtype)  # (out, in), freed after the forward
        ctx.save_for_backward(x, W0, A, B, d, b)
        ctx.s = s
        return F.linear(x, W, bias)  # (..., out)

    @staticmethod
    def backward(ctx, g):
        x, W0, A, B, d, b = ctx.saved_tensors
        s, need = ctx.s, ctx.needs_input_grad  # x, W0, bias, A, B, d, b, s
        Ad, Bb = _scaled(A, B, d, b)
        g2 = g.reshape(-1, g.shape[-1])  # (N, out)
        gx = gW0 = gbias = gA = gB = gd = gb = None
        if need[0]:
            gx = (g2 @ (W0 + s * (Bb @ Ad).to(W0.dtype))).view(x.shape)  # (..., in)
        if need[1]:  # a base weight that trains (not slimtune's default)
            gW0 = g2.T @ x.reshape(-1, x.shape[-1])
        if need[2]:
            gbias = g2.sum(0)
        if any(need[3:7]):
            G = s * (g2.T @ x.reshape(-1, x.shape[-1])).to(A.dtype)  # ∂ΔW (out, in)
            if need[3]:
                gA = Bb.T @ G  # (r, in)
                gA = gA if d is None else d[:, None] * gA
            if need[4] or need[5] or need[6]:
                GAt = G @ A.T  # (out, r)
                gBb = GAt if d is None else GAt * d  # ∂B̄ (out, r)
                if need[4]:
                    gB = gBb if b is None else b[:, None] * gBb
                if need[6]:
                    gb = (gBb * B).sum(1)  # (out,)
                if need[5]:
                    gd = (GAt * Bb).sum(0)  # (r,)
        return gx, gW0, gbias, gA, gB, gd, gb, None
