"""The training job around the loop: evaluate, resume, log, checkpoint, plot, report.

`run_training(cfg)` is what `slimtune train` calls. Outputs in cfg.out:
    metrics.jsonl    one JSON line per logged step and per evaluation (non-finite values as null)
    checkpoints/     the newest cfg.keep_checkpoints checkpoints (train/checkpoint.py)
    adapter/         the final adapter (PEFT's format where PEFT can express it)
    loss.png         train and validation loss curves
    router_load.png  for mixtures: the share of tokens each expert took, per routing layer, over the run
    summary.json     before/after evaluation, parameter count, time, truncation, skipped rows
"""

from __future__ import annotations

import json
import math
import resource
import time
from pathlib import Path

import torch
from tqdm import tqdm

from ..adapters.gist import gist_tokens
from ..adapters.helpers import count_parameters, router_stats
from ..adapters.inject import adapter_set
from ..configs import to_dict
from ..data.batches import pad_id
from ..errors import Problems
from ..eval.generation import generate
from ..eval.metrics import score
from ..formats.adapter import adapter_state_dict, save_adapter
from ..formats.sharding import full_tensors
from ..train.checkpoint import clean_leftovers, newest_readable, restore, save_checkpoint
from ..train.config import RESUMABLE, TrainConfig
from ..train.loop import Interrupted, Run, setup, train_step
from ..train.loss import eval_loss
from ..train.parallel import barrier


def _finite(value):
    """JSON has no NaN or Infinity: such values are written as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value


def _log(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(_finite(record), allow_nan=False) + "\n")


def _val_record(step: int, scores: dict, final: bool = False) -> dict:
    """A metrics line for an evaluation: the held-out loss, and exact match when generated."""
    return {"step": step, "val_loss": scores["loss"], **({"exact_match": scores["exact_match"]}
                                                          if "exact_match" in scores else {}),
            **({"final": True} if final else {})}


def _trim_log(path: Path, step: int) -> None:
    """On resume, drop what was written after the checkpoint, and the final evaluation of a run
    that was cut during its final save: both are written again."""
    if path.is_file():
        keep = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill
            if record.get("step", 0) <= step and not record.get("final"):
                keep.append(line)
        path.write_text("".join(line + "\n" for line in keep))


def evaluate_run(run: Run, n_generate: int) -> dict:
    """Validation loss and, on n_generate held-out examples, exact match and ROUGE-L."""
    loss_model = run.loss_model.module if run.world > 1 and not run.fsdp else run.loss_model
    run.model.eval()
    out = eval_loss(loss_model, run.val, run.cfg.batch_size, pad_id(run.tokenizer), run.device, run.autocast)
    run.model.train()
    if n_generate:
        examples = run.val_examples[:n_generate]
        with run.autocast():
            preds = generate(run.model, run.tokenizer, examples, run.cfg.template, run.cfg.max_new_tokens, 32,
                             gist=gist_tokens(run.model))
        s = score(preds, [e.response for e in examples])
        out.update(exact_match=s["exact_match"], rouge_l=s["rouge_l"], n_generated=s["n"])
    return out


def evaluate_before(cfg: TrainConfig) -> dict:
    """The evaluation a run of cfg makes at step 0, before any training."""
    return evaluate_run(setup(cfg), 0)


def plot_losses(metrics: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if r.get("loss") is not None]
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss (per response token)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


class RouterLog:
    """The routers' statistics over a run: counted on every logged step (load per expert per
    site, entropy, tokens dropped), summed for the heat map drawn at the end."""

    def __init__(self):
        self.load: dict[str, list[float]] = {}  # site -> token slots per expert over the run

    def record(self, model) -> dict:
        stats = router_stats(model)
        for site, s in stats.items():
            total = self.load.setdefault(site, [0.0] * len(s["load"]))
            self.load[site] = [t + share * s["tokens"] for t, share in zip(total, s["load"])]
        if not stats:
            return {}
        return {"router": {site: {k: s[k] for k in ("load", "entropy", "dropped")} for site, s in stats.items()},
                "router_entropy": sum(s["entropy"] for s in stats.values()) / len(stats)}

    def plot(self, png: Path) -> None:
        if not self.load:
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = list(self.load)
        rows = [[v / max(sum(self.load[n]), 1e-12) for v in self.load[n]] for n in names]
        E = max(len(r) for r in rows)
        fig, ax = plt.subplots(figsize=(1.2 + 0.45 * E, 1.2 + 0.22 * len(names)), dpi=100)
        im = ax.imshow([r + [float("nan")] * (E - len(r)) for r in rows], aspect="auto", cmap="viridis", vmin=0)
        ax.set_xlabel("expert")
        ax.set_xticks(range(E))
        ax.set_yticks(range(len(names)))
        ax.set_yticklabels([n.removeprefix("model.").replace("layers.", "") for n in names], fontsize=6)
        ax.set_title(f"share of token slots per expert (uniform = {1 / E:.3f})", fontsize=8)
        fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(png)
        plt.close(fig)


def check_out(cfg: TrainConfig) -> None:
    """The output directory can be written: checked before anything loads."""
    out = Path(cfg.out)
    p = Problems("cannot write the run")
    if out.exists() and not out.is_dir():
        p.add(f"out={cfg.out!r}", "it is a file, not a directory", "give a directory for the run's outputs")
    elif cfg.resume and not (out / "checkpoints").is_dir():
        p.add(f"resume=true with out={cfg.out!r}", "no checkpoints under it",
              "drop --resume to start fresh, or point --out at the run to continue")
    elif not cfg.resume and any((out / "checkpoints").glob("step-*")):
        p.add(f"out={cfg.out!r}", "it holds the checkpoints of an earlier run, which a fresh run would mix "
              "with its own", "continue that run with --resume, or give a new --out (or delete the old one)")
    p.raise_if_any()


def config_changes(saved: dict, now: TrainConfig) -> list[str]:
    """The settings a resumed run would compute differently with, as 'name: old -> new'."""
    current = to_dict(now)
    return [f"{k}: {saved.get(k)!r} -> {current[k]!r}" for k in current
            if k not in RESUMABLE and saved.get(k) != current[k]]


def _say(message: str) -> None:
    print(f"slimtune: {message}", flush=True)


def peak_memory(device) -> int:
    """The process's peak memory so far: CUDA's allocated peak on a GPU, else the peak resident
    set (Linux reports it in KiB)."""
    if torch.device(device).type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_training(cfg: TrainConfig, **setup_kwargs) -> dict:
    """Train as cfg says; returns a summary (and the per-step losses under 'losses')."""
    check_out(cfg)
    run = setup(cfg, **setup_kwargs)
    out, main = Path(cfg.out), run.rank == 0
    metrics = out / "metrics.jsonl"
    if main:
        for path in clean_leftovers(out):
            _say(f"removed {path}, left by a run that was stopped while writing a checkpoint")
        cut = run.train.report
        if cut["prompts_cut"] or cut["responses_cut"]:
            _say(f"truncated to max_len={cfg.max_len}: {cut['prompts_cut']} prompts and {cut['responses_cut']} "
                 f"responses of {cut['examples']} training examples (--truncation error lists them instead)")
        for problem in run.skipped[:20]:
            _say(f"skipped {problem}")
        if len(run.skipped) > 20:
            _say(f"skipped {len(run.skipped) - 20} more bad rows (all of them are listed in summary.json)")
    start, state = 0, {}
    if cfg.resume:
        ckpt, skipped = newest_readable(out, run.model)
        for path, why in skipped:
            _say(f"checkpoint {path.name} does not read ({why}); falling back to an older one")
        p = Problems("cannot resume")
        if ckpt is None:
            p.add(f"resume=true with out={cfg.out!r}", "no complete, readable checkpoint under it",
                  "drop --resume to start fresh, or point --out at the run to continue")
            p.raise_if_any()
        saved = ckpt["state"]
        if saved.get("window") != run.window:
            p.add(f"window of {run.window} examples per step", f"the checkpoint was written with {saved.get('window')}",
                  "resume with the same batch_size x grad_accum x processes")
        changed = config_changes(saved.get("config", {}), cfg)
        if changed and not cfg.allow_config_change:
            p.add("changed settings: " + "; ".join(changed), "a resumed run must compute what the interrupted one "
                  "would have", "resume with the settings it was written with, or pass --allow_config_change true")
        p.raise_if_any()
        state = restore(ckpt, run.model, run.opt)
        start = state["step"]
        if skipped or changed:
            _say(f"resuming from {ckpt['path'].name}" + (f" with changed settings: {'; '.join(changed)}"
                                                          if changed else ""))
        if main:
            _trim_log(metrics, start)
    elif main:
        out.mkdir(parents=True, exist_ok=True)
        metrics.unlink(missing_ok=True)
    count = count_parameters(run.model)
    n_gen = 0 if run.fsdp else cfg.eval_generate  # FSDP2: loss only, computed by every rank together
    try:
        before = state.get("before") or (evaluate_run(run, n_gen) if run.evaluates else {})
    except KeyboardInterrupt:
        raise Interrupted("interrupted before training started; nothing was trained or written") from None
    if main and not cfg.resume:
        _log(metrics, _val_record(0, before))
    t0, tokens, losses, routers = time.perf_counter(), 0, {}, RouterLog()
    router_stats(run.model)  # the evaluation before training is not counted
    aset = adapter_set(run.model)
    bar = tqdm(total=run.total_steps, initial=start, disable=not (cfg.progress and main), unit="step",
               dynamic_ncols=True)

    def checkpoint(step: int) -> None:
        if run.evaluates:  # under FSDP2 every rank takes part in gathering the tensors
            save_checkpoint(out, step, run.model, run.opt,
                            {"window": run.window, "epoch": step // run.steps_per_epoch,
                             "position": step % run.steps_per_epoch, "total_steps": run.total_steps,
                             "schedule": {"kind": cfg.schedule, "warmup": cfg.warmup_steps}, "before": _finite(before),
                             "config": to_dict(cfg)}, cfg.keep_checkpoints, write=main)

    step, step_seconds = start, 0.0  # step_seconds: in train_step only (no evaluation, no checkpoint)
    try:
        while step < run.total_steps:
            if aset is not None:  # routers count on the steps that are logged (a sample, at no cost between)
                aset.state.count_routing = (step + 1) % cfg.log_every == 0 or step + 1 == run.total_steps
            t_step = time.perf_counter()
            st = train_step(run, step)
            step_seconds += time.perf_counter() - t_step
            step, tokens, loss = step + 1, tokens + st.tokens, st.loss
            losses[step] = loss
            rate = tokens / (time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}")
            if main and (step % cfg.log_every == 0 or step == run.total_steps):
                _log(metrics, {"step": step, "loss": loss, "grad_norm": st.grad_norm, "tokens_per_s": rate,
                               "lr": [g["lr"] for g in run.opt.param_groups],
                               **{f"aux_{name}": v for name, (v, _) in st.aux.items()}, **routers.record(run.model)})
            if cfg.eval_every and step % cfg.eval_every == 0 and step < run.total_steps and run.evaluates:
                val = evaluate_run(run, 0)["loss"]
                if main:
                    _log(metrics, {"step": step, "val_loss": val})
            if cfg.save_every and step % cfg.save_every == 0:
                checkpoint(step)
    except KeyboardInterrupt:
        bar.close()
        if step == start:
            raise Interrupted(f"interrupted at step {step}; nothing new to save"
                              + ("; continue with --resume" if start else "")) from None
        checkpoint(step)
        raise Interrupted(f"interrupted at step {step}; checkpoint written to {out / 'checkpoints'}; "
                          f"continue with --resume") from None
    bar.close()
    checkpoint(step)
    summary = {"steps": step, "steps_this_process": step - start, "train_seconds": time.perf_counter() - t0,
               "step_seconds": step_seconds,
               "trainable": count.trainable,
               "base": count.base, "peak_memory_bytes": peak_memory(run.device), "losses": losses, "truncation": dict(run.train.report),
               "skipped_rows": [str(p) for p in run.skipped]}
    after = evaluate_run(run, n_gen) if run.evaluates else {}
    adapter = full_tensors(adapter_state_dict(run.model)) if run.fsdp else None
    if main:
        _log(metrics, _val_record(step, after, final=True))
        save_adapter(run.model, out / "adapter", tensors=adapter)
        plot_losses(metrics, out / "loss.png")
        routers.plot(out / "router_load.png")
        summary.update(before=before, after=after)
        (out / "summary.json").write_text(json.dumps(_finite({k: v for k, v in summary.items() if k != "losses"}),
                                                     indent=1, allow_nan=False))
    barrier()  # under torchrun, no rank leaves before rank 0 has written
    return summary

