"""The mixtures' training step on SmolLM2-135M against their peers and their naive references.

    python bench/mixtures.py                 # CPU, fp32, batch 4 x 256
    python bench/mixtures.py --device cuda --random-init

Rows: MoV-10, MoLoRA-10 x r4 (soft and top-2), PESC-8 (top-2, width 64, gather and dense
dispatch), beside (IA)³, LoRA at MoLoRA's total rank (r = 40), and the dense LoRA that PESC puts
on the rest of the model (r = 8). Each mixture also runs as a naive reference, defined here:
- MoV and MoLoRA: the same routers and experts, mixed by a Python loop over the experts;
- PESC: naive sparse upcycling, where each expert is its own copy of the FFN (frozen) with its
  adapter, and every token runs the FFN copy of each expert it is routed to.

Columns: trainable parameters, step time over the frozen floor's (alternated, paired with the
floor steps either side, median over the rounds), the step's peak memory beyond the floor's,
the model's own bytes (parameters and buffers), and the targets (each variant is compared with
peers of its own group: the groups run one after the other, in processes of their own, each
alternating with its own floor, since all the models at once do not fit in 24 GiB):
- MoV ≤ 1.15 × (IA)³'s step; MoLoRA-10 x r4 ≤ 1.1 × LoRA r = 40's; PESC ≤ 1.3 × the dense LoRA's,
  with the model's bytes ≤ (dense model + adapters) × 1.05;
- what each mixture adds to the floor's step ≤ a third of what its naive reference adds.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import subprocess
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from step import Variant, adapted, alternate, base_and_batch, model_args, variant
from torch import nn

import slimtune
from slimtune.adapters.molora import MoLoRAConfig, MoLoRALinear, inject_molora
from slimtune.adapters.mov import MoVConfig, MoVLinear, inject_mov
from slimtune.adapters.pesc import PESCBlock, PESCConfig, inject_pesc
from slimtune.adapters.registry import Method, register_method
from slimtune.models.layers import get_module
from slimtune.train.memory import keep_freed_memory


# --- naive references: the same parameters and routers, the experts mixed one at a time ----------

class LoopMoV(MoVLinear):
    def mixed(self, r_in):
        B, T = r_in.shape[:2]
        E, n = self.V.shape
        if self.heads == 1:
            w = self.route(r_in, self.W_r)  # (B, T, E)
            return sum(w[..., e:e + 1] * self.V[e] for e in range(E))  # one expert at a time
        w = self.route(r_in.reshape(B, T, self.heads, -1), self.W_r)  # (B, T, H, E)
        V = self.V.view(E, self.heads, n // self.heads)
        return sum(w[..., e:e + 1] * V[e] for e in range(E)).reshape(B, T, n)


class LoopMoLoRA(MoLoRALinear):
    def forward(self, base, x):
        w = self.route(x, self.W_r)  # (B, T, E)
        y = base(x)
        r = self.expert_rank
        for e in range(self.experts):  # one LoRA expert at a time, plain autograd
            A, B = self.A[e * r:(e + 1) * r], self.B[:, e * r:(e + 1) * r]
            y = y + self.scale * w[..., e:e + 1] * F.linear(F.linear(x, A), B)
        return y


class CopiesPESC(PESCBlock):
    """Naive sparse upcycling: every expert its own (frozen) copy of the FFN (`copies`)."""

    def forward(self, base, x):
        w = self.route(x, self.W_r).reshape(-1, self.W_r.shape[0])  # (N, n)
        rows = x.reshape(-1, x.shape[-1])
        out = torch.zeros_like(rows)
        for i, ffn in enumerate(self.copies):
            idx = w[:, i].nonzero().squeeze(1)
            if idx.numel():
                u = ffn(rows[idx])  # the FFN again, for each expert a token goes to
                z = F.gelu(u @ self.W_down[i].T)
                out.index_add_(0, idx, (u + self.s * (z @ self.W_up[i].T)) * w[idx, i, None])
        return out.view(x.shape)


def _swap(sites: dict, cls) -> dict:
    """The same sites, of the naive class (their tensors and state taken over as they are)."""
    for name, site in sites.items():
        if type(site) in (MoVLinear, MoLoRALinear):
            site.__class__ = cls
    return sites


def inject_copies(model, cfg, root):
    sites = inject_pesc(model, cfg, root)
    for name, site in list(sites.items()):
        if isinstance(site, PESCBlock):
            naive = CopiesPESC.__new__(CopiesPESC)
            naive.__dict__.update(site.__dict__)
            naive.copies = nn.ModuleList(copy.deepcopy(get_module(model, name)).requires_grad_(False)
                                         for _ in range(cfg.experts))
            sites[name] = naive
    return sites


@dataclass
class LoopMoVConfig(MoVConfig):
    method: str = "mov-loop"


@dataclass
class LoopMoLoRAConfig(MoLoRAConfig):
    method: str = "molora-loop"


@dataclass
class CopiesPESCConfig(PESCConfig):
    method: str = "pesc-copies"


register_method(Method("mov-loop", LoopMoVConfig, lambda m, c, r: _swap(inject_mov(m, c, r), LoopMoV)))
register_method(Method("molora-loop", LoopMoLoRAConfig, lambda m, c, r: _swap(inject_molora(m, c, r), LoopMoLoRA)))
register_method(Method("pesc-copies", CopiesPESCConfig, inject_copies))

VARIANTS = {  # name -> the adapter config
    "ia3": lambda: slimtune.preset("ia3"),
    "mov-10": lambda: slimtune.preset("mov"),
    "mov-10 loop": lambda: LoopMoVConfig(),
    "lora r=40": lambda: slimtune.preset("lora", r=40),
    "molora-10x4": lambda: slimtune.preset("molora"),
    "molora-10x4 top-2": lambda: slimtune.preset("molora", top_k=2),
    "molora-10x4 loop": lambda: LoopMoLoRAConfig(),
    "lora r=8 (dense)": lambda: slimtune.preset("lora"),
    "pesc-8": lambda: slimtune.preset("pesc"),
    "pesc-8 dense dispatch": lambda: slimtune.preset("pesc", dispatch="dense"),
    "pesc-8 ffn copies": lambda: CopiesPESCConfig(),
}
TARGETS = [  # (variant, its peer, at most this multiple of the peer's step)
    ("mov-10", "ia3", 1.15), ("molora-10x4", "lora r=40", 1.1), ("molora-10x4 top-2", "lora r=40", 1.1),
    ("pesc-8", "lora r=8 (dense)", 1.3), ("pesc-8 dense dispatch", "lora r=8 (dense)", 1.3)]
GROUPS = [  # run in separate processes (each with its own floor): all of them at once do not fit in 24 GiB
    ["ia3", "mov-10", "mov-10 loop"],
    ["lora r=40", "molora-10x4", "molora-10x4 top-2", "molora-10x4 loop"],
    ["lora r=8 (dense)", "pesc-8", "pesc-8 dense dispatch", "pesc-8 ffn copies"],
]
NAIVE = {"mov-10": "mov-10 loop", "molora-10x4": "molora-10x4 loop", "pesc-8": "pesc-8 ffn copies",
         "pesc-8 dense dispatch": "pesc-8 ffn copies"}


def model_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))


def measure(args, names: list[str]) -> dict:
    """One group, in this process: time / floor per variant (paired, median and spread), peak
    memory beyond the floor's (a second process on CPU), trainable parameters, model bytes."""
    if args.device == "cpu" and not args.memory_child:
        keep_freed_memory()  # as `slimtune train` does on CPU
    base, ids, dtype = base_and_batch(args)
    variants, info = [variant(base, "floor", args.device)], {}
    for name in names:
        model = adapted(base, VARIANTS[name]())
        model.train()  # routers count and report as in training
        adapters = sum(p.numel() * p.element_size() for p in slimtune.trainable_parameters(model).values())
        info[name] = (slimtune.count_parameters(model).trainable, model_bytes(model), adapters)
        variants.append(Variant(name, model, args.device))
    in_process = args.device == "cuda" or args.memory_child
    if args.memory_child:
        for v in variants:
            for _ in range(2):
                v.step(ids, args.device, dtype, memory=True)
        return {v.name: v.mems[-1] for v in variants}
    if not in_process:  # glibc's mmap threshold must be set before a process starts: a child reads the peaks,
        # before this process's own steps, whose kept heap would stand beside the child's peak
        child = subprocess.run([sys.executable, __file__, *child_args(args, names), "--memory-child"], check=True,
                               stdout=subprocess.PIPE, text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        mem = json.loads(child.stdout.strip().splitlines()[-1])
    for rnd in range(args.reps + 1):
        alternate(variants, ids, args.device, dtype, in_process, warm_up=rnd == 0)
        print(f"{names[0]}...: round {rnd}/{args.reps} done", file=sys.stderr, flush=True)
    if in_process:
        mem = {v.name: statistics.median(v.mems) for v in variants}
    return {"floor_ms": statistics.median(variants[0].times) * 1e3, "dense_bytes": model_bytes(base),
            "dtype": str(dtype).split(".")[-1],
            "rows": {v.name: {"ratio": statistics.median(v.ratios), "spread": [min(v.ratios), max(v.ratios)],
                              "peak": mem[v.name] - mem["floor"], "trainable": info[v.name][0],
                              "bytes": info[v.name][1], "adapter_bytes": info[v.name][2]} for v in variants[1:]}}


def child_args(args, names: list[str]) -> list[str]:
    out = ["--model", args.model, "--device", args.device, "--batch", str(args.batch), "--seq", str(args.seq),
           "--reps", str(args.reps), "--only", *names]
    return out + (["--random-init"] if args.random_init else [])


def report(args, groups: list[dict]) -> None:
    rows = {name: r for g in groups for name, r in g["rows"].items()}
    print(f"\n# bench/mixtures.py  {args.model}{' (random init)' if args.random_init else ''}  {args.device} "
          f"{groups[0]['dtype']}  batch {args.batch} x {args.seq}  torch {torch.__version__}  {os.cpu_count()} cpus")
    print("floor per group: " + ", ".join(f"{g['floor_ms']:.0f} ms" for g in groups)
          + f"; dense model {groups[0]['dense_bytes'] / 2**20:.0f} MiB\n")
    print("| variant | trainable | time / floor | (spread) | peak − floor MiB | model MiB | beyond floor / naive's |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        naive = rows.get(NAIVE.get(name, ""))
        share = (r["ratio"] - 1) / (naive["ratio"] - 1) if naive and naive["ratio"] > 1 else None
        print(f"| {name} | {r['trainable']:,} | {r['ratio']:.3f} | {r['spread'][0]:.3f}–{r['spread'][1]:.3f} | "
              f"{r['peak'] / 2**20:.0f} | {r['bytes'] / 2**20:.0f} | {'' if share is None else f'{share:.3f}'} |")
    print("\n| target | measured | limit | met |")
    print("|---|---|---|---|")
    for name, peer, limit in TARGETS:
        if name in rows and peer in rows:
            m = rows[name]["ratio"] / rows[peer]["ratio"]
            print(f"| {name} step / {peer} step | {m:.3f} | {limit} | {'yes' if m <= limit else 'no'} |")
    for name, naive in NAIVE.items():
        if name in rows and naive in rows:
            m = (rows[name]["ratio"] - 1) / (rows[naive]["ratio"] - 1)
            print(f"| {name} beyond floor / {naive}'s | {m:.3f} | 0.333 | {'yes' if m <= 1 / 3 else 'no'} |")
    for name in ("pesc-8", "pesc-8 dense dispatch"):
        if name in rows:
            r = rows[name]
            m = r["bytes"] / (groups[0]["dense_bytes"] + r["adapter_bytes"])
            print(f"| {name} model / (dense + adapters) | {m:.3f} | 1.05 | {'yes' if m <= 1.05 else 'no'} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_args(ap)
    ap.add_argument("--reps", type=int, default=3, help="rounds over a group's variants (after one warm-up round)")
    ap.add_argument("--only", nargs="*", default=None, help=argparse.SUPPRESS)  # one group, in this process
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.only is not None:
        print(json.dumps(measure(args, args.only)))
        return
    groups = []
    for names in GROUPS:  # each group in a process of its own
        child = subprocess.run([sys.executable, __file__, *child_args(args, names)], check=True,
                               stdout=subprocess.PIPE, text=True)
        groups.append(json.loads(child.stdout.strip().splitlines()[-1]))
    report(args, groups)


if __name__ == "__main__":
    main()
