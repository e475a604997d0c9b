"""Training throughput of slimtune's loop on SmolLM2-135M, per preset, against plain loops.

For each preset, in one process and alternating rounds (the machines are noisy):
- `slimtune`: train_step(), the loop every entry point uses (collation, token-normalised
  accumulation, schedule, clipping, AdamW);
- `plain`:    the same model, adapter and pre-collated batches, a bare loop:
              loss = sum-CE / tokens; loss.backward(); opt.step(); opt.zero_grad();
- `frozen`:   forward + backward of the frozen base model alone (nothing trained).
Prints tokens/s and the ratios slimtune/plain (the loop's own overhead; target >= 0.95)
and slimtune/frozen.

    python bench/train.py [--steps 4] [--reps 3] [--batch 8] [--presets lora vera ...]
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import statistics
import sys
import time

import torch

import slimtune
from slimtune import TrainConfig
from slimtune.train.loop import load_examples, micro_batches, setup, train_step
from slimtune.train.loss import CausalLMLoss

PRESETS = ["lora", "vera", "tied-lora", "tied-lora-ba", "ia3"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device) -> float:
    sync(device)
    t = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=4, help="optimiser steps per timed round")
    ap.add_argument("--reps", type=int, default=3, help="alternating rounds per variant")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--presets", nargs="+", default=PRESETS)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    cuda = torch.cuda.is_available() and args.device != "cpu"
    base_cfg = TrainConfig(batch_size=args.batch, demo_rows=64 * args.batch, eval_generate=0, progress=False,
                           device="cuda" if cuda else "cpu", precision="bf16" if cuda else "fp32", steps=10_000)
    tokenizer = slimtune.load_tokenizer(base_cfg.model)
    examples = load_examples(base_cfg)[:2]  # (train, validation); no skipped rows in the demo data
    runs = {}
    for name in args.presets:
        cfg = dataclasses.replace(base_cfg, method=name, adapter={"r": 256} if name == "vera" else {})
        model = slimtune.load_model(cfg.model, dtype=torch.bfloat16 if cuda else torch.float32)
        runs[name] = setup(cfg, model=model, tokenizer=tokenizer, examples=examples)
    any_run = next(iter(runs.values()))
    device = any_run.device
    batches = [micro_batches(any_run, s) for s in range(args.steps)]
    tokens = sum(int(b["attention_mask"].sum()) for mb in batches for b in mb)
    frozen = slimtune.load_model(base_cfg.model, dtype=torch.bfloat16 if cuda else torch.float32).to(device)
    frozen.requires_grad_(False)
    emb = frozen.get_input_embeddings()
    emb.register_forward_hook(lambda m, i, o: o.requires_grad_(True))  # a backward through every layer
    frozen_loss = CausalLMLoss(frozen)

    def frozen_loop():
        for mb in batches:
            for b in mb:
                with any_run.autocast():
                    s, n = frozen_loss(**b)
                (s / n).backward()

    def plain_loop(run):
        for mb in batches:
            for b in mb:
                with run.autocast():
                    s, n = run.loss_model(**b)
                (s / n).backward()
            run.opt.step()
            run.opt.zero_grad(set_to_none=True)

    def slimtune_loop(run):
        for s in range(args.steps):
            train_step(run, s)

    times: dict[str, list[float]] = {}
    for fn in [frozen_loop] + [lambda r=r: plain_loop(r) for r in runs.values()]:  # warm-up
        fn()
    for rep in range(args.reps):
        times.setdefault("frozen", []).append(timed(frozen_loop, device))
        for name, run in runs.items():
            order = [("plain", plain_loop), ("slimtune", slimtune_loop)]
            for variant, fn in (order if rep % 2 == 0 else order[::-1]):
                times.setdefault(f"{name}/{variant}", []).append(timed(lambda: fn(run), device))
        print(f"round {rep + 1}/{args.reps} done", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in times.items()}
    print(f"# bench/train.py  {platform.node()}  {torch.get_num_threads()} threads  device={device}  "
          f"{'bf16' if any_run.bf16 else 'fp32'}  batch {args.batch}  {args.steps} steps x {args.reps} rounds  "
          f"{tokens} tokens per round")
    print(f"{'preset':>14} {'trainable':>10} {'tok/s':>8} {'plain tok/s':>12} {'slimtune/plain':>15} "
          f"{'slimtune/frozen':>16}")
    print(f"{'frozen fwd+bwd':>14} {'-':>10} {tokens / med['frozen']:8.0f}")
    for name, run in runs.items():
        ours, plain = tokens / med[f"{name}/slimtune"], tokens / med[f"{name}/plain"]
        count = slimtune.count_parameters(run.model).trainable
        print(f"{name:>14} {count:>10,} {ours:8.0f} {plain:12.0f} {ours / plain:15.3f} "
              f"{ours / (tokens / med['frozen']):16.3f}")


if __name__ == "__main__":
    main()
