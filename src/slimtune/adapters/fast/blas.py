"""How the low-rank products are handed to BLAS (fused.py): the same products, in the operand
order and the split that run fastest. cuBLAS takes any order at one speed, so on CUDA each is
one plain product.

- Order (`mm`, flip): below rank SKINNY_R, CPU BLAS runs the per-token products faster with r
  as rows; above it, slower.
- Split over tokens (`tn`, `rows`): MKL runs a product whose short side is a rank below SPLIT_R
  on one thread, whatever the thread count. Cut into one chunk of tokens per thread and run
  as one batched product, it uses them all. At higher ranks MKL threads the product itself.
  A chunk keeps at least MIN_ROWS tokens.

The thresholds were tuned on 2 cores with MKL; the figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import torch

SKINNY_R = 16
SPLIT_R = 64
MIN_ROWS = 256


def mm(P: torch.Tensor, Q: torch.Tensor, flip: bool, alpha: float = 1.0, like: torch.Tensor | None = None):
    """alpha · P @ Q, computed as (Qᵀ Pᵀ)ᵀ when flip on the CPU: the same product, the other
    operand order. `like`, any tensor of the product's shape, lets one GEMM apply alpha: addmm
    with beta = 0 never reads it (documented), so no second pass over the product scales it."""
    if flip and P.is_cpu:
        return mm(Q.T, P.T, False, alpha, None if like is None else like.T).T
    if alpha == 1.0:
        return torch.mm(P, Q)
    if like is None:
        return torch.mm(P, Q).mul_(alpha)
    return torch.addmm(like, P, Q, beta=0, alpha=alpha)


def chunks(n: int, r: int, t: torch.Tensor) -> int:
    """Into how many chunks of tokens to split a rank-r product over n tokens: one per CPU
    thread (at most), each of at least MIN_ROWS; 1 means no split (always under torch.compile,
    which picks its own kernels)."""
    if not t.is_cpu or r >= SPLIT_R or torch.compiler.is_compiling():
        return 1
    k = min(torch.get_num_threads(), n // MIN_ROWS)
    while k > 1 and n % k:
        k -= 1
    return max(k, 1)


def tn(P: torch.Tensor, Q: torch.Tensor, flip: bool, alpha: float = 1.0, like: torch.Tensor | None = None):
    """alpha · Pᵀ Q for P (N, m), Q (N, n): a sum over N tokens (∂A = ∂aᵀ x, ∂B̄ = gᵀ a)."""
    n, k = P.shape[0], chunks(P.shape[0], min(P.shape[1], Q.shape[1]), P)
    if k == 1:
        return mm(P.T, Q, flip, alpha, like)
    if flip:  # (Qᵀ P)ᵀ, chunk by chunk
        return tn(Q, P, False, alpha).T
    out = torch.bmm(P.reshape(k, n // k, -1).transpose(1, 2), Q.reshape(k, n // k, -1)).sum(0)  # (m, n)
    return out if alpha == 1.0 else out.mul_(alpha)


def rows(P: torch.Tensor, Q: torch.Tensor, flip: bool, alpha: float = 1.0, like: torch.Tensor | None = None):
    """alpha · P Q for P (N, m), Q (m, r): N tokens' rows (∂a = g B̄)."""
    n, k = P.shape[0], chunks(P.shape[0], Q.shape[1], P)
    if k == 1:
        return mm(P, Q, flip, alpha, like)
    out = torch.bmm(Q.T.expand(k, -1, -1), P.reshape(k, n // k, -1).transpose(1, 2))  # (k, r, N/k)
    out = out.transpose(1, 2).reshape(n, -1)  # (N, r), a copy
    return out if alpha == 1.0 else out.mul_(alpha)
