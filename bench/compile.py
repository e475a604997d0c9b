"""A CUDA training step under torch.compile against eager, for the floor, ours and PEFT's.

    python bench/compile.py --device cuda --random-init --variants floor lora "peft lora"

Each variant is built, stepped eagerly, then compiled (inductor, default mode) and stepped
again; prints the median step of each and the compile warm-up. On a host-bound GPU step
(bench/host.py) compiling is what takes the host out. One process per call: compiling every
variant takes minutes.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from step import base_and_batch, model_args, variant


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_args(ap)
    ap.add_argument("--variants", nargs="+", default=["floor", "lora", "peft lora"])
    ap.add_argument("--eager", action="store_true", help="also time each variant eagerly")
    args = ap.parse_args()
    base, ids, dtype = base_and_batch(args)
    where = torch.cuda.get_device_name() if args.device == "cuda" else args.device
    print(f"{where}  batch {args.batch} x {args.seq}  torch {torch.__version__}  {time.strftime('%Y-%m-%d')}")
    for name in args.variants:
        for compiled in ((False, True) if args.eager else (True,)):
            v = variant(base, name, args.device)  # a fresh model and optimiser for each
            if compiled:
                v.model = torch.compile(v.model)  # the same parameters, so the same optimiser
            t0 = time.perf_counter()
            for _ in range(3):
                v.step(ids, args.device, dtype, memory=False)
            warm = time.perf_counter() - t0
            v.forget()
            for _ in range(10):
                v.step(ids, args.device, dtype, memory=False)
            print(f"{name:12s} {'compiled' if compiled else 'eager':8s} {statistics.median(v.times) * 1e3:7.1f} ms/step"
                  f"  (warm-up {warm:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
