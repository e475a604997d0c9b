"""Generation: a lean decoding loop over a transformers cache, and batched responses to examples.

`decode` continues a left-padded batch token by token. Its mask is the batch's own: 2-D (real
tokens) or 4-D (B, 1, T, T) boolean, so prompts whose tokens may not all see each other (gist
tokens) generate as they were trained. A generated token sees what the prompt's last token saw,
and every token generated before it. Greedy decoding equals transformers' `generate`
(tests/test_generation.py).
"""

from __future__ import annotations

import inspect

import torch
from transformers import DynamicCache

from ..data.batches import collate, pad_id
from ..data.gist import GistMask
from ..data.rows import Example
from ..data.templates import format_example
from ..errors import Problems
from ..models.attention import compute_dtype, model_mask, real_tokens


def _pick(logits: torch.Tensor, do_sample: bool, temperature: float, top_p: float,
          gen: torch.Generator | None) -> torch.Tensor:
    """(B,) next tokens from (B, V) logits: greedy, or sampled with temperature and nucleus."""
    if not do_sample:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / max(temperature, 1e-5), -1)
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)
        drop = sorted_p.cumsum(-1) - sorted_p > top_p  # keep the smallest prefix reaching top_p
        probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
    return torch.multinomial(probs.cpu(), 1, generator=gen).squeeze(-1).to(logits.device)


def _cache_kw(model) -> str:
    """The forward's name for the cache: `cache` (transformers >= 5.x), else `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def decode(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor | None = None,
           max_new_tokens: int = 64, eos_token_id: int | None = None, pad_token_id: int = 0, do_sample: bool = False,
           temperature: float = 1.0, top_p: float = 1.0, generator: torch.Generator | None = None,
           cache=None) -> torch.Tensor:
    """(B, n) new tokens after a left-padded prompt batch (n <= max_new_tokens; finished rows
    are padded with pad_token_id after their EOS). `cache`: a transformers cache that already
    holds the first tokens of input_ids (gist caches, eval/gist_cache.py); only the rest run."""
    if model.config.is_encoder_decoder:
        p = Problems("cannot decode")
        p.add(f"model {type(model).__name__}", "slimtune generates with decoder-only models", "use model.generate")
        p.raise_if_any()
    B = input_ids.shape[0]
    device = input_ids.device
    real = real_tokens(attention_mask)  # (B, T)
    if position_ids is None:
        position_ids = (real.long().cumsum(-1) - 1).clamp(min=0)
    four_d = attention_mask.dim() == 4
    # what generated tokens see of the prompt: the last prompt token's row (B, 1, 1, T), or the real tokens
    seen = attention_mask[:, :, -1:, :].bool() if four_d else attention_mask.long()
    dtype = compute_dtype(model, device)
    past = 0 if cache is None else cache.get_seq_length()
    cache = {_cache_kw(model): DynamicCache(config=model.config) if cache is None else cache}
    prompt_mask = attention_mask[:, :, past:] if four_d else attention_mask
    out = model(input_ids=input_ids[:, past:], attention_mask=model_mask(prompt_mask, model, dtype),
                position_ids=position_ids[:, past:], use_cache=True, **cache)
    logits, pos = out.logits[:, -1], position_ids[:, -1]
    done = torch.zeros(B, dtype=torch.bool, device=device)
    new = []
    for step in range(max_new_tokens):
        tok = _pick(logits, do_sample, temperature, top_p, generator)
        tok = torch.where(done, torch.full_like(tok, pad_token_id), tok)
        new.append(tok)
        if eos_token_id is not None:
            done |= tok == eos_token_id
        if done.all() or step == max_new_tokens - 1:
            break
        pos = pos + 1
        if four_d:
            seen = torch.cat([seen, torch.ones(B, 1, 1, 1, dtype=torch.bool, device=device)], -1)
            mask = model_mask(seen, model, dtype)
        else:
            seen = torch.cat([seen, torch.ones(B, 1, dtype=seen.dtype, device=device)], -1)
            mask = seen
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos[:, None], use_cache=True, **cache)
        logits = out.logits[:, -1]
    return torch.stack(new, 1) if new else input_ids.new_zeros(B, 0)


@torch.no_grad()
def generate(model, tokenizer, examples: list[Example], template: str = "chat", max_new_tokens: int = 64,
             batch_size: int = 16, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             seed: int = 0, gist=None) -> list[str]:
    """Responses to the examples' prompts, batched with left padding; greedy unless do_sample.
    `gist`: the model's gist tokens (models/gist.py GistTokens) for the gist template: the
    prompts then carry k gists and their mask."""
    device = next(model.parameters()).device
    prompts = [format_example(e, template, tokenizer, 1 if gist is None else gist.num)[0] for e in examples]
    mask = None if gist is None else GistMask(gist.token_id, gist.condition)
    outs: list[str] = []
    pad = pad_id(tokenizer)
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    for i in range(0, len(prompts), batch_size):
        ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts[i:i + batch_size]]
        b = collate(ids, ids, pad, side="left", gist=mask)
        new = decode(model, b["input_ids"].to(device), b["attention_mask"].to(device), None, max_new_tokens,
                     tokenizer.eos_token_id, pad, do_sample, temperature, top_p, gen)
        outs += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    model.train(was_training)
    return outs
