"""From examples to batches: tokenization with label masking, truncation, packing with
masks that keep packed examples apart, collation, deterministic shuffling and the split.

Truncation never drops a whole response silently: the prompt is cut from the left first;
a response is cut (from the right) only when it alone leaves less than a quarter of
`max_len` to the prompt, and every cut is counted in `Prepared.report`.

A batch is a dict of (B, T) tensors: `input_ids`, `labels` (IGNORE where no loss falls) and
`attention_mask`, plus `position_ids` when positions are not 0..T-1. The mask is 2-D (1 on
real tokens) or, for packed rows, 4-D (B, 1, T, T) boolean: True where a query may attend to
a key, causal and within one example. Packed examples each start at position 0, so a packed
row computes exactly what its examples would alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from ..errors import Problems
from .gist import GistMask, gist_mask
from .rows import IGNORE, Example
from .templates import format_example


@dataclass
class Prepared:
    """Tokenized examples (or packed rows), and what truncation did to them."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    report: dict = field(default_factory=lambda: {"prompts_cut": 0, "responses_cut": 0, "examples": 0})
    segments: list[list[int]] | None = None  # packed rows: the example each token belongs to (0, 1, ...)
    gist: GistMask | None = None  # rows with gist tokens: the mask they get (data/gist.py)

    def labelled(self) -> int:
        """Tokens that carry loss (each row's first label never does: nothing predicts it)."""
        return sum(sum(t != IGNORE for t in row[1:]) for row in self.labels)

    def rows(self, idx: list[int]) -> dict:
        """The rows `idx` as collate's arguments."""
        return {"rows_ids": [self.input_ids[i] for i in idx], "rows_labels": [self.labels[i] for i in idx],
                "rows_segments": None if self.segments is None else [self.segments[i] for i in idx],
                "gist": self.gist}


def tokenize(examples: list[Example], tokenizer, template: str = "chat", max_len: int = 512,
             truncation: str = "prompt", gist=None) -> Prepared:
    """Token ids and labels (IGNORE on the prompt). truncation: 'prompt' (cut as the module
    docstring says) or 'error' (a row that does not fit is an error). `gist`: the model's gist
    tokens (models/gist.py: token_id, num, condition), for the gist template; the rows then
    carry their gist mask."""
    out = Prepared([], [], gist=None if gist is None else GistMask(gist.token_id, gist.condition))
    num_gist = 1 if gist is None else gist.num
    problems = Problems("examples longer than max_len")
    for ex in examples:
        prompt, response = format_example(ex, template, tokenizer, num_gist)
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        if len(p) + len(r) > max_len:
            if truncation == "error":
                problems.add(f"{ex.where or 'example'} ({len(p)} + {len(r)} tokens)", f"longer than max_len={max_len}",
                             "raise --max_len, shorten the row, or use --truncation prompt")
                continue
            r_keep = min(len(r), max_len - min(len(p), max_len // 4))
            out.report["responses_cut"] += r_keep < len(r)
            out.report["prompts_cut"] += (max_len - r_keep) < len(p)
            r = r[:r_keep]
            p = p[len(p) - (max_len - r_keep):] if max_len - r_keep > 0 else []
        out.input_ids.append(p + r)
        out.labels.append([IGNORE] * len(p) + r)
    problems.raise_if_any()
    out.report["examples"] = len(out.input_ids)
    return out


def split(examples: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A deterministic held-out split (the same seed gives the same split)."""
    if not val_fraction:
        return list(examples), []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * val_fraction))
    return [examples[i] for i in sorted(order[n_val:])], [examples[i] for i in sorted(order[:n_val])]


def pack(prep: Prepared, max_len: int) -> Prepared:
    """Concatenate examples into rows of at most max_len tokens (greedy, in order; an example
    never straddles two rows). Each token keeps its example's index in `segments`, from which
    collate builds the mask that keeps the examples apart. An example's first label is
    IGNORE: alone, nothing would predict its first token either."""
    out = Prepared([], [], dict(prep.report), segments=[], gist=prep.gist)
    ids, labels, seg = [], [], []
    for i, l in zip(prep.input_ids, prep.labels):
        if ids and len(ids) + len(i) > max_len:
            out.input_ids.append(ids), out.labels.append(labels), out.segments.append(seg)
            ids, labels, seg = [], [], []
        k = seg[-1] + 1 if seg else 0
        ids, labels, seg = ids + i, labels + [IGNORE] + l[1:], seg + [k] * len(i)
    if ids:
        out.input_ids.append(ids), out.labels.append(labels), out.segments.append(seg)
    return out


def pad_id(tokenizer) -> int:
    """The token that pads a batch: the tokenizer's pad token, else its EOS (labels mask it out)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def segment_mask(segments: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) bool: causal, within one segment; segment -1 marks padding (sees nothing,
    seen by nothing)."""
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool).tril()
    same = segments[:, :, None] == segments[:, None, :]  # (B, T, T)
    real = segments >= 0
    return (causal & same & real[:, :, None] & real[:, None, :])[:, None]


def segment_positions(segments: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that restart at 0 where the segment changes (padding: 0)."""
    B, T = segments.shape
    start = torch.ones_like(segments, dtype=torch.bool)
    start[:, 1:] = segments[:, 1:] != segments[:, :-1]
    idx = torch.arange(T).expand(B, T)
    first = torch.where(start, idx, torch.zeros_like(idx)).cummax(dim=1).values  # index where each segment began
    return torch.where(segments >= 0, idx - first, torch.zeros_like(idx))


def collate(rows_ids: list[list[int]], rows_labels: list[list[int]], pad_id: int, side: str = "right",
            rows_segments: list[list[int]] | None = None, gist: GistMask | None = None) -> dict:
    """Pad to the longest row: input_ids, attention_mask, labels (IGNORE on padding); packed
    rows (with segments) and gist rows get a 4-D mask and position_ids."""
    T = max(len(r) for r in rows_ids)
    ids = torch.full((len(rows_ids), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows_ids), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows_ids), T), dtype=torch.long)
    segments = torch.full((len(rows_ids), T), -1, dtype=torch.long)
    for k, (i, l) in enumerate(zip(rows_ids, rows_labels)):
        s = slice(0, len(i)) if side == "right" else slice(T - len(i), T)
        ids[k, s], labels[k, s], mask[k, s] = torch.tensor(i), torch.tensor(l), 1
        segments[k, s] = torch.tensor(rows_segments[k]) if rows_segments is not None else 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    if rows_segments is not None or gist is not None:
        batch["attention_mask"] = segment_mask(segments)
        batch["position_ids"] = segment_positions(segments)
    if gist is not None:
        batch["attention_mask"] = gist_mask(ids, batch["attention_mask"], segments, gist)
    return batch


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order of examples in one epoch: a permutation seeded by (seed, epoch)."""
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()
