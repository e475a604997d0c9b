"""The training job around the loop: evaluate, resume, log, checkpoint, plot, report.

`run_training(cfg)` is what `slimtune train` calls. Outputs in cfg.out:
    metrics.jsonl    one line per logged step and per evaluation
    checkpoints/     the newest cfg.keep_checkpoints checkpoints (see checkpoint.py)
    adapter/         the final adapter
    loss.png         train and validation loss curves
    summary.json     before/after evaluation, parameter count, time
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from tqdm import tqdm

from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig, to_dict
from .errors import Problems
from .evaluate import eval_loss, generate, score
from .io import adapter_state_dict
from .ops import count_parameters
from .prepare import pad_id
from .parallel import barrier, full_tensors
from .train import Interrupted, Run, setup, train_step


def _log(path: Path, record: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _val_record(step: int, scores: dict) -> dict:
    """A metrics line for an evaluation: the held-out loss, and exact match when generated."""
    return {"step": step, "val_loss": scores["loss"], **({"exact_match": scores["exact_match"]}
                                                          if "exact_match" in scores else {})}


def _trim_log(path: Path, step: int) -> None:
    """On resume, drop records written after the checkpoint (they will be written again)."""
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if json.loads(line).get("step", 0) <= step]
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
            preds = generate(run.model, run.tokenizer, examples, run.cfg.template, run.cfg.max_new_tokens, 32)
        s = score(preds, [e.response for e in examples])
        out.update(exact_match=s["exact_match"], rouge_l=s["rouge_l"], n_generated=s["n"])
    return out


def plot_losses(metrics: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
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


def run_training(cfg: TrainConfig, **setup_kwargs) -> dict:
    """Train as cfg says; returns a summary (and the per-step losses under 'losses')."""
    run = setup(cfg, **setup_kwargs)
    out, main = Path(cfg.out), run.rank == 0
    metrics = out / "metrics.jsonl"
    start, state = 0, {}
    if cfg.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            p = Problems("nothing to resume")
            p.add(f"resume=true with out={cfg.out!r}", "no complete checkpoint under it",
                  "drop --resume to start fresh, or point --out at the run to continue")
            p.raise_if_any()
        state = load_checkpoint(ckpt, run.model, run.opt)
        if state.get("window") != run.window:
            p = Problems("cannot resume")
            p.add(f"window of {run.window} examples per step", f"the checkpoint was written with {state.get('window')}",
                  "resume with the same batch_size x grad_accum x processes")
            p.raise_if_any()
        start = state["step"]
        if main:
            _trim_log(metrics, start)
    elif main:
        out.mkdir(parents=True, exist_ok=True)
        metrics.unlink(missing_ok=True)
    count = count_parameters(run.model)
    n_gen = 0 if run.fsdp else cfg.eval_generate  # FSDP2: loss only, computed by every rank together
    before = state.get("before") or (evaluate_run(run, n_gen) if run.evaluates else {})
    if main and not cfg.resume:
        _log(metrics, _val_record(0, before))
    t0, tokens, losses = time.perf_counter(), 0, {}
    bar = tqdm(total=run.total_steps, initial=start, disable=not (cfg.progress and main), unit="step",
               dynamic_ncols=True)

    def checkpoint(step: int) -> None:
        if run.evaluates:  # under FSDP2 every rank takes part in gathering the tensors
            save_checkpoint(out, step, run.model, run.opt,
                            {"window": run.window, "epoch": step // run.steps_per_epoch,
                             "position": step % run.steps_per_epoch, "total_steps": run.total_steps,
                             "schedule": {"kind": cfg.schedule, "warmup": cfg.warmup_steps}, "before": before,
                             "config": to_dict(cfg)}, cfg.keep_checkpoints, write=main)

    step = start
    try:
        while step < run.total_steps:
            st = train_step(run, step)
            step, tokens, loss = step + 1, tokens + st.tokens, st.loss
            losses[step] = loss
            rate = tokens / (time.perf_counter() - t0)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{rate:.0f}")
            if main and (step % cfg.log_every == 0 or step == run.total_steps):
                _log(metrics, {"step": step, "loss": loss, "grad_norm": st.grad_norm, "tokens_per_s": rate,
                               "lr": [g["lr"] for g in run.opt.param_groups]})
            if cfg.eval_every and step % cfg.eval_every == 0 and step < run.total_steps and run.evaluates:
                val = evaluate_run(run, 0)["loss"]
                if main:
                    _log(metrics, {"step": step, "val_loss": val})
            if cfg.save_every and step % cfg.save_every == 0:
                checkpoint(step)
    except KeyboardInterrupt:
        checkpoint(step)
        bar.close()
        raise Interrupted(f"interrupted at step {step}; checkpoint written to {out / 'checkpoints'}; "
                          f"continue with --resume") from None
    bar.close()
    checkpoint(step)
    summary = {"steps": step, "train_seconds": time.perf_counter() - t0, "trainable": count.trainable,
               "base": count.base, "losses": losses}
    after = evaluate_run(run, n_gen) if run.evaluates else {}
    adapter = full_tensors(adapter_state_dict(run.model)) if run.fsdp else None
    if main:
        import slimtune

        _log(metrics, _val_record(step, after))
        slimtune.save_adapter(run.model, out / "adapter", adapter)
        plot_losses(metrics, out / "loss.png")
        summary.update(before=before, after=after)
        (out / "summary.json").write_text(json.dumps({k: v for k, v in summary.items() if k != "losses"}, indent=1))
    barrier()  # under torchrun, no rank leaves before rank 0 has written
    return summary
