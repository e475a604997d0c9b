"""Gist tokens with any adapter: the one trained embedding row (Mu, Li, Goodman 2023).

The paper fine-tunes the whole model; here the gist token's input embedding trains together
with any adapter of the core (LoRA, VeRA, Tied-LoRA, (IA)³, the mixtures). Its row g is a
tensor of the adapter, declared on the adapter's root in the `embedding` optimiser group; a
site on the input embedding puts it in at the gist positions:

    e(x_t) = g        if x_t = <GIST>
             E[x_t]   otherwise               E: the frozen embedding matrix (V, D)

so only g (1, D) gets a gradient and optimiser state, never the matrix. g starts as the
base's row for the token, the mean of the other rows (models/gist.py). Merging writes g into
E's row (and unmerging puts the base's row back).
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import Problems
from ..models.gist import GistTokens, give_gist_rows
from .inject import holder, place, root
from .protocol import AdapterHost, SiteAdapter

ROW = "gist_embedding"  # the root's trained tensor, saved as slimtune_shared.gist_embedding


class GistEmbedding(SiteAdapter):
    """The input embedding with the adapter's gist row at the gist positions."""

    def __init__(self, root, token_id: int, base_row: torch.Tensor):
        super().__init__(root)
        self.token_id = token_id
        self.declare("base_row", base_row.clone(), None)  # (D,) the base's row: unmerge puts it back

    def forward(self, base: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
        e = base(input_ids)  # (B, T, D)
        g = getattr(self.root, ROW).to(e.dtype)  # (1, D)
        return torch.where((input_ids == self.token_id)[..., None], g, e)

    def merge_into(self, weight: torch.Tensor, bias):
        w = weight.clone()  # (V, D)
        w[self.token_id] = getattr(self.root, ROW)[0].to(w.dtype)
        return w, bias

    def unmerge_from(self, weight: torch.Tensor, bias):
        w = weight.clone()
        w[self.token_id] = self.base_row.to(w.dtype)
        return w, bias


def embedding_name(model: nn.Module) -> str:
    """The module name of the input embedding (hosts looked through)."""
    emb = model.get_input_embeddings()
    emb = emb.base if isinstance(emb, AdapterHost) else emb
    for n, m in model.named_modules():
        if m is emb:
            return n.replace(".base", "") if n.endswith(".base") else n
    raise ValueError("the model's input embedding is not one of its modules")


def add_gist_tokens(model: nn.Module, spec: GistTokens, name: str | None = None) -> nn.Module:
    """Give the adapter `name` (the active one) a trained gist row, in place: the base gets its
    frozen row for the token where it has none, the adapter its copy of it, in the `embedding`
    group. The adapter then carries `spec` (root.gist), which saving and loading keep."""
    r = root(model, name)
    p = Problems("cannot add gist tokens")
    if r is None:
        p.add(f"model {type(model).__name__}", "it carries no adapter to train the gist row with",
              "add an adapter first (any method); the gist row trains with it")
    elif getattr(r, "gist", None) is not None:
        p.add(f"adapter {r.name!r}", "it has gist tokens already", "add them once")
    p.raise_if_any()
    emb = model.get_input_embeddings()
    if isinstance(emb, AdapterHost) and emb.merged is not None:
        p.add("the input embedding", "an adapter is merged into it", "unmerge_adapters(model) first")
        p.raise_if_any()
    if not isinstance(emb, AdapterHost):
        give_gist_rows(model, spec.token_id)  # the base's frozen row (a host means another adapter did)
    module = embedding_name(model)
    parent, attr = holder(model, module)
    base = getattr(parent, attr)
    base = base.base if isinstance(base, AdapterHost) else base
    if spec.token_id >= base.weight.shape[0]:
        p.add(f"gist token id {spec.token_id}", f"the input embedding has {base.weight.shape[0]} rows and carries "
              "another adapter already, so it cannot grow", "add the gist tokens before adapters on the embedding")
        p.raise_if_any()
    row = base.weight[spec.token_id].detach().float()  # (D,)
    r.declare(ROW, row[None].clone(), "embedding")  # (1, D) g
    site = GistEmbedding(r, spec.token_id, row)
    site.train(model.training)
    aset = getattr(model, "slimtune_adapters")
    place(model, module, r.name, site, aset)
    r.gist = spec
    return model


def gist_tokens(model: nn.Module, name: str | None = None) -> GistTokens | None:
    """The gist settings of the adapter `name` (the active one), or None."""
    r = root(model, name)
    return None if r is None else getattr(r, "gist", None)

