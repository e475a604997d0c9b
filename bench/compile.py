"""A CUDA training step under torch.compile against eager, for the floor, ours and PEFT's.

    python bench/compile.py --random-init --variants floor lora "peft lora"

Each variant is built, stepped eagerly, then compiled (inductor, default mode) and stepped
again; prints the median step of each and the compile warm-up. On a host-bound GPU step
(bench/host.py) compiling is what takes the host out. One process per call: compiling every
variant takes minutes.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from step import adapted, load_base, peft_model

import slimtune


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=slimtune.DEFAULT_MODEL)
    ap.add_argument("--random-init", action="store_true", help="--model's shipped config with random weights")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--variants", nargs="+", default=["floor", "lora", "peft lora"])
    ap.add_argument("--eager", action="store_true", help="also time each variant eagerly")
    args = ap.parse_args()
    dtype = torch.bfloat16
    torch.manual_seed(0)
    base = load_base(args.model, args.random_init, "cuda", dtype)
    ids = torch.randint(0, base.config.vocab_size, (args.batch, args.seq), device="cuda")

    def build(name: str) -> torch.nn.Module:
        if name == "floor":  # nothing trains: the backward still runs to the embeddings
            model = copy.deepcopy(base)
            model.get_input_embeddings().register_forward_hook(lambda m, i, o: o.requires_grad_(True))
            return model
        if name.startswith("peft "):
            return peft_model(copy.deepcopy(base), name.split()[1], None)
        return adapted(base, slimtune.preset(name))

    print(f"{torch.cuda.get_device_name()}  batch {args.batch} x {args.seq}  torch {torch.__version__}  "
          f"{time.strftime('%Y-%m-%d')}")
    for name in args.variants:
        for compiled in ((False, True) if args.eager else (True,)):
            model = build(name)
            params = [p for p in model.parameters() if p.requires_grad]
            opt = torch.optim.AdamW(params, lr=1e-4, fused=True) if params else None
            fn = torch.compile(model) if compiled else model

            def step():
                with torch.autocast("cuda", dtype=dtype):
                    loss = fn(ids, labels=ids).loss
                loss.backward()
                if opt:
                    opt.step()
                    opt.zero_grad(set_to_none=True)
                torch.cuda.synchronize()

            t0 = time.perf_counter()
            for _ in range(3):
                step()
            warm = time.perf_counter() - t0
            times = []
            for _ in range(10):
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            print(f"{name:12s} {'compiled' if compiled else 'eager':8s} {statistics.median(times) * 1e3:7.1f} ms/step"
                  f"  (warm-up {warm:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
