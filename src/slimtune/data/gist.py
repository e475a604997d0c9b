"""The gist attention mask (Mu, Li, Goodman 2023), as a 4-D boolean mask.

k gist tokens sit, contiguous, between the instruction and the input. Under the gist mask
nothing after the gists can see what came before them:

    may_attend(q, key) = causal(key <= q) and not_pad(key)
                         and not (q > last_gist and key < first_gist)

so whatever the model knows of the instruction after the gists, it knows through the gists'
activations. The controls keep the gist tokens in the sequence:

    pos_control: the plain causal mask (the gists, and the instruction, stay visible);
    neg_control: not (q > last_gist and key <= last_gist) (nothing up to the last gist is visible).

The mask is built per example: `first_gist` and `last_gist` are those of the query's own
example, so it combines with packing (segments) and with padding (segment -1) through the
batch's own mask (batches.segment_mask). An example without gist tokens keeps its causal mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class GistMask:
    """Which token is the gist token, and which mask the batch gets."""

    token_id: int
    condition: str = "gist"


def gist_bounds(is_gist: torch.Tensor, segments: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, last) gist index of each token's example, (B, T) each; an example without gist
    tokens gets first = T and last = -1."""
    B, T = is_gist.shape
    idx = torch.arange(T, device=is_gist.device)
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T): query's example, key's example
    gist_key = same & is_gist[:, None, :]  # (B, T, T): keys that are gists of the query's example
    first = torch.where(gist_key, idx, T).amin(-1)  # (B, T)
    last = torch.where(gist_key, idx, -1).amax(-1)  # (B, T)
    return first, last


def gist_mask(input_ids: torch.Tensor, allowed: torch.Tensor, segments: torch.Tensor, spec: GistMask) -> torch.Tensor:
    """(B, 1, T, T) bool: `allowed` (the batch's causal, padding and packing mask, (B, 1, T, T))
    with the condition's constraint added. `segments` (B, T) numbers each token's example
    (-1 on padding)."""
    if spec.condition == "pos_control":
        return allowed
    T = input_ids.shape[1]
    first, last = gist_bounds(input_ids == spec.token_id, segments)
    q = torch.arange(T, device=input_ids.device)[None, :, None]  # (1, T, 1)
    k = torch.arange(T, device=input_ids.device)[None, None, :]  # (1, 1, T)
    after = (q > last[:, :, None]) & (last[:, :, None] >= 0)  # (B, T, 1): a query after its example's gists
    hidden = k < first[:, :, None] if spec.condition == "gist" else k <= last[:, :, None]  # (B, T, T)
    return allowed & ~(after & hidden)[:, None]
