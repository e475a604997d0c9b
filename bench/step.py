"""One training step (forward + backward + AdamW) on SmolLM2-135M, every preset in one run.

    python bench/step.py                       # CPU, fp32, batch 4 x 256
    python bench/step.py --device cuda         # on CUDA: a bf16 base, fp32 adapters, bf16 autocast
    python bench/step.py --random-init         # the architecture with random weights (no GGUF needed)
    python bench/step.py --methods vera --high-rank vera=1024   # one preset, and one at a high rank

Each `--high-rank` preset runs twice: with the form each layer picks (adapters/fast/forms.py)
and forced per token, to show what the choice buys.

Variants run in alternation (`--reps` rounds), with a floor step between every two, so each
step is divided by the mean of the floor steps either side of it; the median of those paired
ratios over the rounds is what the table reports (machine noise drifts over seconds here, and
hits a step and its neighbours alike). Each variant is compared with:
- the floor: the frozen base model, forward and backward with nothing trained (the gradient
  still flows back to the embeddings, as it must under any adapter);
- the adapter's own arithmetic: multiply-adds of the form each layer picked (per-token
  low-rank, or dense ΔW with its backward reading x or a = x Aᵀ), turned into time at the GEMM
  rate measured on the model's FFN shape after each round and divided by that round's floor
  step (median over the rounds: rate and floor drift together with the machine's speed);
- the adapter's roofline: layer by layer, the larger of that arithmetic and the memory traffic
  its products cannot avoid (bytes at a measured copy bandwidth): low-rank products at r = 8
  are bound by reading their (N, in) or (N, out) operand, not by their multiply-adds;
- the adapter layers alone: each adapted layer's forward + backward timed against its base
  layer's on random inputs of the shape it sees (alternated, after the rounds), summed over the
  model's layers: what the layers cost with the model around them taken away. What the step
  takes beyond that is the model-level remainder (caches, the optimiser, autograd's graph);
- the adapter's products as BLAS ran them (CPU): the step's self time, under the profiler, in
  matrix-product ops on shapes the floor's step never runs (after the rounds). A rank-8 product
  runs at a fraction of the FFN shape's GEMM rate, so this is the arithmetic at the rates its
  own shapes reach; what the step takes beyond it is everything that is not a product
  (elementwise work, copies, allocation, autograd, Python, the optimiser);
- PEFT's implementation of the same method, where PEFT has it.

Steps run as `slimtune train` runs them: fused AdamW where it applies, and on CPU with freed
memory kept in the process (slimtune.train.memory; `--return-freed-memory` times glibc's default).

Memory: on CUDA the peak allocated, in the same run; on CPU the peak resident set (VmHWM,
reset before each step through /proc/self/clear_refs), in a second process where glibc is
told to mmap every large block so that freed tensors leave the RSS. Times are never taken in
that process: an mmap and its page faults for every tensor slow the step by ~20 %, and more
for code that allocates more, which is not the allocator users run. Both are compared with what the adapter must keep for its gradients,
computed from the shapes: per layer, x if A trains and a = A x (N, r) if d, B or b trains (VeRA
keeps no x: its A is frozen) on the per-token form, x (or a, on "dense-a", and x too if A
trains) on the dense form, plus AdamW's state (grad, exp_avg, exp_avg_sq) for every trained tensor.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time

import json
import subprocess

import torch
from torch import nn

import slimtune
from slimtune.adapters.fast.layer import FastLayer, siblings_of
from slimtune.adapters.ia3 import IA3Linear
from slimtune.adapters.inject import hosts
from slimtune.adapters.lowrank import LowRankLinear
from slimtune.models.load import CONFIGS
from slimtune.train.loop import fusable_adamw
from slimtune.train.memory import keep_freed_memory


def sites(model: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(site adapter, the base layer it sits on) of the model's active adapter."""
    name = slimtune.active_adapter(model)
    return [(h.adapters[name], h.base) for _, h in hosts(model) if name in h.adapters]


def peft_model(base: nn.Module, method: str, r: int | None):
    import peft

    cfg = {"lora": lambda: peft.LoraConfig(r=r or 8, lora_alpha=16, target_modules="all-linear"),
           "vera": lambda: peft.VeraConfig(r=r or 256, target_modules="all-linear", save_projection=False),
           "ia3": lambda: peft.IA3Config(target_modules=["k_proj", "v_proj", "down_proj"],
                                         feedforward_modules=["down_proj"])}[method]()
    return peft.get_peft_model(base, cfg)


def load_base(name: str, random_init: bool, device: str, dtype: torch.dtype) -> nn.Module:
    """The frozen base as `slimtune train` holds it: bf16 weights on CUDA, fp32 on CPU. With
    random_init, a shipped config's architecture with random weights: the same shapes, so the
    same times, on a machine without the default model's GGUF (a GPU machine, say)."""
    if random_init:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = json.loads((CONFIGS / f"{name}.json").read_text())
        base = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config))
    else:
        base = slimtune.load_model(name)
    return base.to(device, dtype).requires_grad_(False)


def adapted(base: nn.Module, config) -> nn.Module:
    """A copy of base with the adapter, its trained tensors in fp32 whatever the base's dtype
    (as `slimtune train` sets them)."""
    model = slimtune.add_adapter(copy.deepcopy(base), config)
    for p in slimtune.trainable_parameters(model).values():
        p.data = p.data.float()
    return model


def required_bytes(model: nn.Module, ids: torch.Tensor, elt: int) -> tuple[int, int, list[tuple[int, int]]]:
    """(activation bytes the adapter must keep, multiply-adds of its arithmetic, per layer its
    multiply-adds and the bytes its products must move) for one step. The roofline (`roofline`)
    takes, layer by layer, the larger of the arithmetic at the GEMM rate and that traffic at the
    copy bandwidth: at
    r = 8 each per-token product reads an (N, in) or (N, out) matrix to make an (N, r) one."""
    seen, act, flops, layers = set(), 0, 0, []
    hooks = []

    def hook(layer, inputs, _out):
        nonlocal act, flops
        x = inputs[1]  # a site adapter is called as site(base, x)
        n = x.numel() // x.shape[-1]
        i, o = layer.in_features, layer.out_features
        keep_x, traffic, macs = False, 0, 0
        if isinstance(layer, LowRankLinear):
            # Sibling layers (adapters/fast/siblings.py) split their x side: with one A (VeRA) its
            # arithmetic and a itself, with stacked A's (LoRA) the passes over x.
            rec = FastLayer.of(layer)
            one_a, group = len(rec.same_a()), len(siblings_of(layer).group_of.get(id(rec), (rec,)))
            trains = rec.trained(layer.parts())
            form = rec.form(x, layer.parts())  # the layer's own choice (grad is enabled in this pass)
            macs = rec.flops(n, True, trains, one_a)[form]
            if form != "per-token":  # the fused dense form keeps x or a and rebuilds ΔW in the backward
                keep_x = form == "dense" or trains["A"]
                if form == "dense-a":
                    act += n * layer.r * elt // one_a
                # W0 read and W written twice, ∂ΔW written and read 1-2 times (dense-a: if A trains)
                traffic = i * o * (4 + (2 + trains["A"]) * keep_x)
            else:
                keep_x = trains["A"]  # the fused per-token form keeps x for ∂A and a = A x for ∂d, ∂B, ∂b
                act += n * layer.r * elt * (trains["d"] or trains["B"] or trains["b"]) // one_a
                # a reads x; ∂x += ... reads and writes ∂x; ∂A reads x (the x side);
                # y += ... reads and writes y; ∂a reads g; ∂B̄ reads g
                traffic = n * (i * (3 + trains["A"])) // group + n * (3 * o + o * (trains["B"] or trains["b"]))
        elif isinstance(layer, IA3Linear):
            dim = i if layer.where == "input" else o
            macs, traffic = 3 * n * dim, 4 * n * dim  # scale (read, write), its gradient (read g and x, write)
            keep_x = layer.where == "input"
            act += 0 if keep_x else n * o * elt
        flops += macs
        layers.append((macs, traffic * elt))
        if keep_x and x.untyped_storage().data_ptr() not in seen:  # q, k, v read the same x
            seen.add(x.untyped_storage().data_ptr())
            act += x.numel() * elt

    model(ids)  # a first forward learns which layers share an input (adapters/fast/siblings.py)
    for site, _ in sites(model):
        hooks.append(site.register_forward_hook(hook))
    model(ids)  # with grad enabled, so that each layer chooses its form as it does when training
    for h in hooks:
        h.remove()
    state = sum(p.numel() for p in slimtune.trainable_parameters(model).values()) * 4 * 3  # grad + 2 moments, fp32
    return act + state, flops, layers


def layers_alone(model: nn.Module, ids: torch.Tensor, device: str, dtype: torch.dtype, reps: int = 30) -> float:
    """Seconds a step spends in its adapter layers beyond their base layers, each layer timed alone:
    forward + backward (into x and the trained tensors) of the adapted layer against its base
    layer's, on random inputs of the shape it sees in the model, alternated; layers of one kind
    and shape are timed once and counted as often as they occur. Sibling layers that share their
    down-projection (adapters/siblings.py) are timed together, on one input, as one unit."""
    seen: dict[tuple, tuple[tuple, torch.Size]] = {}
    counts: dict[tuple, int] = {}
    base_of = {id(site): base for site, base in sites(model)}
    lowrank = [site for site, _ in sites(model) if isinstance(site, LowRankLinear)]
    siblings = siblings_of(lowrank[0]) if lowrank else None  # low-rank adapters only
    groups = siblings.group_of if siblings is not None else {}

    def hook(layer, inputs, _out):
        rec = FastLayer.of(layer) if isinstance(layer, LowRankLinear) else None
        unit = tuple(m.site for m in groups.get(id(rec), (rec,))) if rec is not None else (layer,)
        if layer is not unit[0]:
            return  # counted with the first of its group
        trains = tuple(rec.trained(layer.parts()).items()) if rec is not None else ()
        x = inputs[1]
        key = (type(layer).__name__, getattr(layer, "where", ""), tuple(x.shape),
               tuple(m.out_features for m in unit), trains)
        seen.setdefault(key, (unit, x.shape))
        counts[key] = counts.get(key, 0) + 1

    if siblings is not None and not siblings.settled:  # a model that has not run yet learns them first
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            model(ids)
    hooks = [site.register_forward_hook(hook) for site, _ in sites(model)]
    with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
        model(ids)  # grad enabled: each layer picks its form as it does when training
    for h in hooks:
        h.remove()
    total = 0.0
    for key, (unit, shape) in seen.items():
        params = [p for m in unit for p in m.parameters() if p.requires_grad]
        x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
        gs = [torch.randn(*shape[:-1], m.out_features, device=device, dtype=dtype) for m in unit]
        adapted = [lambda x, m=m: m(base_of[id(m)], x) for m in unit]
        bases = [lambda x, m=m: base_of[id(m)](x) for m in unit]

        def run(fs) -> float:
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
                ys = [f(x) for f in fs]  # one x for the whole unit, as in the model
            torch.autograd.backward(ys, gs)
            if device == "cuda":
                torch.cuda.synchronize()
            x.grad = None
            for p in params:
                p.grad = None
            return time.perf_counter() - t0

        extra = []
        for i in range(reps + 3):  # base, adapted, base: the adapted one against the mean of its neighbours
            t = [run(fs) for fs in (bases, adapted, bases)]
            if i >= 3:
                extra.append(t[1] - (t[0] + t[2]) / 2)
        total += counts[key] * statistics.median(extra)
    return total


GEMMS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::addbmm")


def gemm_events(v: "Variant", ids: torch.Tensor, device: str, dtype: torch.dtype) -> dict[tuple, float]:
    """One step of v under the profiler: seconds of self time in matrix-product ops, by (op, input shapes)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        v.step(ids, device, dtype, memory=False)
    return {(e.key, str(e.input_shapes)): e.self_cpu_time_total / 1e6
            for e in prof.key_averages(group_by_input_shape=True) if e.key in GEMMS}


def adapter_gemms(variants: list["Variant"], ids: torch.Tensor, device: str, dtype: torch.dtype,
                  reps: int = 3) -> dict[str, float]:
    """Per variant, seconds its step spends in the matrix products the floor does not make (an op
    on shapes the floor's step never runs): the adapter's products at the rate BLAS reaches on
    their own shapes (a rank-8 product runs at a fraction of the FFN shape's rate). The base's
    products, the same in both, are left out, so their noise is too. Median of reps steps."""
    floor_keys = set(gemm_events(variants[0], ids, device, dtype))
    return {v.name: statistics.median(
        sum(t for key, t in gemm_events(v, ids, device, dtype).items() if key not in floor_keys)
        for _ in range(reps)) for v in variants[1:]}


def roofline(layers: list[tuple[int, int]], rate: float, bw: float) -> float:
    """Seconds: per layer the larger of its multiply-adds at `rate` and its bytes at `bw`."""
    return sum(max(macs / rate, traffic / bw) for macs, traffic in layers)


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def reset_peak(device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return peak_rss()


def read_peak(device: str) -> int:
    if device == "cuda":
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    return peak_rss()


def _median_time(fn, device: str, reps: int = 7) -> float:
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[2:])


def gemm_rate(base: nn.Module, n_tok: int, device: str, dtype: torch.dtype) -> float:
    """Multiply-adds per second of one of the model's own matmuls (hidden -> intermediate)."""
    h, f = base.config.hidden_size, base.config.intermediate_size
    x, w = torch.randn(n_tok, h, device=device, dtype=dtype), torch.randn(f, h, device=device, dtype=dtype)
    return n_tok * h * f / _median_time(lambda: torch.nn.functional.linear(x, w), device)


def copy_bandwidth(device: str) -> float:
    """Bytes per second read plus written by a 64 MiB copy."""
    src = torch.randn(2**24, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / _median_time(lambda: dst.copy_(src), device)


class Variant:
    def __init__(self, name: str, model: nn.Module, device: str, lr: float = 1e-4):
        self.name, self.model = name, model.to(device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        # the trainer's optimiser (fused AdamW where it applies), for PEFT's peers too
        self.opt = torch.optim.AdamW(self.params, lr=lr, fused=fusable_adamw(self.params)) if self.params else None
        emb = model.get_input_embeddings()
        # Under the floor nothing trains: make the embeddings' output require grad so the
        # backward runs through the whole network, as every adapter's backward does.
        self.hook = emb.register_forward_hook(lambda m, i, o: o.requires_grad_(True)) if not self.params else None
        self.times: list[float] = []
        self.queued: list[float] = []  # host time until the step's last kernel is queued (CUDA: before the sync)
        self.ratios: list[float] = []  # step time over the mean of the floor steps either side
        self.mems: list[int] = []

    def forget(self) -> None:
        """Drop the steps recorded so far (warm-up steps)."""
        self.times.clear()
        self.queued.clear()
        self.mems.clear()

    def step(self, ids: torch.Tensor, device: str, dtype: torch.dtype, memory: bool) -> None:
        start_mem = reset_peak(device) if memory else 0
        t0 = time.perf_counter()
        with torch.autocast(device_type=device, dtype=dtype, enabled=dtype != torch.float32):
            loss = self.model(ids, labels=ids).loss
        loss.backward()
        if self.opt:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        self.queued.append(time.perf_counter() - t0)
        if device == "cuda":
            torch.cuda.synchronize()
        self.times.append(time.perf_counter() - t0)
        if memory:
            self.mems.append(read_peak(device) - start_mem)


def alternate(variants: list[Variant], ids: torch.Tensor, device: str, dtype: torch.dtype, memory: bool,
              warm_up: bool) -> None:
    """One round: a step of each variant, with the floor (variants[0]) between every two, so each
    is timed against its neighbours; its time over the mean of the floor steps either side goes
    to its ratios. A warm-up round's times and peaks are discarded."""
    floor = variants[0]
    floor.step(ids, device, dtype, memory=memory)
    for v in variants[1:]:
        v.step(ids, device, dtype, memory=memory)
        floor.step(ids, device, dtype, memory=memory)
        if not warm_up:
            v.ratios.append(v.times[-1] / statistics.mean(floor.times[-2:]))
    if warm_up:
        for v in variants:
            v.forget()


def variant(base: nn.Module, name: str, device: str) -> Variant:
    """'floor' (the frozen base), a preset's name (our adapter), or 'peft <method>' (PEFT's)."""
    if name == "floor":
        return Variant(name, copy.deepcopy(base), device)
    if name.startswith("peft "):
        return Variant(name, peft_model(copy.deepcopy(base), name.split()[1], None), device)
    return Variant(name, adapted(base, slimtune.preset(name)), device)


def model_args(ap: argparse.ArgumentParser) -> None:
    """The options every bench script takes: the model and its weights, the device, the batch."""
    ap.add_argument("--model", default=slimtune.DEFAULT_MODEL)
    ap.add_argument("--random-init", action="store_true", help="--model's shipped config with random weights")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)


def base_and_batch(args: argparse.Namespace) -> tuple[nn.Module, torch.Tensor, torch.dtype]:
    """From `model_args`' options: the frozen base (`load_base`), one seeded batch of random token
    ids, and the dtype steps run in (bf16 autocast on a CUDA device that has it, else fp32)."""
    dtype = torch.bfloat16 if args.device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
    torch.manual_seed(0)
    base = load_base(args.model, args.random_init, args.device, dtype)
    return base, torch.randint(0, base.config.vocab_size, (args.batch, args.seq), device=args.device), dtype


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    model_args(ap)
    ap.add_argument("--reps", type=int, default=3, help="rounds over all variants (after one warm-up round)")
    ap.add_argument("--methods", nargs="+", default=["lora", "vera", "tied-lora", "tied-lora-ba", "ia3"])
    ap.add_argument("--high-rank", nargs="*", default=["vera=1024", "tied-lora=256"], metavar="METHOD=R",
                    help="also these presets at these ranks, each with its form chosen and forced per token "
                         "(none: leave them out)")
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--return-freed-memory", action="store_true",
                    help="time under glibc's default malloc (the trainer keeps freed memory: "
                         "slimtune.train.memory)")
    ap.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)  # the CPU memory pass
    args = ap.parse_args()
    base, ids, dtype = base_and_batch(args)
    elt = 4  # adapters and fp32 activations; bf16 autocast keeps fewer bytes, so this bounds from above

    if not args.memory_child:  # the child reads peaks only
        if args.device == "cpu" and not args.return_freed_memory:
            keep_freed_memory()  # as `slimtune train` does on CPU: floor, ours and PEFT's alike
        # The machine's speed drifts by 15 % and more within a run: the GEMM rate and the copy
        # bandwidth are measured after every round and paired with that round's floor steps (rounds).
    variants, info = [variant(base, "floor", args.device)], {}
    specs = [(m, {}) for m in args.methods]
    for spec in args.high_rank:
        method, _, r = spec.partition("=")
        if not r.isdigit() or method not in slimtune.PRESETS:
            ap.error(f"--high-rank {spec!r}: expected METHOD=R with METHOD one of {sorted(slimtune.PRESETS)} "
                     "and R a positive integer, e.g. vera=1024")
        specs.append((method, {"r": int(r)}))
    for method, kw in specs:
        label = method + (f" r={kw['r']}" if kw else "")
        model = adapted(base, slimtune.preset(method, **kw))
        if not args.memory_child:
            info[label] = required_bytes(model, ids, elt)
        variants.append(Variant(label, model, args.device))
        if kw:  # the same high rank forced to the per-token form, to show what the choice buys
            forced = copy.deepcopy(model)
            for site, _ in sites(forced):
                FastLayer.of(site).form = lambda x, parts: "per-token"
            variants.append(Variant(label + " per-token", forced, args.device))
        if not args.no_peft and method in ("lora", "vera", "ia3"):
            variants.append(Variant(f"peft {label}", peft_model(copy.deepcopy(base), method, kw.get("r")),
                                    args.device))
    in_process = args.device == "cuda" or args.memory_child  # where memory is read
    if args.memory_child:  # peaks only: a warm-up step, then the measured one
        for v in variants:
            for _ in range(2):
                v.step(ids, args.device, dtype, memory=True)
        print(json.dumps({v.name: v.mems[-1] for v in variants}))
        return
    floor, rounds = variants[0], []  # rounds: (GEMM rate, copy bandwidth, mean floor step) of each round
    for rnd in range(args.reps + 1):
        first = len(floor.times)
        alternate(variants, ids, args.device, dtype, in_process, warm_up=rnd == 0)
        if rnd > 0:
            rounds.append((gemm_rate(base, args.batch * args.seq, args.device, dtype), copy_bandwidth(args.device),
                           statistics.mean(floor.times[first:])))
        print(f"round {rnd}/{args.reps} done", file=sys.stderr, flush=True)
    rates = [r for r, _, _ in rounds]

    def share(seconds) -> float:
        """Median over the rounds of seconds(rate, bw) over that round's floor step."""
        return statistics.median(seconds(rate, bw) / fl for rate, bw, fl in rounds)

    med = {v.name: statistics.median(v.times) for v in variants}
    ratio = {v.name: statistics.median(v.ratios) for v in variants[1:]}  # paired with the floor, per step
    if in_process:
        mem = {v.name: statistics.median(v.mems) for v in variants}
    else:  # glibc's mmap threshold must be set before a process starts: a child reads the peaks
        print("memory pass (a second process)", file=sys.stderr, flush=True)
        child = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--memory-child"], check=True,
                               stdout=subprocess.PIPE, text=True, env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"})
        mem = json.loads(child.stdout.strip().splitlines()[-1])
    floor_t, floor_m = med["floor"], mem["floor"]
    print("adapter layers alone", file=sys.stderr, flush=True)
    alone = {v.name: layers_alone(v.model, ids, args.device, dtype) / floor_t for v in variants[1:]
             if not v.name.startswith("peft") and not v.name.endswith("per-token")}
    gemms = {}
    if args.device == "cpu":  # on CUDA the step waits on the host, not on its kernels (bench/host.py)
        print("matrix products, profiled", file=sys.stderr, flush=True)
        gemms = {name: t / floor_t for name, t in adapter_gemms(variants, ids, args.device, dtype).items()}
    where = torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or platform.machine()
    print(f"\n# bench/step.py  {args.model}{' (random init)' if args.random_init else ''}  {args.device} "
          f"{str(dtype).split('.')[-1]}  batch {args.batch} x {args.seq}"
          f"  torch {torch.__version__}  {where}  {os.cpu_count()} cpus"
          f"  {time.strftime('%Y-%m-%d')}")
    print(f"floor: {floor_t * 1e3:.0f} ms/step, peak +{floor_m / 2**20:.0f} MiB; "
          f"GEMM rate on the model's FFN shape {statistics.median(rates) / 1e9:.1f} G multiply-adds/s (median; "
          f"{min(rates) / 1e9:.1f}-{max(rates) / 1e9:.1f} over the rounds), copy "
          f"{statistics.median(b for _, b, _ in rounds) / 1e9:.1f} GB/s; "
          f"freed memory {'returned (glibc default)' if args.return_freed_memory else 'kept'}\n")
    columns = ["variant", "ms/step", "time / floor", "arithmetic / floor", "overhead / floor", "roofline / floor",
               "beyond roofline", "layers alone / floor", "beyond layers alone", "GEMMs as run / floor",
               "beyond GEMMs", "peak − floor MiB", "required MiB", "vs PEFT time", "vs PEFT peak"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for v in variants[1:]:
        label = v.name.removesuffix(" per-token")
        req, macs, layers = info.get(label, (None, None, None))
        ours = macs is not None and not v.name.startswith("peft")
        arith = share(lambda rate, bw: macs / rate) if ours else None
        roof = share(lambda rate, bw: roofline(layers, rate, bw)) if ours else None
        peer = f"peft {v.name}"
        cells = [v.name, f"{med[v.name] * 1e3:.0f}", f"{ratio[v.name]:.3f}",
                 f"{arith:.3f}" if arith is not None else "",
                 f"{ratio[v.name] - 1 - arith:+.3f}" if arith is not None else "",
                 f"{roof:.3f}" if roof is not None else "",
                 f"{ratio[v.name] - 1 - roof:+.3f}" if roof is not None else "",
                 f"{alone[v.name]:.3f}" if v.name in alone else "",
                 f"{ratio[v.name] - 1 - alone[v.name]:+.3f}" if v.name in alone else "",
                 f"{gemms[v.name]:.3f}" if v.name in gemms else "",
                 f"{ratio[v.name] - 1 - gemms[v.name]:+.3f}" if v.name in gemms else "",
                 f"{(mem[v.name] - floor_m) / 2**20:.1f}",
                 f"{req / 2**20:.1f}" if req is not None and not v.name.startswith("peft")
                 and not v.name.endswith("per-token") else "",
                 f"{ratio[v.name] / ratio[peer]:.3f}" if peer in ratio else "",
                 f"{(mem[v.name]) / mem[peer]:.3f}" if peer in mem else ""]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
