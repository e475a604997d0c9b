"""Evaluation: held-out loss and perplexity, batched generation, ROUGE-L and exact match."""

from __future__ import annotations

import math
import re
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from .data import IGNORE, Example
from .prepare import collate, format_example, pad_id


class CausalLMLoss(torch.nn.Module):
    """Summed next-token loss over the labelled tokens, and their count.

    For the usual *ForCausalLM models the LM head runs only on labelled positions (the
    response), not on the prompt: the same loss as `model(labels=...)`, far less work."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model
        cfg = model.config
        self.fast = (type(model).__name__.endswith("ForCausalLM") and model.get_output_embeddings() is not None
                     and not getattr(cfg, "final_logit_softcapping", None) and not getattr(cfg, "logit_scale", None)
                     and model.base_model is not model)

    def forward(self, input_ids, attention_mask, labels):
        target = labels[:, 1:]  # (B, T-1)
        keep = target != IGNORE
        if self.fast:
            hidden = self.model.base_model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            logits = self.model.get_output_embeddings()(hidden[:, :-1][keep])  # (N, V)
        else:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1][keep]
        return F.cross_entropy(logits.float(), target[keep], reduction="sum"), keep.sum()


@torch.no_grad()
def eval_loss(loss_model: CausalLMLoss, prepared, batch_size: int, pad_id: int, device, autocast=nullcontext) -> dict:
    total, count = 0.0, 0
    for i in range(0, len(prepared.input_ids), batch_size):
        b = collate(prepared.input_ids[i:i + batch_size], prepared.labels[i:i + batch_size], pad_id)
        with autocast():
            s, n = loss_model(**{k: v.to(device) for k, v in b.items()})
        total, count = total + s.item(), count + int(n)
    loss = total / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50)), "tokens": count}


@torch.no_grad()
def generate(model, tokenizer, examples: list[Example], template: str = "chat", max_new_tokens: int = 64,
             batch_size: int = 16, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
             seed: int = 0) -> list[str]:
    """Responses to the examples' prompts, batched with left padding; greedy unless do_sample."""
    device = next(model.parameters()).device
    prompts = [format_example(e, template, tokenizer)[0] for e in examples]
    outs: list[str] = []
    pad = pad_id(tokenizer)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    was_training = model.training
    model.eval()
    for i in range(0, len(prompts), batch_size):
        ids = [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts[i:i + batch_size]]
        b = collate(ids, ids, pad, side="left")
        if do_sample:
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (), generator=gen)))
        kw = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {"do_sample": False}
        out = model.generate(input_ids=b["input_ids"].to(device), attention_mask=b["attention_mask"].to(device),
                             max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=tokenizer.eos_token_id,
                             top_k=None, **({} if do_sample else {"temperature": None, "top_p": None}), **kw)
        new = out[:, b["input_ids"].shape[1]:]
        outs += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    model.train(was_training)
    return outs


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
