"""Attention masks as the model takes them.

slimtune's batches carry either the usual 2-D mask (B, T) of real tokens or a 4-D boolean
mask (B, 1, T_q, T_kv), True where a query may attend to a key, with the causal and padding
terms already in it (packing and gisting make such masks). transformers passes a 4-D mask
through untouched, so it must already be in the form the attention implementation reads:

- eager adds the mask to the attention scores: an additive float mask, 0 or the dtype's
  minimum, in the dtype the scores are computed in;
- SDPA takes a boolean mask as it is;
- flash-attention-2 takes no custom mask at all: refused.

A query row with no key to attend to (a padding position) keeps its diagonal, so no softmax
runs over an empty row; its output is never read.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import Problems


def attention_impl(model: nn.Module) -> str:
    return str(getattr(model.config, "_attn_implementation", None) or "eager")


def check_4d_support(model: nn.Module) -> None:
    """Refuse attention implementations that cannot take a custom 4-D mask."""
    impl = attention_impl(model)
    if "flash" in impl:
        p = Problems("this attention implementation takes no custom mask")
        p.add(f"attn_implementation={impl!r}", "flash attention reads only padding, not a 4-D mask "
              "(packing and gisting need one)", "load the model with attn_implementation='sdpa' or 'eager'")
        p.raise_if_any()


def real_tokens(mask: torch.Tensor) -> torch.Tensor:
    """(B, T) bool of the positions that hold a token, from a 2-D or a 4-D mask: in a 4-D
    mask a real token attends to itself."""
    if mask.dim() == 2:
        return mask.bool()
    return mask[:, 0].diagonal(dim1=-2, dim2=-1).bool()


def model_mask(mask: torch.Tensor, model: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """A 2-D mask unchanged; a 4-D boolean mask in the form the model's attention reads.
    `dtype` is the dtype the attention scores are computed in (autocast's, or the model's)."""
    if mask.dim() == 2:
        return mask
    check_4d_support(model)
    allowed = mask.bool()
    if allowed.shape[-2] == allowed.shape[-1]:  # padding rows keep their diagonal (never read)
        allowed = allowed | torch.eye(allowed.shape[-1], dtype=torch.bool, device=mask.device)
    if attention_impl(model) == "sdpa":
        return allowed
    return torch.zeros(allowed.shape, dtype=dtype, device=mask.device).masked_fill_(~allowed, torch.finfo(dtype).min)


def compute_dtype(model: nn.Module, device: torch.device) -> torch.dtype:
    """The dtype attention scores come out in: autocast's where it is on, else the model's."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return next(p for p in model.parameters() if p.is_floating_point()).dtype
