"""Many LoRA jobs over one base in one batch (`slimtune train --jobs`), against the same jobs
run one after another: throughput, peak memory, and equality with the run alone.

    python bench/jobs.py                          # SmolLM2-135M, CPU: N = 2, 4, 8, 16 LoRA r = 8 jobs
    python bench/jobs.py --device cuda --batch-size 8 --max-len 256

Each measurement runs in a process of its own (a clean peak memory):
- `solo`: one job trained by the plain loop (`train_step`, its adapter active), as
  `slimtune train` does. N jobs one after another in one process take N times its time.
- `jobs N`: N jobs (each its own seed, hence its own data order) trained together
  (`jobs_step`: one mixed-adapter batch of N micro-batches per step).
Reported: tokens/s of each (after --warmup steps), the ratio jobs / one-after-another, peak
memory against N processes and against the bound base + N x (adapter + gradients + optimiser
state + activations of one job) + 10 %, and how far job 0's adapter after the jobs run is from
its run alone (same seed, data order and steps): the largest difference and the share of
elements that differ by more than 1e-5. The floor for that is the same figure between two
equivalent runs alone, the fast path and the reference path (`solo-ref`): AdamW turns float
noise in a gradient near 0 into a step of up to lr either way.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

import slimtune
from slimtune.adapters import fast
from slimtune.adapters.helpers import trainable_parameters
from slimtune.recipes.train import peak_memory
from slimtune.train.jobs import jobs_step, setup_jobs
from slimtune.train.loop import setup, train_step


def config(args, i: int, out: str) -> slimtune.TrainConfig:
    return slimtune.TrainConfig(model=args.model, method="lora", data=["demo"], demo_rows=args.rows,
                                batch_size=args.batch_size, max_len=args.max_len, steps=args.warmup + args.steps,
                                seed=i, out=out, progress=False, eval_generate=0, warmup_steps=0,
                                device=args.device, precision=args.precision)


def rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(args, n: int) -> dict:
    """One process's measurement: n = 0 is the solo job (n = -1: on the reference path), n >= 1
    a jobs run of n jobs."""
    out = tempfile.mkdtemp()
    fast.use_reference(n == -1)
    if n <= 0:
        run = setup(config(args, 0, out))
        after_setup, device = rss(), run.device
        step = lambda k: [train_step(run, k)]  # noqa: E731
        adapter = lambda: trainable_parameters(run.model)  # noqa: E731
    else:
        jobs = setup_jobs([config(args, i, f"{out}/{i}") for i in range(n)])
        after_setup, device = rss(), jobs[0].run.device
        step = lambda k: list(jobs_step(jobs).values())  # noqa: E731
        adapter = lambda: trainable_parameters(jobs[0].run.model, jobs[0].name)  # noqa: E731
    tokens, t0 = 0, None
    for k in range(args.warmup + args.steps):
        if k == args.warmup:
            sync(device)
            t0 = time.perf_counter()
        stats = step(k)
        if k >= args.warmup:
            tokens += sum(s.tokens for s in stats)
    sync(device)
    seconds = time.perf_counter() - t0
    torch.save({k: v.detach().cpu() for k, v in adapter().items()}, f"{args.scratch}/adapter-{n}.pt")
    return {"n": n, "tokens": tokens, "seconds": seconds, "tokens_per_s": tokens / seconds,
            "after_setup_bytes": after_setup, "peak_bytes": peak_memory(device)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--n", type=int, nargs="+", default=[2, 4, 8, 16])
    ap.add_argument("--batch-size", type=int, default=2, help="rows per job and step")
    ap.add_argument("--max-len", type=int, default=96)
    ap.add_argument("--rows", type=int, default=400)
    ap.add_argument("--steps", type=int, default=4, help="timed steps")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--out", default=None, help="write the results here as JSON")
    ap.add_argument("--one", type=int, default=None, help=argparse.SUPPRESS)  # one measurement, in this process
    ap.add_argument("--scratch", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one is not None:
        print(json.dumps(measure(args, args.one)))
        return
    args.scratch = tempfile.mkdtemp()
    results = []
    for n in [0, -1] + args.n:
        cmd = [sys.executable, __file__, "--one", str(n), "--scratch", args.scratch] + \
              [a for k, v in vars(args).items() if k not in ("n", "out", "one", "scratch")
               for a in (f"--{k.replace('_', '-')}", str(v))]
        r = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1])
        results.append(r)
        print(json.dumps(r), flush=True)
    solo, base = results[0], results[0]["after_setup_bytes"]
    per_job = solo["peak_bytes"] - base  # one job's adapter, gradients, optimiser state and activations
    ref = torch.load(f"{args.scratch}/adapter-0.pt")

    def diff(n: int) -> tuple[float, float]:
        mine = torch.load(f"{args.scratch}/adapter-{n}.pt")
        d = torch.cat([(ref[k] - mine[k]).abs().flatten() for k in ref])
        return float(d.max()), float((d > 1e-5).float().mean())
    floor = diff(-1)
    rows = []
    for r in results[2:]:
        bound = (base + r["n"] * per_job) * 1.1
        rows.append({**r, "vs_one_after_another": r["tokens_per_s"] / solo["tokens_per_s"],
                     "vs_n_processes": r["peak_bytes"] / (r["n"] * solo["peak_bytes"]),
                     "bound_bytes": bound, "within_bound": r["peak_bytes"] <= bound,
                     "job0_max_abs_diff": diff(r["n"])[0], "job0_share_over_1e-5": diff(r["n"])[1]})
    print(f"\n{'N':>3} {'tok/s':>8} {'x one-after-another':>20} {'peak MiB':>9} {'x N processes':>14} "
          f"{'bound MiB':>10} {'job 0 diff':>11} {'share >1e-5':>12}")
    print(f"{'1':>3} {solo['tokens_per_s']:8.1f} {'(solo)':>20} {solo['peak_bytes'] / 2**20:9.0f} {'':>14} {'':>10} "
          f"{floor[0]:11.2e} {floor[1]:12.1e}  (solo-ref against solo: the floor)")
    for r in rows:
        print(f"{r['n']:>3} {r['tokens_per_s']:8.1f} {r['vs_one_after_another']:20.2f} {r['peak_bytes'] / 2**20:9.0f} "
              f"{r['vs_n_processes']:14.2f} {r['bound_bytes'] / 2**20:10.0f} {r['job0_max_abs_diff']:11.2e} "
              f"{r['job0_share_over_1e-5']:12.1e}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"args": {k: v for k, v in vars(args).items() if k not in ("one", "scratch")}, "solo": solo,
                       "solo_reference": results[1], "floor": {"max_abs_diff": floor[0], "share_over_1e-5": floor[1]},
                       "jobs": rows}, f, indent=1)


if __name__ == "__main__":
    main()
