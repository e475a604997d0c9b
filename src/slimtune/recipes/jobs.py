"""`slimtune train --jobs JOBS.yaml`: many training jobs over one base, each a run of its own.

    jobs:                         # each entry: TrainConfig fields, over the command's own
      - {name: a, method: lora, lr: 1.0e-3}
      - {name: b, method: vera, data: [support.jsonl], steps: 200}
      - {method: ia3, out: runs/ia3}

Shared settings (model, quantize, precision, device, ...) come from the command's flags or
--config, or from keys of JOBS.yaml beside `jobs:`; an entry's own keys override them. A job
without `out` writes to OUT/NAME (OUT: the command's --out). Every job writes what
`slimtune train` writes in its out directory (adapter/, checkpoints/, metrics.jsonl,
loss.png, summary.json), and resumes on its own: with --resume, a job that finished is
skipped, one that has checkpoints continues from its newest, one that has none starts. A job
that diverges stops alone, its checkpoints kept; the others finish; then the command names
it and exits with an error. The training loop is train/jobs.py.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from ..adapters.helpers import count_parameters
from ..adapters.inject import ADAPTER_NAME, NAME_RULE, set_active_adapter
from ..configs import merge_overrides, to_dict
from ..errors import Problems, SlimtuneError
from ..formats.adapter import save_adapter
from ..train.checkpoint import clean_leftovers, newest_readable, restore, save_checkpoint
from ..train.config import TrainConfig, train_config
from ..train.jobs import Job, JobsReport, jobs_step, setup_jobs
from ..train.loop import Interrupted, NonFinite
from .train import _finite, _log, _say, _trim_log, _val_record, check_out, config_changes, evaluate_run, peak_memory, \
    plot_losses


def job_configs(shared: dict[str, Any], jobs_file: dict[str, Any]) -> tuple[list[TrainConfig], list[str]]:
    """Each job's TrainConfig and name from the command's settings (`shared`: its flags over its
    --config file) and a jobs file's contents. Every problem of every job is reported at once."""
    p = Problems("invalid jobs file")
    data = dict(jobs_file) if isinstance(jobs_file, dict) else {}
    entries = data.pop("jobs", None)
    if not isinstance(jobs_file, dict) or not isinstance(entries, list) or not entries:
        p.add(f"jobs file with {sorted(data) if isinstance(jobs_file, dict) else type(jobs_file).__name__}",
              "it has no non-empty list under `jobs:`", "write `jobs:` followed by one mapping per job, "
              "e.g. `- {name: a, method: lora}`")
        p.raise_if_any()
    resume = shared.get("resume", data.pop("resume", False))  # the command's: every job resumes, or none
    shared = {k: v for k, v in shared.items() if k not in ("jobs", "resume")}
    base = merge_overrides(data, shared)
    base_out = base.pop("out", TrainConfig.out)
    cfgs, names = [], []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            p.add(f"jobs[{i}]={entry!r}", "a job is a mapping of training settings", "write e.g. {method: lora, lr: 1e-3}")
            continue
        entry = dict(entry)
        name = str(entry.pop("name", f"job{i}"))
        if not ADAPTER_NAME.fullmatch(name) or name in names:
            p.add(f"jobs[{i}].name={name[:80]!r}", "taken by another job" if name in names else NAME_RULE,
                  "give every job its own plain name")
        names.append(name)
        job = merge_overrides(base, entry)
        job.setdefault("out", str(Path(base_out) / name))
        job["resume"] = resume
        if "method" in entry and "adapter" not in entry:  # another method: the shared adapter overrides are not its
            job.pop("adapter", None)
        try:
            cfgs.append(train_config(job))
        except SlimtuneError as e:
            p.items += [dataclasses.replace(x, what=f"jobs[{i}] ({name}): {x.what}") for x in e.problems]
    p.raise_if_any()
    return cfgs, names



def _prepare_outputs(cfg: TrainConfig, name: str, report: JobsReport) -> bool:
    """Whether job `name` has work left: a finished one (its summary written) is skipped under
    --resume. A job told to resume that has no checkpoint yet starts fresh."""
    out = Path(cfg.out)
    if cfg.resume and (out / "summary.json").is_file() and (out / "adapter").is_dir():
        report.skipped.append(name)
        return False
    if cfg.resume and not any((out / "checkpoints").glob("step-*")):
        cfg.resume = False
    check_out(cfg)
    return True


def _resume(job: Job) -> dict:
    """Restore job's adapter and optimiser from its newest readable checkpoint; its saved state."""
    cfg, run = job.run.cfg, job.run
    out = Path(cfg.out)
    for path in clean_leftovers(out):
        _say(f"{job.name}: removed {path}, left by a run that was stopped while writing a checkpoint")
    ckpt, skipped = newest_readable(out, run.model)
    for path, why in skipped:
        _say(f"{job.name}: checkpoint {path.name} does not read ({why}); falling back to an older one")
    p = Problems(f"cannot resume job {job.name}")
    if ckpt is None:
        p.add(f"out={cfg.out!r}", "no complete, readable checkpoint under it", "delete it to start the job fresh")
        p.raise_if_any()
    saved = ckpt["state"]
    if saved.get("window") != run.window:
        p.add(f"window of {run.window} examples per step", f"the checkpoint was written with {saved.get('window')}",
              "resume with the same batch_size x grad_accum")
    changed = config_changes(saved.get("config", {}), cfg)
    if changed and not cfg.allow_config_change:
        p.add("changed settings: " + "; ".join(changed), "a resumed job must compute what the interrupted one would "
              "have", "resume with the settings it was written with, or pass --allow_config_change true")
    p.raise_if_any()
    state = restore(ckpt, run.model, run.opt, job.name)
    job.step = state["step"]
    _trim_log(out / "metrics.jsonl", job.step)
    _say(f"{job.name}: resuming from {ckpt['path'].name}")
    return state


def _checkpoint(job: Job, before: dict) -> None:
    run, cfg = job.run, job.run.cfg
    save_checkpoint(cfg.out, job.step, run.model, run.opt,
                    {"window": run.window, "epoch": job.step // run.steps_per_epoch,
                     "position": job.step % run.steps_per_epoch, "total_steps": run.total_steps,
                     "schedule": {"kind": cfg.schedule, "warmup": cfg.warmup_steps}, "before": _finite(before),
                     "config": to_dict(cfg)}, cfg.keep_checkpoints, name=job.name)


def _evaluate(job: Job, n_generate: int) -> dict:
    set_active_adapter(job.run.model, job.name)
    return evaluate_run(job.run, n_generate)


def _finish(job: Job, before: dict, tokens: int) -> None:
    """What `slimtune train` writes at the end of a run: the last checkpoint, the final
    evaluation, the adapter, the curves and the summary."""
    run, cfg, out = job.run, job.run.cfg, Path(job.run.cfg.out)
    _checkpoint(job, before)
    after = _evaluate(job, cfg.eval_generate)
    _log(out / "metrics.jsonl", _val_record(job.step, after, final=True))
    save_adapter(run.model, out / "adapter", name=job.name)
    plot_losses(out / "metrics.jsonl", out / "loss.png")
    count = count_parameters(run.model, job.name)
    summary = {"steps": job.step, "train_seconds": job.seconds, "trainable": count.trainable, "base": count.base,
               "peak_memory_bytes": peak_memory(run.device), "tokens": tokens, "truncation": dict(run.train.report),
               "skipped_rows": [str(p) for p in run.skipped], "jobs_run": True, "before": before, "after": after}
    (out / "summary.json").write_text(json.dumps(_finite(summary), indent=1, allow_nan=False))


def run_jobs(cfgs: list[TrainConfig], names: list[str] | None = None, progress: bool = True, **setup_kwargs
             ) -> JobsReport:
    """Train every job over one base model in one process (train/jobs.py); each writes its own
    outputs as `slimtune train` would. Raises SlimtuneError at the end if a job diverged."""
    names = names or [f"job{i}" for i in range(len(cfgs))]
    report = JobsReport()
    todo = [(c, n) for c, n in zip(cfgs, names) if _prepare_outputs(c, n, report)]
    for name in report.skipped:
        _say(f"{name}: finished before; skipped")
    if not todo:
        return report
    jobs = setup_jobs([c for c, _ in todo], [n for _, n in todo], **setup_kwargs)
    befores, tokens = {}, {j.name: 0 for j in jobs}
    for job in jobs:
        out = Path(job.run.cfg.out)
        state = _resume(job) if job.run.cfg.resume else {}
        if not job.run.cfg.resume:
            out.mkdir(parents=True, exist_ok=True)
            (out / "metrics.jsonl").unlink(missing_ok=True)
        befores[job.name] = state.get("before") or _evaluate(job, job.run.cfg.eval_generate)
        if not job.run.cfg.resume:
            _log(out / "metrics.jsonl", _val_record(0, befores[job.name]))
        cut = job.run.train.report
        if cut["prompts_cut"] or cut["responses_cut"]:
            _say(f"{job.name}: truncated to max_len={job.run.cfg.max_len}: {cut['prompts_cut']} prompts and "
                 f"{cut['responses_cut']} responses of {cut['examples']} training examples")
    set_active_adapter(jobs[0].run.model, jobs[0].name)
    show = progress and any(j.run.cfg.progress for j in jobs)
    bar = tqdm(total=sum(j.run.total_steps for j in jobs), initial=sum(j.step for j in jobs), disable=not show,
               unit="step", dynamic_ncols=True, desc=f"{len(jobs)} jobs")
    lines = {j.name: tqdm(total=0, position=i + 1, bar_format="{desc}", disable=not show) for i, j in enumerate(jobs)}
    t0 = time.perf_counter()
    for job in jobs:
        if not job.running:  # resumed at its last step
            _finish(job, befores[job.name], tokens[job.name])
            report.finished.append(job.name)
    try:
        _train(jobs, befores, tokens, report, bar, lines)
    except KeyboardInterrupt:
        for job in jobs:
            if job.running and job.step:
                _checkpoint(job, befores[job.name])
        raise Interrupted("interrupted; a checkpoint of every running job was written; continue with --resume") \
            from None
    finally:
        for line in lines.values():
            line.close()
        bar.close()
    _say(f"{len(report.finished)} jobs finished in {time.perf_counter() - t0:.0f} s")
    if report.stopped:
        p = Problems("jobs stopped")
        for name, problem in report.stopped.items():
            p.add(f"job {name}: {problem.what}", problem.cause, problem.fix)
        p.raise_if_any()
    return report


def _train(jobs: list[Job], befores: dict, tokens: dict, report: JobsReport, bar, lines: dict) -> None:
    """Step every running job until none is left, logging, evaluating, checkpointing and
    finishing each on its own schedule."""
    width = max(len(j.name) for j in jobs)
    while any(j.running for j in jobs):
        t = time.perf_counter()
        results = jobs_step(jobs)
        spent = time.perf_counter() - t
        for job in jobs:
            st = results.get(job.name)
            if st is None:
                continue
            job.seconds += spent
            cfg, out = job.run.cfg, Path(job.run.cfg.out)
            if isinstance(st, NonFinite):
                _say(f"{job.name}: stopped: {job.stopped}")
                report.stopped[job.name] = job.stopped
                lines[job.name].set_description_str(f"{job.name:>{width}}  stopped at step {job.step + 1}: diverged")
                continue
            tokens[job.name] += st.tokens
            bar.update(1)
            lines[job.name].set_description_str(f"{job.name:>{width}}  step {job.step}/{job.run.total_steps}  "
                                                f"loss {st.loss:.4f}")
            if job.step % cfg.log_every == 0 or job.step == job.run.total_steps:
                _log(out / "metrics.jsonl", {"step": job.step, "loss": st.loss, "grad_norm": st.grad_norm,
                                             "tokens_per_s": tokens[job.name] / max(job.seconds, 1e-9),
                                             "lr": [g["lr"] for g in job.run.opt.param_groups],
                                             **{f"aux_{a}": v for a, (v, _) in st.aux.items()}})
            if job.step == job.run.total_steps:
                _finish(job, befores[job.name], tokens[job.name])
                report.finished.append(job.name)
                continue
            if cfg.eval_every and job.step % cfg.eval_every == 0:
                _log(out / "metrics.jsonl", {"step": job.step, "val_loss": _evaluate(job, 0)["loss"]})
            if cfg.save_every and job.step % cfg.save_every == 0:
                _checkpoint(job, befores[job.name])
