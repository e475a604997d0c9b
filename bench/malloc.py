"""What keeping freed memory in the process (slimtune.train.memory) buys a CPU training step.

    python bench/malloc.py                 # floor and LoRA steps on SmolLM2-135M, 3 rounds

glibc's settings cannot be undone inside a process (and a heap that has grown serves later
blocks whatever the setting), so each arm runs in its own process, arms in alternation over
the rounds; within a process the frozen floor step and a LoRA step alternate. Arms:
- `default`: glibc as it comes (dynamic mmap threshold, trim at 128 KiB of free heap top);
- `threshold`: the mmap threshold fixed at its largest, 32 MiB, trim at 2 GiB (slimtune.train.memory
  before 2026-11-22: blocks above 32 MiB, the loss's logits, still mapped per use);
- `keep`: slimtune.train.memory.keep_freed_memory() as it is (mmap off: every block stays).
Prints each arm's median step time and page faults, and the ratios to `keep`.
"""

from __future__ import annotations

import argparse
import copy
import json
import resource
import statistics
import subprocess
import sys


def child(arm: str, steps: int, model: str) -> None:
    import ctypes

    import torch

    import slimtune
    from slimtune.train import memory as alloc

    if arm == "keep":
        assert alloc.keep_freed_memory()
    elif arm == "threshold":
        libc = ctypes.CDLL("libc.so.6")
        assert libc.mallopt(alloc.M_MMAP_THRESHOLD, alloc.MMAP_THRESHOLD_MAX)
        assert libc.mallopt(alloc.M_TRIM_THRESHOLD, alloc.TRIM_THRESHOLD)
    from step import Variant  # bench/step.py: the floor and the adapter's step, defined once

    torch.manual_seed(0)
    base = slimtune.load_model(model).requires_grad_(False)
    ids = torch.randint(0, base.config.vocab_size, (4, 256))
    variants = [Variant("floor", copy.deepcopy(base), "cpu"),
                Variant("lora", slimtune.add_adapter(base, slimtune.preset("lora")), "cpu")]
    out = {v.name: [] for v in variants}
    for i in range(steps + 1):  # the first round warms up
        for v in variants:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            v.step(ids, "cpu", torch.float32, memory=False)
            if i:
                out[v.name].append((v.times[-1], resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0))
    print(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=3, help="steps of each model per process")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args.child, args.steps, args.model)
    arms = ["default", "threshold", "keep"]
    res = {a: {"floor": [], "lora": []} for a in arms}
    for _ in range(args.rounds):
        for arm in arms:
            cmd = [sys.executable, __file__, "--child", arm, "--steps", str(args.steps), "--model", args.model]
            run = subprocess.run(cmd, check=True, capture_output=True, text=True)
            for k, v in json.loads(run.stdout.strip().splitlines()[-1]).items():
                res[arm][k] += v
    med = {a: {k: (statistics.median(t for t, _ in v), statistics.median(f for _, f in v)) for k, v in r.items()}
           for a, r in res.items()}
    print(f"# bench/malloc.py  {args.rounds} rounds x {args.steps} steps per arm")
    print("| arm | floor ms | floor faults | LoRA ms | LoRA faults | floor / keep | LoRA / keep | LoRA / floor |")
    print("|---|---|---|---|---|---|---|---|")
    for a in arms:
        (ft, ff), (lt, lf) = med[a]["floor"], med[a]["lora"]
        print(f"| {a} | {ft * 1e3:.0f} | {ff:.0f} | {lt * 1e3:.0f} | {lf:.0f} | {ft / med['keep']['floor'][0]:.3f} "
              f"| {lt / med['keep']['lora'][0]:.3f} | {lt / ft:.3f} |")


if __name__ == "__main__":
    main()
