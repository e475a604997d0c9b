"""Gisting on Alpaca+: gist, pos_control and neg_control models (an adapter + the gist row),
trained on the same data, steps and seed, scored with ROUGE-L and loss on the Alpaca+
validation splits.

    nice -n 19 python bench/gist_demo.py --out runs/gist_alpaca --precision bf16   # SmolLM2-135M, CPU
    python bench/gist_demo.py --out runs/gist_alpaca --steps 3000 --device cuda

Settings are chosen before the evaluation splits are touched: a short sweep (--sweep-steps) of
the gist row's learning rate (--sweep-lr-embedding) and of the method (--sweep-methods, LoRA
against full fine-tuning), gist condition only, picked by loss on a validation slice of the
*training* mix. The three conditions then train --steps at the winner. Resumable: finished
runs and evaluations are skipped (their files exist), an interrupted run resumes from its
checkpoint.

The Alpaca+ training set is not public, so the training rows are a mix from ../shared/data
(Self-Instruct seed tasks, GPTeacher role-play and tool use, GSM8K) and the built-in demo data;
any row whose instruction also appears in an evaluation split is dropped. The mix is written
under --out, never into the repository.

Reported: ROUGE-L and loss per split and condition; the share of the gap between the controls
that gist recovers, (gist - neg) / (pos - neg), with a 95 % bootstrap interval (rows resampled,
paired across the conditions); the compression factor on the human split (instruction tokens
per gist token, from real gist caches); wall times.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

import slimtune
from slimtune.data.demo import demo_rows

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SPLITS = ("seen", "unseen", "human")


def eval_rows(split: str) -> list[dict]:
    return json.loads((SHARED / "alpaca_plus" / f"validation_{split}.json").read_text())


def training_mix(n: int, seed: int, max_chars: int = 600) -> list[dict]:
    """Alpaca rows from the shared sets and the demo data, none with an evaluation instruction,
    none longer than max_chars (so that a CPU run takes minutes)."""
    held_out = {r["instruction"].strip() for s in SPLITS for r in eval_rows(s)}
    rows = []
    for line in (SHARED / "self_instruct" / "seed_tasks.jsonl").read_text().splitlines():
        task = json.loads(line)
        rows += [{"instruction": task["instruction"], "input": i["input"], "output": i["output"]}
                 for i in task["instances"]]
    rng = random.Random(seed)
    for name, take in (("gpteacher/roleplay.json", n // 4), ("gpteacher/toolformer.json", n // 4),
                       ("gsm8k/train.json", n // 8)):
        pool = json.loads((SHARED / name).read_text())
        rows += rng.sample(pool, min(take, len(pool)))
    rows += [{"instruction": r["instruction"], "input": r.get("input", ""), "output": r["output"]}
             for r in demo_rows(n // 4) if "instruction" in r]
    rows = [r for r in rows if r["instruction"].strip() not in held_out and r["output"].strip()
            and len(r["instruction"]) + len(r.get("input", "")) + len(r["output"]) <= max_chars]
    rng.shuffle(rows)
    return rows[:n]


def train_run(run: Path, args, data: Path, val: Path, condition: str, method: str, lr_embedding: float | None,
              steps: int) -> float:
    """Train (or resume, or skip) one run; its final validation loss."""
    if not (run / "adapter").is_dir():
        resume = any((run / "checkpoints").glob("step-*"))
        slimtune.run_training(slimtune.TrainConfig(
            model=args.model, method=method, data=[str(data)], val_data=[str(val)], gist=1, gist_condition=condition,
            steps=steps, batch_size=8, max_len=args.max_len, lr=args.lr if method != "full" else args.lr_full,
            lr_embedding=lr_embedding, eval_generate=0, eval_every=max(1, steps // 6), save_every=max(1, steps // 4),
            progress=False, out=str(run), device=args.device, seed=args.seed, resume=resume,
            precision=args.precision))
    return json.loads((run / "summary.json").read_text())["after"]["loss"]


def bootstrap(per_row: dict[str, list[float]], draws: int = 2000, seed: int = 0) -> tuple[float, float] | None:
    """95 % interval of the recovered share, rows resampled with the same indices for the three conditions."""
    rng = random.Random(seed)
    n = len(per_row["gist"])
    shares = []
    for _ in range(draws):
        idx = [rng.randrange(n) for _ in range(n)]
        g, p, q = (statistics.fmean(per_row[c][i] for i in idx) for c in ("gist", "pos_control", "neg_control"))
        if p - q > 1e-9:
            shares.append((g - q) / (p - q))
    if len(shares) < draws // 2:  # the controls do not differ in most resamples: no interval
        return None
    shares.sort()
    return shares[int(0.025 * len(shares))], shares[int(0.975 * len(shares)) - 1]


def val_curves(out: Path, conditions: list[str]) -> dict[str, dict[int, float]]:
    """Each condition's validation-loss curve (loss on the training mix's validation slice)."""
    curves = {}
    for c in conditions:
        file = out / c / "metrics.jsonl"
        if file.is_file():
            records = [json.loads(line) for line in file.read_text().splitlines()]
            curves[c] = {r["step"]: r["val_loss"] for r in records if "val_loss" in r}
    return curves


def plot_curves(curves: dict[str, dict[int, float]], path: Path) -> dict[int, float]:
    """Validation loss per condition against steps, and the share of the controls' gap that gist
    recovers at each step, (neg - gist) / (neg - pos) in loss; that share per step is returned."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = sorted(set.intersection(*(set(c) for c in curves.values()))) if len(curves) == 3 else []
    share = {s: (curves["neg_control"][s] - curves["gist"][s]) / (curves["neg_control"][s] - curves["pos_control"][s])
             for s in steps if s > 0 and curves["neg_control"][s] != curves["pos_control"][s]}
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    for name, curve in curves.items():
        a.plot(list(curve), list(curve.values()), marker="o", label=name)
    a.set(xlabel="step", ylabel="validation loss (training mix)", title="validation loss")
    a.legend()
    b.plot(list(share), list(share.values()), marker="o", color="k")
    b.axhline(1, ls=":", color="grey")
    b.set(xlabel="step", ylabel="(neg - gist) / (neg - pos)", title="recovered share, by validation loss")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return share


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/gist_alpaca")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default=None, help="skip the sweep: this method (with --lr-embedding)")
    ap.add_argument("--lr-embedding", type=float, default=None)
    ap.add_argument("--lr", type=float, default=None, help="the adapter's learning rate (null: 1e-3)")
    ap.add_argument("--lr-full", type=float, default=5e-5, help="full fine-tuning's learning rate")
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--sweep-steps", type=int, default=120)
    ap.add_argument("--sweep-methods", nargs="+", default=["lora", "full"])
    ap.add_argument("--sweep-lr-embedding", type=float, nargs="+", default=[1e-3, 1e-2])
    ap.add_argument("--rows", type=int, default=6000)
    ap.add_argument("--val-rows", type=int, default=64, help="held out of the training mix: the sweep's choice")
    ap.add_argument("--per-split", type=int, default=100, help="examples scored on the seen and unseen splits")
    ap.add_argument("--human", type=int, default=0, help="examples scored on the human split (0: all 252)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto", help="training: fp32 | bf16 | auto (bf16 on a GPU)")
    ap.add_argument("--conditions", nargs="+", default=["gist", "pos_control", "neg_control"])
    ap.add_argument("--curves", default="docs/img/gist_alpaca_curves.png", help="where the validation curves go")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data, val = out / "train.jsonl", out / "val.jsonl"
    if not data.is_file():
        mix = training_mix(args.rows + args.val_rows, 0)
        val.write_text("".join(json.dumps(r) + "\n" for r in mix[: args.val_rows]))
        data.write_text("".join(json.dumps(r) + "\n" for r in mix[args.val_rows:]))
    results: dict = {"model": args.model, "steps": args.steps, "rows": args.rows, "precision": args.precision, "sweep": {}, "scores": {},
                     "seconds": {}}
    method, lr_emb = args.method, args.lr_embedding
    if method is None:  # the sweep: gist condition, loss on the training mix's validation slice
        for m in args.sweep_methods:
            for lr in args.sweep_lr_embedding:
                t0 = time.perf_counter()
                loss = train_run(out / "sweep" / f"{m}-emb{lr:g}", args, data, val, "gist", m, lr, args.sweep_steps)
                results["sweep"][f"{m} lr_embedding={lr:g}"] = loss
                results["seconds"][f"sweep {m} {lr:g}"] = time.perf_counter() - t0
                print("sweep", m, lr, f"val loss {loss:.4f}", flush=True)
        method, lr_emb = min(((m, lr) for m in args.sweep_methods for lr in args.sweep_lr_embedding),
                             key=lambda c: results["sweep"][f"{c[0]} lr_embedding={c[1]:g}"])
    results.update(method=method, lr_embedding=lr_emb)
    per_row: dict[str, dict[str, list[float]]] = {}
    for condition in args.conditions:
        run = out / condition
        t0 = time.perf_counter()
        results.setdefault("val_loss", {})[condition] = train_run(run, args, data, val, condition, method, lr_emb,
                                                                  args.steps)
        results["seconds"][f"train_{condition}"] = time.perf_counter() - t0
        scores = {}
        for split in SPLITS:
            n = args.per_split if split != "human" else args.human
            file = run / f"eval_{split}.jsonl"
            if not Path(str(file) + ".summary.json").is_file():
                slimtune.run_eval(slimtune.EvalConfig(
                    model=args.model, adapter=str(run / "adapter"),
                    data=[str(SHARED / "alpaca_plus" / f"validation_{split}.json")], limit=n,
                    max_new_tokens=args.max_new_tokens, batch_size=32, out=str(file), device=args.device))
            s = json.loads(Path(str(file) + ".summary.json").read_text())
            scores[split] = {"rouge_l": s["rouge_l"], "loss": s["loss"], "rows": s["rows"]}
            per_row.setdefault(split, {})[condition] = [json.loads(line)["rouge_l"] for line in file.read_text().splitlines()]
            print(condition, split, scores[split], flush=True)
        results["scores"][condition] = scores
        results["seconds"][condition] = time.perf_counter() - t0
    sc = results["scores"]
    if all(c in sc for c in ("gist", "pos_control", "neg_control")):
        results["recovered"] = {s: (sc["gist"][s]["rouge_l"] - sc["neg_control"][s]["rouge_l"]) /
                                   max(1e-9, sc["pos_control"][s]["rouge_l"] - sc["neg_control"][s]["rouge_l"])
                                for s in SPLITS}
        results["recovered_ci95"] = {s: bootstrap(per_row[s]) for s in SPLITS}
        results["recovered_by_loss"] = {s: (sc["neg_control"][s]["loss"] - sc["gist"][s]["loss"]) /
                                           max(1e-9, sc["neg_control"][s]["loss"] - sc["pos_control"][s]["loss"])
                                        for s in SPLITS}
    curves = val_curves(out, args.conditions)
    results["val_curves"] = curves
    results["recovered_by_val_loss"] = plot_curves(curves, Path(args.curves))
    if "gist" in sc:  # the compression factor on the human split, from real caches
        model, tok = slimtune.load_model(args.model).eval(), slimtune.load_tokenizer(args.model)
        slimtune.load_adapter(model, out / "gist" / "adapter", tokenizer=tok)
        instructions = sorted({r["instruction"] for r in eval_rows("human")})
        caches = [slimtune.compress_gist(model, tok, i) for i in instructions]
        results["compression_human"] = {"mean_instruction_tokens": statistics.mean(c.instruction_tokens for c in caches),
                                        "gist_tokens": caches[0].num,
                                        "mean_factor": statistics.mean(c.compression for c in caches),
                                        "max_factor": max(c.compression for c in caches)}
    (out / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps({k: v for k, v in results.items() if k != "seconds"}, indent=1))


if __name__ == "__main__":
    main()
