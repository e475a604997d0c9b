"""Does a gist learn to carry the instruction? gist (k = 1, 2, 4), pos_control and neg_control
models trained on the gist task family (slimtune/data/tasks.py) with the same data, steps and
seed, scored by exact match on its seen, unseen and novel splits at every checkpoint.

    nice -n 19 python bench/gist_tasks.py --out runs/gist_tasks        # SmolLM2-135M, 2 CPU cores
    python bench/gist_tasks.py --out runs/gist_tasks --report          # the tables and the curve again

Resumable at every level: a finished training run is skipped, an interrupted one resumes from
its newest checkpoint, and each (run, checkpoint, split) score is appended to results.jsonl as
it lands and never computed twice. The controls are trained once, with one gist token: pos_control
sees the whole prompt and neg_control nothing before its gists, whatever k is, so they bound
every k. The recovered share is (gist - neg) / (pos - neg), per split and checkpoint.
Writes OUT/summary.json, OUT/recovered.png, and prints the Markdown table of docs/gisting.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import slimtune
from slimtune.data.tasks import gist_task_splits

EVAL_SPLITS = ("seen", "unseen", "novel")


def write_data(out: Path, rows: int, per_split: int, seed: int) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, data in gist_task_splits(seed=seed, train=rows, eval=per_split).items():
        files[split] = out / f"{split}.jsonl"
        if not files[split].is_file():
            files[split].write_text("".join(json.dumps(r) + "\n" for r in data))
    return files


def checkpoints(run: Path) -> list[tuple[int, Path]]:
    """(step, adapter directory) of every kept checkpoint, and of the final adapter."""
    found = {int(p.name.split("-")[1]): p for p in (run / "checkpoints").glob("step-*") if p.is_dir()}
    return sorted(found.items())


def train(run: Path, args, files: dict[str, Path], condition: str, k: int, log: Path) -> None:
    if (run / "adapter").is_dir():
        return
    t0 = time.perf_counter()
    resume = any((run / "checkpoints").glob("step-*"))
    slimtune.run_training(slimtune.TrainConfig(
        model=args.model, method=args.method, data=[str(files["train"])], gist=k, gist_condition=condition,
        steps=args.steps, batch_size=args.batch_size, max_len=128, lr=args.lr, lr_embedding=args.lr_embedding,
        eval_generate=0, eval_every=args.steps // args.points, save_every=args.steps // args.points,
        keep_checkpoints=args.points, progress=False, out=str(run), device=args.device, seed=args.seed,
        resume=resume))
    append(log, {"run": run.name, "train_seconds": time.perf_counter() - t0, "resumed": resume})


def append(log: Path, record: dict) -> None:
    with log.open("a") as f:
        f.write(json.dumps(record) + "\n")


def read(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()] if log.is_file() else []


def evaluate(run: Path, args, files: dict[str, Path], log: Path) -> None:
    done = {(r["run"], r["step"], r["split"]) for r in read(log) if "split" in r}
    for step, adapter in checkpoints(run):
        for split in EVAL_SPLITS:
            if (run.name, step, split) in done:
                continue
            t0 = time.perf_counter()
            s = slimtune.run_eval(slimtune.EvalConfig(
                model=args.model, adapter=str(adapter), data=[str(files[split])], limit=args.per_split,
                max_new_tokens=args.max_new_tokens, batch_size=32, out=str(run / "eval" / f"{split}-{step}.jsonl"),
                device=args.device))
            append(log, {"run": run.name, "step": step, "split": split, "exact_match": s["exact_match"],
                         "loss": s["loss"], "rows": s["rows"], "seconds": time.perf_counter() - t0})
            print(run.name, step, split, f"exact match {s['exact_match']:.3f}", flush=True)


def recovered_share(score: dict, ks: list[int], steps: list[int]) -> dict:
    """{k: {split: {step: (gist - neg) / (pos - neg)}}} of a higher-is-better score, where pos > neg."""
    out: dict = {}
    for k in ks:
        for split in EVAL_SPLITS:
            for s in steps:
                g, p, n = (score.get((r, s, split)) for r in (f"gist-k{k}", "pos_control-k1", "neg_control-k1"))
                if None not in (g, p, n) and p > n:
                    out.setdefault(f"k{k}", {}).setdefault(split, {})[str(s)] = (g - n) / (p - n)
    return out


def summarise(out: Path, ks: list[int]) -> dict:
    records = read(out / "results.jsonl")
    em = {(r["run"], r["step"], r["split"]): r["exact_match"] for r in records if "split" in r}
    loss = {(r["run"], r["step"], r["split"]): r["loss"] for r in records if "split" in r}
    seconds = {r["run"]: r["train_seconds"] for r in records if "train_seconds" in r and not r["resumed"]}
    steps = sorted({s for (_, s, _) in em})
    summary = {"steps": steps, "train_seconds": seconds, "runs": {}}
    for run in [f"gist-k{k}" for k in ks] + ["pos_control-k1", "neg_control-k1"]:
        summary["runs"][run] = {split: {str(s): {"exact_match": em.get((run, s, split)), "loss": loss.get((run, s, split))}
                                        for s in steps if (run, s, split) in em} for split in EVAL_SPLITS}
    summary["recovered"] = recovered_share(em, ks, steps)
    # the same share by held-out loss, (neg - gist) / (neg - pos): the share of the negated losses
    summary["recovered_by_loss"] = recovered_share({key: -v for key, v in loss.items()}, ks, steps)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def plot(out: Path, summary: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(EVAL_SPLITS), figsize=(12, 3.4), sharey=True)
    for ax, split in zip(axes, EVAL_SPLITS):
        for measure, style in (("recovered", "-"), ("recovered_by_loss", "--")):
            for i, (k, by_split) in enumerate(sorted(summary[measure].items())):
                points = sorted((int(s), v) for s, v in by_split.get(split, {}).items())
                if points:
                    ax.plot(*zip(*points), style, marker="o", color=f"C{i}",
                            label=f"gist, {k}, " + ("exact match" if measure == "recovered" else "loss"))
        ax.axhline(0.8 if split == "seen" else 0.5, color="grey", ls="--", lw=0.8)
        ax.set_title(split)
        ax.set_xlabel("step")
    axes[0].set_ylabel("recovered share of the gap")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "recovered.png", dpi=110)


def table(summary: dict) -> str:
    last = str(summary["steps"][-1]) if summary["steps"] else None
    lines = ["| model | " + " | ".join(f"{s} EM" for s in EVAL_SPLITS) + " | " +
             " | ".join(f"{s} recovered (EM / loss)" for s in EVAL_SPLITS) + " | train s |",
             "|---|" + "---|" * (2 * len(EVAL_SPLITS) + 1)]
    for run, by_split in summary["runs"].items():
        ems = [by_split[s].get(last, {}).get("exact_match") for s in EVAL_SPLITS]
        k = run.split("-")[-1]
        rec = [(summary["recovered"].get(k, {}).get(s, {}).get(last),
                summary["recovered_by_loss"].get(k, {}).get(s, {}).get(last)) if run.startswith("gist") else (None, None)
               for s in EVAL_SPLITS]
        cells = [f"{x:.3f}" if x is not None else "–" for x in ems] + \
                [" / ".join(f"{x:.2f}" if x is not None else "–" for x in pair) for pair in rec]
        secs = summary["train_seconds"].get(run)
        lines.append(f"| {run} | " + " | ".join(cells) + f" | {secs:.0f} |" if secs else f"| {run} | " + " | ".join(cells) + " | – |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gist_tasks")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--k", type=int, nargs="+", default=[1, 4, 2])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--points", type=int, default=4, help="checkpoints scored along the way (the curve)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--lr-embedding", type=float, default=None)
    ap.add_argument("--rows", type=int, default=6000, help="training rows generated")
    ap.add_argument("--per-split", type=int, default=100, help="rows scored per evaluation split")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--report", action="store_true", help="only summarise what results.jsonl holds")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "results.jsonl"
    if not args.report:
        files = write_data(out / "data", args.rows, args.per_split, 0)
        runs = [("pos_control", 1), ("neg_control", 1)] + [("gist", k) for k in args.k]
        for condition, k in runs:
            run = out / f"{condition}-k{k}"
            train(run, args, files, condition, k, log)
            evaluate(run, args, files, log)
    summary = summarise(out, args.k)
    plot(out, summary)
    print(table(summary))


if __name__ == "__main__":
    main()
