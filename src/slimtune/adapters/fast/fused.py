"""The low-rank family's two forms as autograd functions with hand-written backwards.

    y = x W0ᵀ + bias + s · xa Āᵀ B̄ᵀ        Ā = Λ_d A (r, in), B̄ = Λ_b B (out, r), xa = dropout(x)

Plain autograd through this expression pays for every intermediate it keeps and every pass
it makes: an (N, out) copy for the residual add, a second gradient into x summed with the
base's, the B-output kept for ∂b. Each function here makes one pass per GEMM it needs and
keeps only what its gradients read. Both are checked against autograd (gradcheck, float64).

Per token (`PerTokenLowRank`), keeps xa (if A trains) and a = xa Aᵀ (N, r):
    forward   y = x W0ᵀ + bias, then y += s · (a ⊙ d) B̄ᵀ in place
    backward  u = g B̄ (N, r)    ∂a = s · u ⊙ d     ∂d = colsum(s · u ⊙ a)
              ∂B̄ = s · gᵀ (a ⊙ d)   ∂B = Λ_b ∂B̄   ∂b = rowsum(∂B̄ ⊙ B)
              ∂A = ∂aᵀ xa            ∂x = g W0 (+ ∂a A in the same buffer when xa is x)
Given a (computed once for a group of sibling layers by `LowRankDown`), it returns ∂a instead
of ∂A and ∂a A. d may also be per token, (N, r) (MoLoRA's router weights, repeated r times
per expert): then ∂d = s · u ⊙ a, row by row.

Dense (`DenseLowRank`, no dropout), keeps x or a = x Aᵀ (keep_a; given by siblings or made
here, no gradient through it) and rebuilds ΔW in the backward:
    forward   y = x (W0 + s B̄ Ā)ᵀ + bias
    backward  G = s · gᵀx (out, in)   GAᵀ = G Aᵀ, or s · gᵀa, (out, r) serves B, b and d through
              P = GAᵀ ⊙ B:   ∂B = Λ_b (GAᵀ Λ_d)     ∂b = P d     ∂d = Pᵀ b
              ∂A = Λ_d B̄ᵀ G  (G made only for it when a is kept)     ∂x = g (W0 + s B̄ Ā)
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from . import blas
from .blas import mm as _mm, rows, tn


def diag_rows(v: torch.Tensor | None, M: torch.Tensor) -> torch.Tensor:
    """Λ_v M: M's rows scaled by v; M itself when v is absent."""
    return M if v is None else v[:, None] * M


def scaled_factors(A, B, d, b):
    """(Ā, B̄) = (Λ_d A, Λ_b B)."""
    return diag_rows(d, A), diag_rows(b, B)


def _rows(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])  # (..., k) -> (N, k)


def _down(x2: torch.Tensor, A: torch.Tensor) -> torch.Tensor:
    """a = x Aᵀ (N, r) for x's rows (N, in), in the operand order CPU BLAS runs fastest."""
    return _mm(x2, A.T, A.shape[0] < blas.SKINNY_R)


class PerTokenLowRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, xa, W0, bias, A, B, d, b, s: float, a=None):
        need = ctx.needs_input_grad  # x, xa, W0, bias, A, B, d, b, s, a
        x2 = _rows(x)  # (N, in)
        xa2 = x2 if xa is None else _rows(xa)  # (N, in)
        ctx.own_a = a is None  # else a = x Aᵀ came from a sibling group's LowRankDown, which owns ∂A
        a = _down(xa2, A) if a is None else _rows(a)  # (N, r)
        Bb = diag_rows(b, B)  # (out, r)
        y = F.linear(x2, W0, bias).addmm_(a if d is None else a * d, Bb.T, alpha=s)  # (N, out)
        ctx.save_for_backward(x2 if need[2] else None, xa2 if need[4] else None,
                              a if any(need[5:8]) else None, W0, A, B, d, b)
        ctx.s, ctx.xa_is_x, ctx.shape = s, xa is None, x.shape
        return y.view(*x.shape[:-1], -1)

    @staticmethod
    def backward(ctx, g):
        x2, xa2, a, W0, A, B, d, b = ctx.saved_tensors
        s, need = ctx.s, ctx.needs_input_grad
        g2 = _rows(g)  # (N, out)
        gx = gxa = gW0 = gbias = gA = gB = gd = gb = ga = None
        Bb = diag_rows(b, B)  # (out, r)
        skinny = B.shape[1] < blas.SKINNY_R
        into_x = need[0] and ctx.xa_is_x and ctx.own_a  # ∂a A joins ∂x
        need_a = not ctx.own_a and need[9]
        if into_x or need[1] or need[4] or need[6] or need_a:
            ga = rows(g2, Bb, skinny, s, a)  # ∂(a ⊙ d) (N, r)
            if need[6]:
                gd = ga * a if d.dim() == 2 else (ga * a).sum(0)  # (N, r) per token, else (r,)
            if d is not None:
                ga = ga * d  # ∂a (N, r)
            if need[4]:
                gA = tn(ga, xa2, not skinny)  # (r, in)
            if need[1]:
                gxa = (ga @ A).view(ctx.shape)  # (..., in)
        if need[0]:
            gx = g2 @ W0  # (N, in)
            if into_x:
                gx.addmm_(ga, A)  # xa is x: its gradient joins the base's in the same buffer
        if need[5] or need[7]:
            ad = a if d is None else a * d  # (N, r)
            gBb = tn(g2, ad, skinny, s, B)  # ∂B̄ (out, r)
            if need[5]:
                gB = diag_rows(b, gBb)
            if need[7]:
                gb = (gBb * B).sum(1)  # (out,)
        if need[2]:
            gW0 = g2.T @ x2  # a base weight that trains (not slimtune's default)
        if need[3]:
            gbias = g2.sum(0)
        return (None if gx is None else gx.view(ctx.shape)), gxa, gW0, gbias, gA, gB, gd, gb, None, \
            (ga if need_a else None)


class LowRankDown(torch.autograd.Function):
    """a = x Aᵀ (N, R) alone, for sibling layers that share it (siblings.py); A may stack theirs."""

    @staticmethod
    def forward(ctx, x2, A):
        ctx.save_for_backward(x2 if ctx.needs_input_grad[1] else None, A)
        return _down(x2, A)  # (N, R)

    @staticmethod
    def backward(ctx, ga):
        x2, A = ctx.saved_tensors
        gx = ga @ A if ctx.needs_input_grad[0] else None  # (N, in)
        gA = tn(ga, x2, A.shape[0] >= blas.SKINNY_R) if ctx.needs_input_grad[1] else None  # (R, in)
        return gx, gA


class DenseLowRank(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, W0, bias, A, B, d, b, s: float, keep_a: bool = False, a=None):
        need = ctx.needs_input_grad  # x, W0, bias, A, B, d, b, s, keep_a, a
        Ad, Bb = scaled_factors(A, B, d, b)
        W = torch.addmm(W0, Bb, Ad, alpha=s)  # (out, in) = W0 + s·ΔW, freed after the forward
        if keep_a and a is None:  # ∂ΔW Aᵀ will be gᵀa: a is made here (siblings pass theirs in)
            a = _down(_rows(x), A)  # (N, r)
        g_of_x = need[1] or need[3] or (not keep_a and any(need[4:7]))  # G = gᵀx is needed
        ctx.save_for_backward(x if g_of_x else None, _rows(a) if keep_a else None, W0, A, B, d, b)
        ctx.s, ctx.shape = s, x.shape
        return F.linear(x, W, bias)  # (..., out)

    @staticmethod
    def backward(ctx, g):
        x, a, W0, A, B, d, b = ctx.saved_tensors
        s, need = ctx.s, ctx.needs_input_grad
        Ad, Bb = scaled_factors(A, B, d, b)
        g2 = _rows(g)  # (N, out)
        gx = gW0 = gbias = gA = gB = gd = gb = None
        if need[0]:
            gx = (g2 @ torch.addmm(W0, Bb, Ad, alpha=s)).view(ctx.shape)  # (..., in)
        if need[1]:  # a base weight that trains (not slimtune's default)
            gW0 = g2.T @ _rows(x)
        if need[2]:
            gbias = g2.sum(0)
        if need[3] or (a is None and any(need[4:7])):
            G = g2.T @ _rows(x)  # ∂ΔW / s (out, in); s is applied to the small products below
            if need[3]:
                gA = diag_rows(d, _mm(Bb.T, G, False, s, A))  # (r, in)
        if need[4] or need[5] or need[6]:
            # s · ∂ΔW Aᵀ (out, r): s · gᵀ (x Aᵀ), from the kept a or from G
            GAt = tn(g2, a, False, s, B) if a is not None else _mm(G, A.T, False, s, B)
            if need[4]:
                gB = diag_rows(b, GAt if d is None else GAt * d)  # Λ_b ∂B̄
            if need[5] or need[6]:
                P = GAt * B  # (out, r): one pass serves both vectors
                if need[6]:
                    gb = P.sum(1) if d is None else P @ d  # (out,)
                if need[5]:
                    gd = P.sum(0) if b is None else P.T @ b  # (r,)
        return gx, gW0, gbias, gA, gB, gd, gb, None, None, None
