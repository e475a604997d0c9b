"""Gisting demonstration: gist, pos_control and neg_control models, each LoRA + the gist row,
trained on the same data and steps, scored with ROUGE-L on the Alpaca+ validation splits.

    python bench/gist_demo.py --out /tmp/gist_demo            # SmolLM2-135M, CPU is enough
    python bench/gist_demo.py --steps 300 --device cuda

The Alpaca+ training set is not public, so the training rows are a mix from ../shared/data
(Self-Instruct seed tasks, GPTeacher role-play and tool use, GSM8K) and the built-in demo data;
any row whose instruction also appears in an evaluation split is dropped. The mix is written
under --out, never into the repository.

Reported: ROUGE-L per split and condition; the share of the gap between the controls that
gist recovers, (gist - neg) / (pos - neg); and the compression factor on the human split
(instruction tokens per gist token, from real gist caches).
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="/tmp/gist_demo")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--method", default="lora")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--rows", type=int, default=2400)
    ap.add_argument("--per-split", type=int, default=100, help="examples scored on the seen and unseen splits")
    ap.add_argument("--human", type=int, default=0, help="examples scored on the human split (0: all 252)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--conditions", nargs="+", default=["gist", "pos_control", "neg_control"])
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in training_mix(args.rows, 0)))
    results: dict = {"model": args.model, "method": args.method, "steps": args.steps, "rows": args.rows,
                     "scores": {}, "seconds": {}}
    for condition in args.conditions:
        run = out / condition
        t0 = time.perf_counter()
        if not (run / "adapter").is_dir():
            slimtune.run_training(slimtune.TrainConfig(
                model=args.model, method=args.method, data=[str(data)], gist=1, gist_condition=condition,
                steps=args.steps, batch_size=8, max_len=args.max_len, eval_generate=0, eval_every=0, save_every=0,
                progress=False, out=str(run), device=args.device))
        results["seconds"][f"train_{condition}"] = time.perf_counter() - t0
        scores = {}
        for split in SPLITS:
            n = args.per_split if split != "human" else args.human
            s = slimtune.run_eval(slimtune.EvalConfig(
                model=args.model, adapter=str(run / "adapter"), data=[str(SHARED / "alpaca_plus" /
                                                                         f"validation_{split}.json")],
                limit=n, max_new_tokens=args.max_new_tokens, batch_size=32, out=str(run / f"eval_{split}.jsonl"),
                device=args.device))
            scores[split] = {"rouge_l": s["rouge_l"], "loss": s["loss"], "rows": s["rows"]}
            print(condition, split, scores[split], flush=True)
        results["scores"][condition] = scores
        results["seconds"][condition] = time.perf_counter() - t0
    sc = results["scores"]
    if all(c in sc for c in ("gist", "pos_control", "neg_control")):
        results["recovered"] = {s: (sc["gist"][s]["rouge_l"] - sc["neg_control"][s]["rouge_l"]) /
                                   max(1e-9, sc["pos_control"][s]["rouge_l"] - sc["neg_control"][s]["rouge_l"])
                                for s in SPLITS}
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
