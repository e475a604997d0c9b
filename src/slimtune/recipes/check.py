"""`slimtune check`: the core on a real model, end to end.

For every preset: add the adapter to the model, check that its output at init equals the
base model's, take one optimiser step on the prompt (so the adapter is no longer identity),
then check merged == unmerged (for a method that cannot merge, that merging is refused),
disabled == base and save -> load round-trips bit-exactly.
"""

from __future__ import annotations

import copy
import tempfile
import time

import torch

from ..adapters.helpers import (count_parameters, disable_adapters, merge_adapters, set_trainable,
                                trainable_parameters)
from ..adapters.inject import add_adapter
from ..adapters.registry import PRESETS, preset
from ..errors import SlimtuneError
from ..formats.adapter import load_adapter, save_adapter
from ..models.load import load_model, load_tokenizer


def _prompt_ids(tokenizer, prompt: str) -> torch.Tensor:
    if tokenizer.chat_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    else:
        text = prompt
    return tokenizer(text, return_tensors="pt").input_ids


@torch.no_grad()
def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def check_method(base, name: str, ids: torch.Tensor, base_logits: torch.Tensor) -> dict:
    model = add_adapter(copy.deepcopy(base), preset(name))
    with torch.no_grad():
        init_diff = _max_diff(model(ids).logits, base_logits)
    params = set_trainable(model)
    opt = torch.optim.AdamW(params, lr=1e-2)
    model(ids, labels=ids).loss.backward()
    opt.step()
    with torch.no_grad():
        logits = model(ids).logits
        moved = _max_diff(logits, base_logits)
        with disable_adapters(model):
            disabled = _max_diff(model(ids).logits, base_logits)
        with tempfile.TemporaryDirectory() as d:
            save_adapter(model, d)
            reloaded = load_adapter(copy.deepcopy(base), d)
            same = trainable_parameters(reloaded)
            exact = all(torch.equal(t, same[k]) for k, t in trainable_parameters(model).items())
            reloaded(ids)  # its first forward learns the sibling groups, as the model's did (a float-rounding difference)
            exact = exact and torch.equal(reloaded(ids).logits, logits)
        try:
            merge_adapters(model)
            merged = _max_diff(model(ids).logits, logits)
        except SlimtuneError:  # a mixture: refused, by name, with nothing changed
            merged = None if torch.equal(model(ids).logits, logits) else float("inf")
    return {"method": name, "trainable": count_parameters(model).trainable, "init_vs_base": init_diff,
            "moved": moved, "merged_vs_unmerged": merged, "disabled_vs_base": disabled, "reload_exact": exact}


def run_check(model_name: str, prompt: str) -> int:
    t0 = time.perf_counter()
    base = load_model(model_name).requires_grad_(False).eval()
    tokenizer = load_tokenizer(model_name)
    print(f"loaded {model_name} in {time.perf_counter() - t0:.1f} s "
          f"({sum(p.numel() for p in base.parameters()):,} parameters)")
    ids = _prompt_ids(tokenizer, prompt)
    with torch.no_grad():
        base_logits = base(ids).logits
        reply = base.generate(ids, max_new_tokens=24, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    print(f"prompt: {prompt!r}\nbase model replies: {tokenizer.decode(reply[0, ids.shape[1]:], skip_special_tokens=True)!r}\n")
    print(f"{'method':<16}{'trainable':>11}{'init-base':>11}{'moved':>9}{'merged':>10}{'disabled':>10}  reload")
    ok = True
    for name in PRESETS:
        r = check_method(base, name, ids, base_logits)
        merged = r["merged_vs_unmerged"]
        good = (r["init_vs_base"] <= 1e-5 and r["moved"] > 1e-4 and (merged is None or merged <= 1e-3)
                and r["disabled_vs_base"] <= 1e-5 and r["reload_exact"])
        ok &= good
        print(f"{name:<16}{r['trainable']:>11,}{r['init_vs_base']:>11.1e}{r['moved']:>9.2f}"
              f"{'refused' if merged is None else f'{merged:.1e}':>10}{r['disabled_vs_base']:>10.1e}  "
              f"{'exact' if r['reload_exact'] else 'DIFFERS'}  {'ok' if good else 'FAILED'}")
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1
