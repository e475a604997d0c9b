"""A frozen quantised base (QLoRA-style): bitsandbytes NF4 or int8 linear layers.

`quantize_model(model, "nf4")` replaces every linear layer of the transformer blocks (the
LM head and embeddings stay in full precision) by bitsandbytes' Linear4bit (NF4, compute
in the model's dtype) or Linear8bitLt. Adapters then wrap the quantised layers and stay
in full precision. bitsandbytes runs on CPU and CUDA: `pip install slimtune[quant]`.

Merging into a quantised layer is refused (merge_adapters raises and names the fix):
merge into the full-precision base instead, which `slimtune merge` loads.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import Problems
from .layers import adaptable_layers

MODES = ("none", "nf4", "int8")


def _bnb():
    try:
        import bitsandbytes as bnb
    except ImportError:
        p = Problems("quantisation needs bitsandbytes")
        p.add("quantize=nf4/int8", "bitsandbytes is not installed", "pip install 'slimtune[quant]' (or bitsandbytes)")
        p.raise_if_any()
    return bnb


def quantize_model(model: nn.Module, mode: str) -> nn.Module:
    """Replace the blocks' nn.Linear layers with quantised, frozen ones, in place."""
    if mode == "none":
        return model
    if mode not in MODES:
        p = Problems("unknown quantisation")
        p.add(f"quantize={mode!r}", "not a supported mode", f"use one of {list(MODES)}")
        p.raise_if_any()
    bnb = _bnb()
    device = next(model.parameters()).device
    for name, layer in adaptable_layers(model).items():
        if type(layer) is not nn.Linear:
            continue  # GPT-2's Conv1D stays as it is
        bias = layer.bias is not None
        if mode == "nf4":
            q = bnb.nn.Linear4bit(layer.in_features, layer.out_features, bias=bias, quant_type="nf4",
                                  compute_dtype=layer.weight.dtype, quant_storage=torch.uint8)
        else:
            q = bnb.nn.Linear8bitLt(layer.in_features, layer.out_features, bias=bias, has_fp16_weights=False)
        q.load_state_dict(layer.state_dict())
        q = q.to(device)  # quantises on the move
        q.requires_grad_(False)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, q)
    return model
