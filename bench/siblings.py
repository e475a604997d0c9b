"""Sibling layers sharing their down-projection (adapters/siblings.py), on against off.

One process, SmolLM2-135M, one training step (forward + backward + AdamW) at 4 × 256 (by
default) on the CPU, or on CUDA with a bf16 base as bench/step.py runs it. The frozen floor
runs between every two steps; each adapter runs twice, with its sibling groups (as slimtune
trains) and with every layer computing its own a = x Aᵀ (groups never learned).
Prints each step's time over the mean of the floor steps either side (median, range).

    python bench/siblings.py --methods vera lora --reps 4
    python bench/siblings.py --device cuda --random-init --batch 16 --seq 1024
"""

from __future__ import annotations

import argparse
import statistics
import sys

from step import Variant, adapted, alternate, base_and_batch, model_args, sites, variant

import slimtune
from slimtune.adapters.fast.layer import FastLayer, siblings_of
from slimtune.train.memory import keep_freed_memory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", nargs="+", default=["vera", "lora"], help="presets; 'vera=1024' sets the rank")
    ap.add_argument("--reps", type=int, default=4, help="rounds over all variants (after one warm-up round)")
    model_args(ap)
    args = ap.parse_args()
    dev = args.device
    if dev == "cpu":
        keep_freed_memory()  # as `slimtune train` does on CPU
    base, ids, dtype = base_and_batch(args)
    variants = [variant(base, "floor", dev)]
    for spec in args.methods:
        method, _, r = spec.partition("=")
        kw = {"r": int(r)} if r else {}
        for share in (True, False):
            model = adapted(base, slimtune.preset(method, **kw))
            if not share:  # every layer settled alone before the first forward: no group forms
                layers = [site for site, _ in sites(model)]
                siblings_of(layers[0]).settled.update(id(FastLayer.of(site)) for site in layers)
            variants.append(Variant(f"{spec} {'siblings' if share else 'each its own'}", model, dev))
    floor = variants[0]
    for rnd in range(args.reps + 1):  # round 0 warms up (and learns the groups)
        alternate(variants, ids, dev, dtype, memory=False, warm_up=rnd == 0)
        print(f"round {rnd}/{args.reps} done", file=sys.stderr, flush=True)
    print(f"floor {statistics.median(floor.times) * 1e3:.1f} ms/step ({dev}, {str(dtype).split('.')[-1]}, "
          f"batch {args.batch} x {args.seq})")
    for v in variants[1:]:
        print(f"{v.name:24s} time / floor {statistics.median(v.ratios):.3f} ({min(v.ratios):.3f}-{max(v.ratios):.3f})")


if __name__ == "__main__":
    main()
