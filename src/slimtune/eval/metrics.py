"""Scores of generated text: exact match (numeric where the reference is a number) and ROUGE-L."""

from __future__ import annotations

import re

_NUM = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def final_number(text: str) -> float | None:
    """GSM8K style: the number after '####' if present, else the last number in the text."""
    tail = text.split("####")[-1] if "####" in text else text
    nums = _NUM.findall(tail)
    if not nums:
        return None
    try:
        return float(nums[-1].replace(",", ""))
    except ValueError:
        return None


def _norm(s: str) -> str:
    return " ".join(s.strip().rstrip(".").split())


def exact_match(prediction: str, reference: str) -> float:
    """1.0 when they agree: numerically if the reference is a number (or ends in '#### N'),
    else as strings after trimming whitespace and a final period."""
    ref = _norm(reference)
    if "####" in reference or _NUM.fullmatch(ref):
        r, p = final_number(reference), final_number(prediction)
        return float(r is not None and p is not None and abs(r - p) < 1e-6)
    return float(_norm(prediction) == ref)


def rouge_l(predictions: list[str], references: list[str]) -> list[float]:
    """ROUGE-L F-measure with stemming (the rouge-score package), one per pair."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references)]


def score(predictions: list[str], references: list[str]) -> dict:
    em = [exact_match(p, r) for p, r in zip(predictions, references)]
    rl = rouge_l(predictions, references)
    n = max(len(em), 1)
    return {"exact_match": sum(em) / n, "rouge_l": sum(rl) / n, "n": len(em), "per_example": list(zip(em, rl))}
