"""Gist tokens in the tokenizer and the base model's embeddings (Mu, Li, Goodman 2023).

One new token, `<GIST>`, is added to the tokenizer; a prompt carries k copies of it (as the
authors' code does: the k gists differ by position, not by embedding). The base model gets
an embedding row for it where it has none (the matrix grows to the token's id + 1; a matrix
already larger, as Qwen2's padded vocabulary, is left as it is), set to the mean of the
existing rows, in the input embedding and in an untied output embedding. Those rows are part
of the *base*: frozen, and rebuilt the same way on load. What trains is the adapter's own
copy of the input row (adapters/gist.py), so the embedding matrix never gets a gradient.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..errors import Problems

GIST_TOKEN = "<GIST>"
CONDITIONS = ("gist", "pos_control", "neg_control")
MAX_GIST = 64  # k gist tokens: 1 by default; the paper tried 1, 2, 5 and 10


@dataclass(frozen=True)
class GistTokens:
    """How a model uses gist tokens: which token, how many per prompt, which attention mask."""

    token_id: int
    num: int = 1  # k
    condition: str = "gist"  # gist | pos_control | neg_control (data/gist.py)
    token: str = GIST_TOKEN

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str) -> "GistTokens":
        p = Problems(f"bad gist settings in {where}")
        try:
            spec = cls(**data)
        except TypeError as e:
            p.add(f"gist={data!r}", f"not gist settings ({e})", "save the adapter again")
            p.raise_if_any()
        check_gist(spec.num, spec.condition, p)
        p.raise_if_any()
        return spec


def check_gist(num: int, condition: str, p: Problems) -> None:
    if not 1 <= num <= MAX_GIST:
        p.add(f"gist={num}", f"k gist tokens must be 1..{MAX_GIST}", "give 1 (the paper's default) up to 64, or 0 for no gisting")
    if condition not in CONDITIONS:
        p.add(f"gist_condition={condition!r}", "not a gist condition", f"use one of {list(CONDITIONS)}")


def add_gist_token(tokenizer, token: str = GIST_TOKEN) -> int:
    """Add `<GIST>` to the tokenizer as a special token (once); its id."""
    from transformers import AddedToken

    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False)], special_tokens=True)
    return tokenizer.convert_tokens_to_ids(token)


def gist_token_id(tokenizer, token: str = GIST_TOKEN) -> int | None:
    return tokenizer.get_vocab().get(token)


@torch.no_grad()
def give_gist_rows(model: nn.Module, token_id: int) -> None:
    """Make sure the base model has an embedding row for the gist token: grow the input (and an
    untied output) embedding to token_id + 1 rows, the new rows set to the mean of the old."""
    emb = model.get_input_embeddings()
    old = emb.weight.shape[0]
    if token_id < old:
        return
    out = model.get_output_embeddings()
    tied = out is not None and out.weight is emb.weight
    in_mean = emb.weight.float().mean(0)
    out_mean = None if out is None or tied else out.weight.float().mean(0)
    model.resize_token_embeddings(token_id + 1, mean_resizing=False)
    model.get_input_embeddings().weight[old:] = in_mean.to(emb.weight.dtype)
    new_out = model.get_output_embeddings()
    if out_mean is not None and new_out is not None and new_out.weight.shape[0] > old:
        new_out.weight[old:] = out_mean.to(new_out.weight.dtype)
