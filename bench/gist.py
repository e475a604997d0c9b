"""Answering with a gist cache against answering with the full prompt, on SmolLM2-135M and
the Alpaca+ human split (the paper's efficiency setting: prefill of the prompt, batch 1).

    python bench/gist.py                         # CPU; a fresh LoRA + gist row (same compute as a trained one)
    python bench/gist.py --adapter /tmp/gist_demo/gist/adapter --device cuda

Per example, both ways, alternated in one run:
- full:   `Instruction: {instruction}\\n<GIST>\\nInput: {input}\\nOutput:` prefilled under the gist mask;
- cached: the input part only, after the instruction's gist cache (k keys and values per layer).
Columns: prefill FLOPs (counted by torch's FlopCounterMode on the real forward, logits for the
last position only, as a server computes them), time to first
token (prefill + first token, median), KV-cache bytes after the prefill, and batched
throughput (32 rows, 32 new tokens each, greedy). The cost of building a cache (one
instruction forward) is reported with the number of uses after which it has paid for itself.
Targets: FLOPs -40 % or more, time to first token and KV bytes falling in proportion.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

import slimtune
from slimtune.data.batches import collate
from slimtune.data.gist import GistMask
from slimtune.data.rows import Example
from slimtune.data.templates import gist_prompt
from slimtune.eval.generation import _cache_kw, generate
from slimtune.eval.gist_cache import cached_inputs
from slimtune.models.attention import model_mask
from transformers import DynamicCache

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def full_batch(tok, spec, rows):
    ids = []
    for r in rows:
        a, b = gist_prompt(r["instruction"], r["input"], spec.num)
        ids.append(tok(a)["input_ids"] + tok(b, add_special_tokens=False)["input_ids"])
    return collate(ids, ids, tok.pad_token_id or 0, side="left", gist=GistMask(spec.token_id, spec.condition))


@torch.no_grad()
def prefill_full(model, tok, spec, row):
    """Prefill of the full prompt and the first token; (seconds, cache bytes)."""
    t0 = time.perf_counter()
    b = full_batch(tok, spec, [row])
    cache = DynamicCache(config=model.config)
    out = model(input_ids=b["input_ids"], attention_mask=model_mask(b["attention_mask"], model, torch.float32),
                position_ids=b["position_ids"], use_cache=True, logits_to_keep=1, **{_cache_kw(model): cache})
    out.logits[:, -1].argmax(-1)
    return time.perf_counter() - t0, cache_bytes(cache), b["input_ids"].shape[1]


@torch.no_grad()
def prefill_cached(model, tok, gist_cache, row):
    t0 = time.perf_counter()  # the cache was checked against the model when loaded: no identity check here
    kw = cached_inputs(model, tok, [gist_cache], [row["input"]], slimtune.gist_tokens(model).token_id)
    cache = kw.pop(_cache_kw(model))
    mask = kw["attention_mask"]
    P = cache.get_seq_length()
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    out = model(input_ids=kw["input_ids"][:, P:], attention_mask=mask, position_ids=pos[:, P:], use_cache=True,
                logits_to_keep=1, **{_cache_kw(model): cache})
    out.logits[:, -1].argmax(-1)
    return time.perf_counter() - t0, cache_bytes(cache), kw["input_ids"].shape[1] - P


def cache_bytes(cache) -> int:
    return sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))


def flops(fn) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--adapter", default=None, help="a gist adapter; default: a fresh LoRA with a gist row")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--examples", type=int, default=252)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    torch.manual_seed(0)
    model = slimtune.load_model(args.model).to(args.device).eval()
    tok = slimtune.load_tokenizer(args.model)
    if args.adapter:
        slimtune.load_adapter(model, args.adapter, tokenizer=tok)
    else:
        slimtune.add_adapter(model, slimtune.preset("lora"))
        slimtune.add_gist_tokens(model, slimtune.GistTokens(slimtune.add_gist_token(tok), 1))
    spec = slimtune.gist_tokens(model)
    rows = json.loads((SHARED / "alpaca_plus" / "validation_human.json").read_text())[: args.examples]
    caches, build = {}, []
    for r in rows:  # each instruction compressed once (the human split has one input per instruction)
        if r["instruction"] not in caches:
            t0 = time.perf_counter()
            caches[r["instruction"]] = slimtune.compress_gist(model, tok, r["instruction"])
            build.append(time.perf_counter() - t0)
    for r in rows[:3]:  # warm-up
        prefill_full(model, tok, spec, r), prefill_cached(model, tok, caches[r["instruction"]], r)
    f_full, f_cached, t_full, t_cached, kv_full, kv_cached, n_full, n_cached = ([] for _ in range(8))
    for i, r in enumerate(rows):
        c = caches[r["instruction"]]
        f_full.append(flops(lambda: prefill_full(model, tok, spec, r)))
        f_cached.append(flops(lambda: prefill_cached(model, tok, c, r)))
        order = (0, 1) if i % 2 == 0 else (1, 0)  # alternate which goes first
        for which in order:
            if which == 0:
                t, kv, n = prefill_full(model, tok, spec, r)
                t_full.append(t), kv_full.append(kv), n_full.append(n)
            else:
                t, kv, n = prefill_cached(model, tok, c, r)
                t_cached.append(t), kv_cached.append(kv), n_cached.append(n)
    # batched throughput: 32 rows, greedy, both ways, alternated, best of 3
    batch = rows[: args.batch]
    tput = {"full": [], "cached": []}
    examples = [Example([], "", r["instruction"], r["input"]) for r in batch]
    for _ in range(3):
        t0 = time.perf_counter()
        generate(model, tok, examples, "gist", args.new_tokens, args.batch, gist=spec)
        tput["full"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        slimtune.answer_with_gists(model, tok, [caches[r["instruction"]] for r in batch], [r["input"] for r in batch],
                                   args.new_tokens, args.batch)
        tput["cached"].append(time.perf_counter() - t0)
    res = {
        "model": args.model, "device": args.device, "examples": len(rows), "threads": torch.get_num_threads(),
        "prompt_tokens": {"full": statistics.mean(n_full), "cached": statistics.mean(n_cached)},
        "prefill_flops": {"full": statistics.mean(f_full), "cached": statistics.mean(f_cached),
                          "reduction": 1 - sum(f_cached) / sum(f_full)},
        "ttft_s": {"full": statistics.median(t_full), "cached": statistics.median(t_cached),
                   "reduction": 1 - statistics.median(t_cached) / statistics.median(t_full),
                   "reduction_total": 1 - sum(t_cached) / sum(t_full)},
        "kv_bytes": {"full": statistics.mean(kv_full), "cached": statistics.mean(kv_cached),
                     "reduction": 1 - sum(kv_cached) / sum(kv_full)},
        "throughput_tok_s": {"full": args.batch * args.new_tokens / min(tput["full"]),
                             "cached": args.batch * args.new_tokens / min(tput["cached"])},
        "cache_build_s": statistics.median(build),
    }
    res["throughput_tok_s"]["ratio"] = res["throughput_tok_s"]["cached"] / res["throughput_tok_s"]["full"]
    saved = res["ttft_s"]["full"] - res["ttft_s"]["cached"]
    res["cache_build_breakeven_uses"] = res["cache_build_s"] / saved if saved > 0 else None
    print(json.dumps(res, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
