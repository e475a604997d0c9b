"""Gist caches: an instruction run once, kept as its k gist tokens' keys and values.

Under the gist mask nothing after the gists sees the instruction, so an instruction's effect
on any input is all in the gists' keys and values, layer by layer. `compress` runs
`Instruction: {instruction}\\n<GIST>...` once and keeps those k positions (a cache of k tokens
instead of the instruction's length); `cached_inputs` puts the caches of a batch of rows (of
the same or different instructions, with any k) in front of their inputs.

Positions. The cache is computed with the gists *re-based* to positions 0..k-1 (the
instruction before them at negative positions: rotary embeddings only see differences), so
it does not depend on the instruction's length, and the input that follows starts at
position k in every row. Relative positions are those of the full prompt, so cached
generation computes what the full gist-masked prompt computes (tests/test_gist.py). The
authors' code continues from the gists' original offset instead, which is why its cache
works at batch size 1 only. This holds for rotary position embeddings (Llama, Mistral, Qwen2
and most decoders); models with absolute positions (GPT-2) are refused.

A cache carries the identity of the model and adapter that made it (`identity`); using it
with another is an error.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import DynamicCache

from ..data.templates import gist_prompt
from ..errors import Problems
from ..models.gist import GistTokens
from .generation import _cache_kw

META_KEY = "slimtune_gist_cache"


@dataclass
class GistCache:
    """One instruction's gist keys and values: per layer (kv_heads, k, head_dim)."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    identity: dict  # model, adapter and gist settings that made it
    instruction: str = ""
    instruction_tokens: int = 0  # tokens of the prompt before the gists (the part compressed away)
    meta: dict = field(default_factory=dict)

    @property
    def num(self) -> int:
        return self.keys[0].shape[-2]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    @property
    def compression(self) -> float:
        """Instruction tokens per gist token."""
        return self.instruction_tokens / self.num

    def bytes_saved(self) -> int:
        """What the full instruction's cache would have held beyond the gists'."""
        return self.nbytes // self.num * self.instruction_tokens - self.nbytes


def _refuse_absolute_positions(model) -> None:
    cfg = model.config
    if getattr(cfg, "rope_theta", None) is None and not getattr(cfg, "rope_parameters", None) \
            and not getattr(cfg, "rope_scaling", None):
        p = Problems("gist caching needs rotary positions")
        p.add(f"model {type(model).__name__}", "it has no rotary position embedding, so a cache cannot be re-based "
              "to positions 0..k-1", "use a decoder with rotary positions (Llama, Mistral, Qwen2, ...), or "
              "answer with the full prompt (slimtune generate --template gist)")
        p.raise_if_any()


@torch.no_grad()
def compress(model, tokenizer, gist: GistTokens, instruction: str, identity: dict) -> GistCache:
    """Run the instruction and its k gists once; keep the gists' keys and values."""
    p = Problems("cannot compress the instruction")
    if gist.condition != "gist":
        p.add(f"gist_condition={gist.condition!r}", "only the gist mask confines the instruction to the gists (the "
              "controls are for comparison)", "compress with a model trained with gist_condition='gist'")
    if not instruction.strip():
        p.add("instruction ''", "nothing to compress", "give the instruction's text")
    p.raise_if_any()
    _refuse_absolute_positions(model)
    device = next(model.parameters()).device
    text, _ = gist_prompt(instruction, "", gist.num)
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    k = gist.num
    if ids[-k:] != [gist.token_id] * k:
        p.add(f"tokenizer {type(tokenizer).__name__}", "it does not end the prompt with the gist tokens",
              "add the gist token to the tokenizer (slimtune.load_adapter(..., tokenizer=tok))")
        p.raise_if_any()
    n = len(ids)
    x = torch.tensor([ids], device=device)
    pos = (torch.arange(n, device=device) - (n - k))[None]  # the gists at 0..k-1
    cache = DynamicCache(config=model.config)
    was = model.training
    model.eval()
    model(input_ids=x, attention_mask=torch.ones_like(x), position_ids=pos, use_cache=True, **{_cache_kw(model): cache})
    model.train(was)
    keys = [layer.keys[0, :, -k:].clone() for layer in cache.layers]  # (kv_heads, k, head_dim) per layer
    values = [layer.values[0, :, -k:].clone() for layer in cache.layers]
    return GistCache(keys, values, identity, instruction, n - k)


def batch_after_gists(model, caches: list["GistCache | None"], rows: list[list[int]], pad_id: int,
                      gist_token_id: int | None = None) -> dict:
    """Token rows, row i after caches[i] (None: no cache), as one batch: input_ids (B, P + T)
    with P slots for the gists (each row's cache left-padded to the longest, P) then the rows
    left-padded to T, their attention_mask, and a DynamicCache holding the rows' gist keys and
    values (empty when no row has a cache), under the forward's name for it (`cache` in
    transformers 5). Only input_ids[:, P:] is left to run; the gist slots hold gist_token_id."""
    device = next(model.parameters()).device
    P = max((c.num for c in caches if c is not None), default=0)
    T = max(len(r) for r in rows)
    B = len(rows)
    ids = torch.full((B, P + T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, P + T), dtype=torch.long)
    for i, (c, r) in enumerate(zip(caches, rows)):
        if c is not None:
            ids[i, P - c.num:P], mask[i, P - c.num:P] = pad_id if gist_token_id is None else gist_token_id, 1
        ids[i, P + T - len(r):], mask[i, P + T - len(r):] = torch.tensor(r), 1
    if not P:
        return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
                _cache_kw(model): DynamicCache(config=model.config)}
    some = next(c for c in caches if c is not None)
    layers = []
    for layer in range(len(some.keys)):
        def stacked(kind: str) -> torch.Tensor:  # (B, kv_heads, P, head_dim), zeros where a row's cache is shorter
            t0 = getattr(some, kind)[layer]
            rows_kv = [getattr(c, kind)[layer] if c is not None else t0[..., :0, :] for c in caches]
            return torch.stack([torch.nn.functional.pad(t, (0, 0, P - t.shape[-2], 0)) for t in rows_kv]).to(device)
        layers.append((stacked("keys"), stacked("values")))
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device),
            _cache_kw(model): DynamicCache(ddp_cache_data=layers, config=model.config)}


def cached_inputs(model, tokenizer, caches: list[GistCache], inputs: list[str], gist_token_id: int) -> dict:
    """What transformers' `generate` (or eval.generation.decode) takes to answer `inputs`,
    row i after caches[i] (batch_after_gists over the inputs' tokens)."""
    if len(caches) != len(inputs):
        p = Problems("caches and inputs do not pair up")
        p.add(f"{len(caches)} caches, {len(inputs)} inputs", "one cache per input row", "give as many of each")
        p.raise_if_any()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    rest = [tokenizer(gist_prompt("", x, 1)[1], add_special_tokens=False)["input_ids"] for x in inputs]
    return batch_after_gists(model, caches, rest, pad, gist_token_id)


def save_cache(cache: GistCache, path: str | Path) -> Path:
    tensors = {f"{kind}.{i}": t.contiguous().cpu() for kind in ("keys", "values")
               for i, t in enumerate(getattr(cache, kind))}
    meta = {"identity": cache.identity, "instruction": cache.instruction,
            "instruction_tokens": cache.instruction_tokens}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), {META_KEY: json.dumps(meta)})
    return path


def load_cache(path: str | Path, identity: dict | None = None) -> GistCache:
    """A saved gist cache; with `identity` (the model's and adapter's), one made by another model
    or adapter is an error."""
    path = Path(path)
    p = Problems(f"cannot load the gist cache {str(path)!r}")
    if not path.is_file():
        p.add(str(path), "no such file", "give a file written by `slimtune gist compress`")
        p.raise_if_any()
    try:
        with safe_open(str(path), "pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = json.loads(header[META_KEY])
        n = len([k for k in tensors if k.startswith("keys.")])
        keys = [tensors[f"keys.{i}"] for i in range(n)]
        values = [tensors[f"values.{i}"] for i in range(n)]
    except Exception as e:  # not safetensors, or not a gist cache
        p.add(str(path), f"not a gist cache ({type(e).__name__}: {str(e)[:120]})",
              "give a file written by `slimtune gist compress`")
        p.raise_if_any()
    if not n or any(not torch.isfinite(t).all() for t in keys + values):
        p.add(str(path), "empty, or holds values that are not finite", "compress the instruction again")
        p.raise_if_any()
    cache = GistCache(keys, values, meta.get("identity", {}), meta.get("instruction", ""),
                      int(meta.get("instruction_tokens", 0)))
    if identity is not None:
        for what in sorted(set(identity) | set(cache.identity)):
            if identity.get(what) != cache.identity.get(what):
                p.add(f"{what} {cache.identity.get(what)!r}", f"the cache was made with another {what} than this "
                      f"one ({identity.get(what)!r})", "compress the instruction again with this model and adapter")
        p.raise_if_any()
    return cache
