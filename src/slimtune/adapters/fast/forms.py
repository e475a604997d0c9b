"""Which form the fast path computes a low-rank layer in, from multiply-add counts.

    per token:  h = s · b ⊙ (B (d ⊙ (A x)))         ~ N·r·(in+out) multiply-adds (×2–3 to train)
    dense:      y = (W0 + s · ΔW) x, ΔW = Λ_b B Λ_d A  ~ r·in·out, plus, to train, ∂ΔW Aᵀ for
                B, b and d, taken one of two ways:
      "dense"    keeps x:      G = gᵀx (N·in·out), then G Aᵀ (r·in·out)
      "dense-a"  keeps a = x Aᵀ (N, r): gᵀa (N·r·out), a made in the forward (N·r·in)

At high rank (VeRA's r = 256…1024) a dense form wins for most training-sized batches; at
LoRA's r = 8 the per-token one always does. "dense-a" wins roughly where r < in·out / (in + out)
and A is frozen; where A trains, ∂A needs G anyway. Sibling layers that read the same x with
the same A (siblings.py) choose together: they compute a = x Aᵀ once, so its cost is split.
"""

from __future__ import annotations

FORMS = ("per-token", "dense", "dense-a")  # on equal costs, the first


def flops(i: int, o: int, r: int, n: int, training: bool, trains: dict[str, bool], sharing: int = 1) -> dict[str, int]:
    """Multiply-adds of each form for n rows of a layer (in i, out o, rank r), as the functions
    in fused.py compute them (the gradient into x assumed wanted). `trains` says which of A, B,
    d, b take a gradient; `sharing` layers read the same x with the same A: a = x Aᵀ is theirs
    to split."""
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
