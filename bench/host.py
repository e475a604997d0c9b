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
import copy
import cProfile
import io
import pstats
import statistics
import time

import torch
from step import Variant, adapted, load_base, peft_model

import slimtune


def timed_step(v: Variant, ids: torch.Tensor, dtype: torch.dtype) -> tuple[float, float]:
    t0 = time.perf_counter()
    with torch.autocast("cuda", dtype=dtype):
        loss = v.model(ids, labels=ids).loss
    loss.backward()
    if v.opt:
        v.opt.step()
        v.opt.zero_grad(set_to_none=True)
    queued = time.perf_counter()
    torch.cuda.synchronize()
    return queued - t0, time.perf_counter() - t0


def kernels(v: Variant, ids: torch.Tensor, dtype: torch.dtype) -> tuple[int, float]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        timed_step(v, ids, dtype)
    gpu = [e for e in prof.key_averages() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.count for e in gpu), sum(e.self_device_time_total for e in gpu) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=slimtune.DEFAULT_MODEL)
    ap.add_argument("--random-init", action="store_true", help="--model's shipped config with random weights")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--methods", nargs="+", default=["lora", "vera", "tied-lora", "ia3"])
    ap.add_argument("--reps", type=int, default=15)
    ap.add_argument("--cprofile", action="store_true", help="also print the Python profile of the first method")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/host.py measures a CUDA step: no CUDA device here")
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    torch.manual_seed(0)
    base = load_base(args.model, args.random_init, "cuda", dtype)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), device="cuda")
    variants = [Variant("floor", copy.deepcopy(base), "cuda")]
    for m in args.methods:
        variants.append(Variant(m, adapted(base, slimtune.preset(m)), "cuda"))
        if m in ("lora", "vera", "ia3"):
            variants.append(Variant("peft " + m, peft_model(copy.deepcopy(base), m, None), "cuda"))
    times = {v.name: [] for v in variants}
    for rnd in range(args.reps + 3):  # three warm-up rounds
        for v in variants:
            t = timed_step(v, ids, dtype)
            if rnd >= 3:
                times[v.name].append(t)
    print(f"# bench/host.py  {args.model}{' (random init)' if args.random_init else ''}  {torch.cuda.get_device_name()}"
          f"  {str(dtype).split('.')[-1]}  batch {args.batch} x {args.seq}  torch {torch.__version__}"
          f"  {time.strftime('%Y-%m-%d')}\n")
    print("| variant | host ms | total ms | kernels | GPU busy ms |")
    print("|---|---|---|---|---|")
    for v in variants:
        host = statistics.median(h for h, _ in times[v.name])
        total = statistics.median(t for _, t in times[v.name])
        n, busy = kernels(v, ids, dtype)
        print(f"| {v.name} | {host * 1e3:.1f} | {total * 1e3:.1f} | {n} | {busy:.1f} |")
    if args.cprofile:
        v = variants[1]
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(10):
            timed_step(v, ids, dtype)
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("tottime").print_stats(25)
        print(f"\n{v.name}, 10 steps:\n{out.getvalue()}")


if __name__ == "__main__":
    main()
