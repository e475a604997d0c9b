"""Many training jobs over one frozen base: one process, one batch per step.

    jobs = setup_jobs([cfg_a, cfg_b, ...])   # one base; each job its adapter, data, optimiser
    results = jobs_step(jobs)                # one forward and backward over every running job's rows

Each job is a `Run` of its own (loop.py): its config, data and order, optimiser, learning rate,
schedule and steps. Its adapter is one named adapter (`job.name`) of the shared model. A step
collates each running job's micro-batch into one batch and runs it as a mixed-adapter batch
(`adapter_rows`): every row computes with its own job's adapter, gathered where the method can
(the low-rank family, (IA)³: adapters/fast/rows.py) and as a sub-batch per adapter otherwise
(`AdapterHost.grouped_rows`). The loss is split per job. Job j minimises what it would alone
(`train_step`):

    L_j = Σ_{labelled tokens of j's rows} CE / n_tok(j)  +  Σ_aux w · aux_j / n_in(j)

and since a row touches only its own job's adapter, ∂(Σ_k L_k)/∂θ_j = ∂L_j/∂θ_j: one backward
gives every job its own gradient. Each job then clips and checks its own gradient and steps its
own optimiser. A job whose loss or gradient is not finite stops alone, before its bad update;
the others go on.

What jobs share, and must agree on: the base model and how it is held (`SHARED`). Gisting and
torchrun are not supported with jobs (one gist token row and one process group per model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from ..adapters.helpers import collect_aux_losses, trainable_parameters
from ..adapters.inject import adapter_rows, add_adapter
from ..data import batches as Bt
from ..data.rows import IGNORE
from ..errors import Problem, Problems
from ..formats.adapter import load_adapter
from ..models.attention import check_4d_support, real_tokens
from ..models.load import load_model, load_tokenizer
from ..models.quantize import quantize_model
from .config import TrainConfig
from .loop import NonFinite, Run, StepStats, _non_finite_problem, _prepare, build_optimizer, load_examples, \
    lr_factor, micro_indices
from .loss import CausalLMLoss
from .memory import keep_freed_memory
from .parallel import init_distributed

SHARED = ("model", "quantize", "precision", "device", "grad_checkpointing", "keep_freed_memory")


@dataclass
class Job:
    """One training job of a jobs run: its adapter's name on the shared model, and its Run."""

    name: str
    run: Run
    step: int = 0  # optimiser steps taken
    stopped: Problem | None = None  # why it stopped before its last step (it diverged)
    seconds: float = 0.0  # wall time of the shared steps it took part in

    @property
    def running(self) -> bool:
        return self.stopped is None and self.step < self.run.total_steps


def check_jobs(cfgs: list[TrainConfig], p: Problems) -> None:
    """What a jobs run refuses before loading anything."""
    if not cfgs:
        p.add("jobs=[]", "no job to run", "list at least one job under `jobs:`")
        return
    first = cfgs[0]
    for i, cfg in enumerate(cfgs[1:], 1):
        for name in SHARED:
            if getattr(cfg, name) != getattr(first, name):
                p.add(f"jobs[{i}].{name}={getattr(cfg, name)!r}", f"jobs[0] has {getattr(first, name)!r}, and the "
                      "jobs share one base model", f"give every job the same {name} (set it once, outside the list)")
    outs: dict[str, int] = {}
    for i, cfg in enumerate(cfgs):
        if cfg.gist:
            p.add(f"jobs[{i}].gist={cfg.gist}", "gisting trains a token row of the shared embedding, which jobs "
                  "cannot keep apart", "train gist adapters with plain `slimtune train`")
        if cfg.out in outs:
            p.add(f"jobs[{i}].out={cfg.out!r}", f"jobs[{outs[cfg.out]}] writes there too",
                  "give every job its own out directory")
        outs.setdefault(cfg.out, i)


def setup_jobs(cfgs: list[TrainConfig], names: list[str] | None = None, model=None, tokenizer=None) -> list[Job]:
    """The shared model with every job's adapter, each job's data and optimiser."""
    p = Problems("cannot run the jobs")
    check_jobs(cfgs, p)
    p.raise_if_any()
    first = cfgs[0]
    names = names or [f"job{i}" for i in range(len(cfgs))]
    rank, world, device = init_distributed(first.device)
    if world > 1:
        p.add(f"{world} processes", "jobs run in one process over one base model", "run without torchrun")
        p.raise_if_any()
    bf16 = first.precision == "bf16" or (first.precision == "auto" and device.type == "cuda"
                                          and torch.cuda.is_bf16_supported())
    if device.type == "cpu" and first.keep_freed_memory:
        keep_freed_memory()
    data = [load_examples(cfg) for cfg in cfgs]
    if model is None:
        model = load_model(first.model, dtype=torch.bfloat16 if bf16 and device.type == "cuda" else torch.float32)
        tokenizer = tokenizer or load_tokenizer(first.model)
    if any(cfg.packing for cfg in cfgs):
        check_4d_support(model)
    model.to(device)
    quantize_model(model, first.quantize)
    for name, cfg in zip(names, cfgs):
        torch.manual_seed(cfg.seed)  # as `setup` does before adding a job's adapter alone
        if cfg.init_adapter:
            load_adapter(model, cfg.init_adapter, name=name, tokenizer=tokenizer)
        else:
            add_adapter(model, cfg.adapter, name=name)
        for t in trainable_parameters(model, name).values():  # adapters train in fp32 whatever the base dtype
            t.data = t.data.float()
    if first.grad_checkpointing:
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    loss_model = CausalLMLoss(model)
    jobs = []
    for name, cfg, (train_ex, val_ex, skipped) in zip(names, cfgs, data):
        opt, params = build_optimizer(model, cfg, name)
        run = Run(cfg, model, tokenizer, loss_model, opt, _prepare(train_ex, tokenizer, cfg),
                  _prepare(val_ex, tokenizer, cfg), val_ex, device, 0, 1, bf16, params, skipped=skipped)
        if run.steps_per_epoch == 0:
            p.add(f"jobs[{len(jobs)}] ({name}): {len(run.train.input_ids)} training rows", "fewer than one step's "
                  f"window of {run.window} (batch_size x grad_accum)", "add rows or lower batch_size / grad_accum")
        jobs.append(Job(name, run))
    p.raise_if_any()
    for job in jobs:  # build_optimizer leaves only its own adapter trainable: every job's is
        for t in job.run.params:
            t.requires_grad_(True)
    return jobs


@dataclass
class _Part:
    job: Job
    rows: slice  # the job's rows in the combined batch


def _combined(parts: list[tuple[Job, list[int]]], device) -> tuple[dict, list[_Part]]:
    """One batch of every job's rows `idx`, collated together (padded to the longest), and
    where each job's rows are."""
    ids, labels, segments, out, at = [], [], [], [], 0
    packed = any(job.run.train.segments is not None for job, _ in parts)
    for job, idx in parts:
        r = job.run.train.rows(idx)
        ids += r["rows_ids"]
        labels += r["rows_labels"]
        segments += r["rows_segments"] or [[0] * len(x) for x in r["rows_ids"]]  # one example per row
        out.append(_Part(job, slice(at, at + len(idx))))
        at += len(idx)
    pad = Bt.pad_id(parts[0][0].run.tokenizer)
    b = Bt.collate(ids, labels, pad_id=pad, rows_segments=segments if packed else None)
    return {k: v.to(device) for k, v in b.items()}, out


def jobs_step(jobs: list[Job]) -> dict[str, StepStats | NonFinite]:
    """One optimiser step of every running job, over one combined batch per micro-batch round:
    each job's StepStats, or the NonFinite that stopped it (its update is not applied)."""
    running = [j for j in jobs if j.running]
    if not running:
        return {}
    lead = running[0].run
    model, loss_model, device = lead.model, lead.loss_model, lead.device
    rounds = max(j.run.cfg.grad_accum for j in running)
    indices = {j.name: micro_indices(j.run, j.step) for j in running}
    batches = [_combined([(j, indices[j.name][m]) for j in running if m < j.run.cfg.grad_accum], device)
               for m in range(rounds)]
    n_tok = {j.name: 0 for j in running}  # labelled and real tokens of each job's whole window
    n_in = {j.name: 0 for j in running}
    for b, parts in batches:
        real = real_tokens(b["attention_mask"])
        for part in parts:
            n_tok[part.job.name] += int((b["labels"][part.rows, 1:] != IGNORE).sum())
            n_in[part.job.name] += int(real[part.rows].sum())
    for j in running:
        for g in j.run.opt.param_groups:
            g["lr"] = g["base_lr"] * lr_factor(j.step, j.run.cfg, j.run.total_steps)
    loss_sum = {j.name: torch.zeros((), device=device) for j in running}
    aux: dict[str, dict[str, list]] = {j.name: {} for j in running}  # job -> name -> [summed total, weight]
    for b, parts in batches:
        names = [part.job.name for part in parts for _ in range(part.rows.stop - part.rows.start)]
        with lead.autocast(), collect_aux_losses(model, real_tokens(b["attention_mask"])) as reported, \
                adapter_rows(model, names):
            per_row, _ = loss_model(**b, per_row=True)  # (B,), (B,)
        total = per_row.new_zeros(())
        for part in parts:
            name = part.job.name
            s = per_row[part.rows].sum()
            total = total + s / max(n_tok[name], 1)
            loss_sum[name] += s.detach()
        for a in reported:
            if a.adapter in aux:
                total = total + a.weight * a.total.float() / max(n_in[a.adapter], 1)
                entry = aux[a.adapter].setdefault(a.name, [torch.zeros((), device=device), a.weight])
                entry[0] = entry[0] + a.total.detach().float()
        total.backward()
    results: dict[str, StepStats | NonFinite] = {}
    for j in running:
        name, run = j.name, j.run
        clip = run.cfg.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(run.params, clip)
        loss = loss_sum[name] / max(n_tok[name], 1)
        aux_means = {a: (float(v / max(n_in[name], 1)), w) for a, (v, w) in aux[name].items()}
        if not (torch.isfinite(loss) and torch.isfinite(norm) and all(math.isfinite(v) for v, _ in aux_means.values())):
            run.opt.zero_grad(set_to_none=True)
            what = f"loss {float(loss):.4g}" if not torch.isfinite(loss) else f"gradient norm {float(norm):.4g}"
            j.stopped = _non_finite_problem(j.step + 1, what, run.cfg)
            results[name] = NonFinite(j.stopped)
            continue
        run.opt.step()
        run.opt.zero_grad(set_to_none=True)
        j.step += 1
        results[name] = StepStats(float(loss), n_tok[name], n_in[name], float(norm), aux_means)
    return results


@dataclass
class JobsReport:
    """What a jobs run did, per job: finished, stopped (diverged) or skipped (done before)."""

    finished: list[str] = field(default_factory=list)
    stopped: dict[str, Problem] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
