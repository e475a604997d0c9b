"""`slimtune eval`: loss, generation, ROUGE-L, exact match and judge scores, to JSONL."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import torch

from ..data import rows as D
from ..data.batches import pad_id, tokenize
from ..data.demo import demo_split
from ..errors import Problems
from ..eval.config import EvalConfig
from ..eval.generation import generate
from ..eval.judge import Judge
from ..eval.metrics import score
from ..formats.adapter import load_adapter
from .generate import gist_template
from ..models.load import load_model, load_tokenizer, resolve_device
from ..models.quantize import quantize_model
from ..train.loss import CausalLMLoss, eval_loss


def _jsonl(path: str | Path) -> list:
    """The JSON values of a .jsonl file's non-blank lines."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def load_eval_rows(cfg: EvalConfig) -> tuple[list[D.Example], list[str]]:
    """(examples, ids). Question files (rows with 'turns') give the first turn as the prompt and
    an empty reference unless cfg.references has one."""
    if cfg.data == ["demo"]:
        rows = demo_split(2000, cfg.limit or 100)[1]
        return [D.to_example(r, f"demo-eval[{i}]") for i, r in enumerate(rows)], [str(i) for i in range(len(rows))]
    refs = {r["question_id"]: r["choices"][0]["turns"][0] for r in _jsonl(cfg.references)} if cfg.references else {}
    examples, ids, plain = [], [], []
    for f in cfg.data:
        try:
            rows = _jsonl(f) if f.endswith(".jsonl") else []
        except (OSError, ValueError):
            rows = []  # load_rows below reports what is wrong with the file
        if rows and all(isinstance(r, dict) and "turns" in r for r in rows):
            for r in rows:
                ex = D.Example([{"role": "user", "content": r["turns"][0]}], refs.get(r["question_id"], ""),
                               where=f"{f}:{r['question_id']}")
                examples.append(ex), ids.append(str(r["question_id"]))
        else:
            plain.append(f)
    if plain:
        more, _ = D.load_rows(plain, "error")
        examples += more
        ids += [e.where for e in more]
    if cfg.limit:
        examples, ids = examples[:cfg.limit], ids[:cfg.limit]
    return examples, ids


def run_eval(cfg: EvalConfig, model=None, tokenizer=None) -> dict:
    device = resolve_device(cfg.device)
    if model is None:
        model = load_model(cfg.model).to(device)
        tokenizer = load_tokenizer(cfg.model)
        quantize_model(model, cfg.quantize)
        if cfg.adapter:
            load_adapter(model, cfg.adapter, tokenizer=tokenizer)
    model.eval()
    template, gist = gist_template(model, cfg.template)
    examples, ids = load_eval_rows(cfg)
    with_ref = [e for e in examples if e.response]
    summary: dict = {"model": cfg.model, "adapter": cfg.adapter, "rows": len(examples)}
    if with_ref:
        summary.update(eval_loss(CausalLMLoss(model), tokenize(with_ref, tokenizer, template, cfg.max_len, gist=gist),
                                 cfg.batch_size, pad_id(tokenizer), device))
    torch.manual_seed(cfg.seed)
    preds = generate(model, tokenizer, examples, template, cfg.max_new_tokens, cfg.batch_size, cfg.do_sample,
                     cfg.temperature, cfg.top_p, cfg.seed, gist=gist)
    rows = [{"id": i, "prompt": e.messages[-1]["content"], "prediction": p, "reference": e.response}
            for i, e, p in zip(ids, examples, preds)]
    if with_ref:
        s = score([r["prediction"] for r in rows if r["reference"]], [r["reference"] for r in rows if r["reference"]])
        it = iter(s["per_example"])
        for r in rows:
            if r["reference"]:
                r["exact_match"], r["rouge_l"] = next(it)
        summary.update(exact_match=s["exact_match"], rouge_l=s["rouge_l"])
    if cfg.judge_url:
        summary.update(judge_rows(cfg, rows))
    out = Path(cfg.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    Path(str(out) + ".summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def judge_rows(cfg: EvalConfig, rows: list[dict]) -> dict:
    """Single-answer scores (and a pairwise win rate when cfg.pairwise_against is given), in place."""
    judge = Judge(cfg.judge_url, cfg.judge_model, os.environ.get(cfg.judge_key_env))
    scores = []
    for r in rows:
        r["judge_score"] = judge.single(r["prompt"], r["prediction"], r["reference"] or None)
        r["judge_verdict"] = judge.raw[-1]  # the judge's own words, for auditing unparseable ones
        if r["judge_score"] is not None:
            scores.append(r["judge_score"])
    out = {"judge_model": cfg.judge_model, "judge_score": sum(scores) / len(scores) if scores else None,
           "judge_scored": len(scores)}
    if cfg.pairwise_against:
        theirs = {str(o["id"]): o["prediction"] for o in _jsonl(cfg.pairwise_against)}
        missing = [r["id"] for r in rows if str(r["id"]) not in theirs]
        if missing:
            p = Problems("pairwise comparison impossible")
            p.add(f"pairwise_against={cfg.pairwise_against!r}", f"it has no answers for ids {missing[:5]}",
                  "compare two evals of the same data")
            p.raise_if_any()
        rng, wins = random.Random(cfg.seed), []
        for r in rows:
            r["pairwise"] = judge.pairwise(r["prompt"], r["prediction"], theirs[str(r["id"])], rng)
            r["pairwise_verdict"] = judge.raw[-1]
            if r["pairwise"] is not None:
                wins.append(r["pairwise"])
        out.update(win_rate=sum(wins) / len(wins) if wins else None, pairwise_judged=len(wins))
    out["judge_unparseable"] = judge.unparseable
    return out
