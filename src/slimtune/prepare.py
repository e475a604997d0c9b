"""From examples to batches: templates, tokenization with label masking, truncation,
packing, deterministic shuffling and the validation split.

Templates:
- `chat`: the tokenizer's own chat template (the response is what the template adds for
  the assistant turn, end-of-turn marker included);
- `alpaca`: the Stanford Alpaca prompt, response + EOS;
- `gist`: `Instruction: {instruction}\\n{gists}\\nInput: {input}\\nOutput:` (Mu et al. 2023;
  the Input line is omitted when empty), response + EOS.

Truncation never drops a whole response silently: the prompt is cut from the left first;
a response is cut (from the right) only when it alone leaves less than a quarter of
`max_len` to the prompt, and every cut is counted in `Prepared.report`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from .data import ALPACA, GIST_TOKEN, IGNORE, TEMPLATES, Example
from .errors import Problems


def format_example(ex: Example, template: str, tokenizer, num_gist: int = 1) -> tuple[str, str]:
    """(prompt text, response text) of one example."""
    eos = tokenizer.eos_token or ""
    if template == "chat":
        if not getattr(tokenizer, "chat_template", None):
            p = Problems("no chat template")
            p.add(f"template='chat' with tokenizer {type(tokenizer).__name__}", "the tokenizer has no chat template",
                  "use --template alpaca (or gist), or a tokenizer that has one")
            p.raise_if_any()
        prompt = tokenizer.apply_chat_template(ex.messages, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(ex.messages + [{"role": "assistant", "content": ex.response}],
                                             tokenize=False)
        if not full.startswith(prompt):  # templates that rewrite earlier turns: fall back to the answer + EOS
            return prompt, ex.response + eos
        return prompt, full[len(prompt):]
    instruction = ex.instruction if ex.instruction is not None else "\n\n".join(m["content"] for m in ex.messages)
    if template == "alpaca":
        ctx = ", paired with an input that provides further context" if ex.input else ""
        inp = f"### Input:\n{ex.input}\n\n" if ex.input else ""
        return ALPACA.format(ctx=ctx, instruction=instruction, input=inp), ex.response + eos
    if template == "gist":
        inp = f"\nInput: {ex.input}" if ex.input else ""
        return f"Instruction: {instruction}\n{GIST_TOKEN * num_gist}{inp}\nOutput:", " " + ex.response + eos
    p = Problems("unknown template")
    p.add(f"template={template!r}", "not a template slimtune knows", f"use one of {list(TEMPLATES)}")
    p.raise_if_any()


@dataclass
class Prepared:
    """Tokenized examples and what truncation did to them."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    report: dict = field(default_factory=lambda: {"prompts_cut": 0, "responses_cut": 0, "examples": 0})


def tokenize(examples: list[Example], tokenizer, template: str = "chat", max_len: int = 512,
             truncation: str = "prompt", num_gist: int = 1) -> Prepared:
    """Token ids and labels (IGNORE on the prompt). truncation: 'prompt' (cut as the module
    docstring says) or 'error' (a row that does not fit is an error)."""
    out = Prepared([], [])
    problems = Problems("examples longer than max_len")
    for ex in examples:
        prompt, response = format_example(ex, template, tokenizer, num_gist)
        p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        r = tokenizer(response, add_special_tokens=False)["input_ids"]
        if len(p) + len(r) > max_len:
            if truncation == "error":
                problems.add(f"{ex.where or 'example'} ({len(p)} + {len(r)} tokens)", f"longer than max_len={max_len}",
                             "raise --max_len, shorten the row, or use --truncation prompt")
                continue
            r_keep = min(len(r), max_len - min(len(p), max_len // 4))
            out.report["responses_cut"] += r_keep < len(r)
            out.report["prompts_cut"] += (max_len - r_keep) < len(p)
            r = r[:r_keep]
            p = p[len(p) - (max_len - r_keep):] if max_len - r_keep > 0 else []
        out.input_ids.append(p + r)
        out.labels.append([IGNORE] * len(p) + r)
    problems.raise_if_any()
    out.report["examples"] = len(out.input_ids)
    return out


def split(examples: list, val_fraction: float, seed: int) -> tuple[list, list]:
    """A deterministic held-out split (the same seed gives the same split)."""
    if not val_fraction:
        return list(examples), []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(len(examples) * val_fraction))
    return [examples[i] for i in sorted(order[n_val:])], [examples[i] for i in sorted(order[:n_val])]


def pack(prep: Prepared, max_len: int) -> Prepared:
    """Concatenate examples into rows of at most max_len tokens (greedy, in order; an
    example never straddles two rows). Attention is not blocked between examples in a row."""
    out = Prepared([], [], dict(prep.report))
    ids, labels = [], []
    for i, l in zip(prep.input_ids, prep.labels):
        if ids and len(ids) + len(i) > max_len:
            out.input_ids.append(ids), out.labels.append(labels)
            ids, labels = [], []
        ids, labels = ids + i, labels + l
    if ids:
        out.input_ids.append(ids), out.labels.append(labels)
    return out


def pad_id(tokenizer) -> int:
    """The token that pads a batch: the tokenizer's pad token, else its EOS (labels mask it out)."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate(rows_ids: list[list[int]], rows_labels: list[list[int]], pad_id: int, side: str = "right") -> dict:
    """Pad to the longest row: input_ids, attention_mask, labels (IGNORE on padding)."""
    T = max(len(r) for r in rows_ids)
    ids = torch.full((len(rows_ids), T), pad_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(rows_ids), T), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows_ids), T), dtype=torch.long)
    for k, (i, l) in enumerate(zip(rows_ids, rows_labels)):
        s = slice(0, len(i)) if side == "right" else slice(T - len(i), T)
        ids[k, s], labels[k, s], mask[k, s] = torch.tensor(i), torch.tensor(l), 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order of examples in one epoch: a permutation seeded by (seed, epoch)."""
    if not shuffle:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).tolist()
