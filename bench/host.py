"""Where a GPU training step's time goes: the host launching kernels, or the GPU running them.

    python bench/host.py --random-init                   # CUDA, batch 4 x 256
    python bench/host.py --random-init --methods lora --cprofile

For the floor and each adapter (and PEFT's, where PEFT has the method), one training step as
bench/step.py runs it (bf16 base, fp32 adapters, bf16 autocast, fused AdamW), in alternation:
- host: the time until the step's last kernel is queued (before synchronising);
- total: the step until the GPU is done; total ≈ host means the step is bound by the host;
- kernels: CUDA kernels the step launches, and GPU busy: the sum of their durations
  (torch.profiler, one step). On a host-bound step, fewer kernels and less Python per layer
  are what make it faster, not fewer multiply-adds.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import statistics
import time

import torch
from step import Variant, base_and_batch, model_args, variant


def kernels(v: Variant, ids: torch.Tensor, dtype: torch.dtype) -> tuple[int, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        v.step(ids, "cuda", dtype, memory=False)
    gpu = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.count for e in gpu), sum(e.self_device_time_total for e in gpu) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(ap)
    ap.add_argument("--methods", nargs="+", default=["lora", "vera", "tied-lora", "ia3"])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--cprofile", action="store_true", help="also print the Python profile of the first method")
    args = ap.parse_args()
    if args.device != "cuda" or not torch.cuda.is_available():
        raise SystemExit(f"bench/host.py measures a CUDA step: --device {args.device} (CUDA available: "
                         f"{torch.cuda.is_available()}); run it on a GPU machine with --device cuda")
    base, ids, dtype = base_and_batch(args)
    names = ["floor"]
    for m in args.methods:  # with PEFT's own where PEFT has the method
        names += [m, f"peft {m}"] if m in ("lora", "vera", "ia3") else [m]
    variants = [variant(base, n, "cuda") for n in names]
    for rnd in range(args.reps + 3):  # three warm-up rounds
        for v in variants:
            v.step(ids, "cuda", dtype, memory=False)
            if rnd < 3:
                v.forget()
    print(f"# bench/host.py  {args.model}{' (random init)' if args.random_init else ''}  {torch.cuda.get_device_name()}"
          f"  {str(dtype).split('.')[-1]}  batch {args.batch} x {args.seq}  torch {torch.__version__}"
          f"  {time.strftime('%Y-%m-%d')}\n")
    print("| variant | host ms | total ms | kernels | GPU busy ms |")
    print("|---|---|---|---|---|")
    for v in variants:
        host, total = statistics.median(v.queued), statistics.median(v.times)
        n, busy = kernels(v, ids, dtype)
        print(f"| {v.name} | {host * 1e3:.1f} | {total * 1e3:.1f} | {n} | {busy:.1f} |")
    if args.cprofile:
        v = variants[1]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(10):
            v.step(ids, "cuda", dtype, memory=False)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
        print(f"\n{v.name}, 10 steps:\n{out.getvalue()}")


if __name__ == "__main__":
    main()
