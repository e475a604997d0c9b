"""The language-modelling loss: summed over labelled tokens, with their count.

The loop divides the window's sum by the window's labelled tokens, so the split into
micro-batches does not change the loss. A batch's mask may be 2-D or 4-D (data/batches.py);
a 4-D one is handed to the model in the form its attention reads (models/attention.py).
"""

from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from ..data.batches import collate
from ..data.rows import IGNORE
from ..models.attention import compute_dtype, model_mask


class CausalLMLoss(torch.nn.Module):
    """Summed next-token loss over the labelled tokens, and their count.

    For the usual *ForCausalLM models the LM head runs only on labelled positions (the
    response), not on the prompt: the same loss as `model(labels=...)`, far less work."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        cfg = model.config
        self.fast = (type(model).__name__.endswith("ForCausalLM") and model.get_output_embeddings() is not None
                     and not getattr(cfg, "final_logit_softcapping", None) and not getattr(cfg, "logit_scale", None)
                     and model.base_model is not model)

    def forward(self, input_ids, attention_mask, labels, position_ids=None, per_row: bool = False):
        """(summed loss, labelled tokens); with per_row, each row's sum and count, (B,) each."""
        target = labels[:, 1:]  # (B, T-1)
        keep = target != IGNORE
        mask = model_mask(attention_mask, self.model, compute_dtype(self.model, input_ids.device))
        kw = {} if position_ids is None else {"position_ids": position_ids}
        if self.fast:
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=mask, **kw).last_hidden_state
            logits = self.model.get_output_embeddings()(hidden[:, :-1][keep])  # (N, V)
        else:
            logits = self.model(input_ids=input_ids, attention_mask=mask, **kw).logits[:, :-1][keep]
        if not per_row:
            return F.cross_entropy(logits.float(), target[keep], reduction="sum"), keep.sum()
        row = keep.nonzero()[:, 0]  # the row of each labelled token                  (N,)
        ce = F.cross_entropy(logits.float(), target[keep], reduction="none")  # (N,)
        return ce.new_zeros(len(keep)).index_add(0, row, ce), keep.sum(1)


@torch.no_grad()
def eval_loss(loss_model: CausalLMLoss, prepared, batch_size: int, pad_id: int, device, autocast=nullcontext) -> dict:
    """Mean loss per labelled token over prepared rows, and perplexity."""
    total, count = 0.0, 0
    for i in range(0, len(prepared.input_ids), batch_size):
        b = collate(**prepared.rows(list(range(i, min(i + batch_size, len(prepared.input_ids))))), pad_id=pad_id)
        with autocast():
            s, n = loss_model(**{k: v.to(device) for k, v in b.items()})
        total, count = total + s.item(), count + int(n)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": count}
