"""Gist caches end to end: compress an instruction with a trained gist adapter, answer inputs
with saved caches (`slimtune gist compress`, `slimtune generate --gist`), and the same from
Python.

    model, tok = slimtune.load_model(), slimtune.load_tokenizer()
    slimtune.load_adapter(model, "runs/gist/adapter", tokenizer=tok)
    cache = slimtune.compress_gist(model, tok, "Translate to French.")
    slimtune.answer_with_gists(model, tok, [cache, cache], ["Good morning", "Thank you"])
    # or transformers' own generate, with a transformers cache:
    out = model.generate(**slimtune.gist_inputs(model, tok, [cache], ["Good morning"]), max_new_tokens=32)
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..adapters.gist import gist_tokens
from ..adapters.helpers import trainable_parameters
from ..adapters.inject import get_config
from ..errors import Problems
from ..eval.gist_cache import GistCache, cached_inputs, compress, load_cache, save_cache
from ..eval.generation import decode
from ..models.load import load_model, load_tokenizer, resolve_device
from ..formats.adapter import load_adapter


def _digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@torch.no_grad()
def identity(model, name: str | None = None) -> dict:
    """What a gist cache depends on: the base model (architecture, shapes and a sample of its
    weights), the adapter's tensors (the active one, or `name`), and its gist settings."""
    cfg = model.config
    emb = model.get_input_embeddings().weight
    sample = [emb[:: max(1, emb.shape[0] // 64)]] + [p for n, p in model.named_parameters() if "norm" in n][:8]
    adapter = trainable_parameters(model, name)
    spec = gist_tokens(model, name)
    return {"model": {"architecture": type(model).__name__, "layers": getattr(cfg, "num_hidden_layers", None),
                      "hidden": getattr(cfg, "hidden_size", None), "weights": _digest(sample)},
            "adapter": None if not adapter else {"method": getattr(get_config(model, name), "preset", None),
                                                 "tensors": _digest(adapter[k] for k in sorted(adapter))},
            "gist": None if spec is None else spec.to_dict()}


def _spec(model):
    spec = gist_tokens(model)
    if spec is None:
        p = Problems("the model has no gist tokens")
        p.add(f"model {type(model).__name__}", "its active adapter was not trained with gist tokens",
              "load an adapter trained with `slimtune train --gist K` (load_adapter(..., tokenizer=tok))")
        p.raise_if_any()
    return spec


def compress_gist(model, tokenizer, instruction: str) -> GistCache:
    """The instruction's gist cache under the model's active adapter."""
    return compress(model, tokenizer, _spec(model), instruction, identity(model))


def gist_inputs(model, tokenizer, caches: list[GistCache], inputs: list[str]) -> dict:
    """Keyword arguments for transformers' `model.generate` (input_ids, attention_mask, the
    cache): row i answers inputs[i] after caches[i]. Caches made by another model or adapter
    are refused."""
    spec, mine = _spec(model), identity(model)
    for c in caches:
        if c.identity != mine:
            p = Problems("the gist cache does not fit this model")
            what = [k for k in sorted(set(mine) | set(c.identity)) if mine.get(k) != c.identity.get(k)]
            p.add(f"cache of {c.instruction[:40]!r}", f"it was made with another {' and '.join(what)}",
                  "compress the instruction again with this model and adapter")
            p.raise_if_any()
    return cached_inputs(model, tokenizer, caches, inputs, spec.token_id)


@torch.no_grad()
def answer_with_gists(model, tokenizer, caches: list[GistCache], inputs: list[str], max_new_tokens: int = 64,
                      batch_size: int = 16) -> list[str]:
    """Greedy answers to inputs[i] after caches[i], in batches."""
    was = model.training
    model.eval()
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    outs: list[str] = []
    for i in range(0, len(inputs), batch_size):
        kw = gist_inputs(model, tokenizer, caches[i:i + batch_size], inputs[i:i + batch_size])
        cache = kw.pop(next(k for k in kw if k not in ("input_ids", "attention_mask")))
        new = decode(model, kw["input_ids"], kw["attention_mask"], None, max_new_tokens, tokenizer.eos_token_id, pad,
                     cache=cache)
        outs += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    model.train(was)
    return outs


def load_for_gists(model_name: str, adapter: str, device: str = "auto"):
    """(model, tokenizer) with the gist adapter loaded, for the commands."""
    model = load_model(model_name).to(resolve_device(device))
    tok = load_tokenizer(model_name)
    load_adapter(model, adapter, tokenizer=tok)
    _spec(model)
    return model.eval(), tok


def run_compress(model_name: str, adapter: str, instruction: str, out: str, device: str = "auto") -> GistCache:
    model, tok = load_for_gists(model_name, adapter, device)
    cache = compress_gist(model, tok, instruction)
    save_cache(cache, out)
    return cache


def run_gist_generate(model_name: str, adapter: str | None, gist: str, inputs: list[str], max_new_tokens: int,
                      batch_size: int, device: str = "auto") -> list[dict]:
    if not adapter:
        p = Problems("a gist cache needs its adapter")
        p.add(f"gist={gist!r} without --adapter", "the cache was made by a gist adapter, which must answer too",
              "pass --adapter DIR (the adapter the cache was compressed with)")
        p.raise_if_any()
    model, tok = load_for_gists(model_name, adapter, device)
    cache = load_cache(Path(gist), identity(model))
    answers = answer_with_gists(model, tok, [cache] * len(inputs), inputs, max_new_tokens, batch_size)
    return [{"instruction": cache.instruction, "input": x, "response": a} for x, a in zip(inputs, answers)]
