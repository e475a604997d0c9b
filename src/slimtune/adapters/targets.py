"""Which layers an adapter goes on: module-name patterns and named groups of them.

A pattern matches a module whose dotted name equals it, ends with "." + it, or matches it as
a glob (`*.mlp.*`). Some names stand for groups the architecture decides:
- `all-linear`: every nn.Linear / transformers Conv1D except the LM head, as in PEFT;
- `attention-input`: the attention's input projections (q, k, v; GPT-2's fused c_attn);
- `attention`: every projection of the attention (q, k, v and the output);
- `ffn`: the feed-forward block's projections (gate, up and down; GPT-2's c_fc and c_proj).
"""

from __future__ import annotations

import fnmatch

from torch import nn

from ..errors import Problems
from ..models.layers import adaptable_layers, kind

ALL_LINEAR = "all-linear"
_LLAMA = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2")
GROUPS: dict[str, dict[str, list[str]]] = {  # group -> model_type -> patterns
    "attention-input": {**dict.fromkeys(_LLAMA, ["q_proj", "k_proj", "v_proj"]), "gpt2": ["attn.c_attn"],
                        "t5": ["q", "k", "v"]},
    "attention": {**dict.fromkeys(_LLAMA, ["q_proj", "k_proj", "v_proj", "o_proj"]),
                  "gpt2": ["attn.c_attn", "attn.c_proj"], "t5": ["q", "k", "v", "o"]},
    "ffn": {**dict.fromkeys(_LLAMA, ["gate_proj", "up_proj", "down_proj"]), "gpt2": ["mlp.c_fc", "mlp.c_proj"],
            "t5": ["wi", "wi_0", "wi_1", "wo"]},
}
FFN_BLOCKS = {**dict.fromkeys(_LLAMA, "mlp"), "gpt2": "mlp", "t5": "DenseReluDense"}  # the FFN module's name


def model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def pattern_matches(pattern: str, name: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def match_targets(model: nn.Module, patterns: list[str], what: str = "targets") -> list[str]:
    """Names of the layers the patterns select; a pattern that selects nothing is an error."""
    layers = adaptable_layers(model)
    problems = Problems(f"invalid {what}")
    if not layers:
        problems.add(f"model {type(model).__name__}", "it has no nn.Linear or Conv1D layers", "use a transformer LM")
        problems.raise_if_any()
    chosen: dict[str, None] = {}
    leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
    for pat in patterns:
        if pat in GROUPS:
            sub = GROUPS[pat].get(model_type(model) or "")
            if sub is None:
                problems.add(f"{what} pattern {pat!r}", f"slimtune does not know the {pat} layers of "
                             f"model_type {model_type(model)!r}", f"name them, e.g. {leaves}")
                continue
            hits = [n for n in layers if any(pattern_matches(s, n) for s in sub)]
        else:
            hits = list(layers) if pat == ALL_LINEAR else [n for n in layers if pattern_matches(pat, n)]
        if not hits:
            problems.add(f"{what} pattern {pat!r}", f"it matches no linear layer of {type(model).__name__}",
                         f"use '{ALL_LINEAR}', one of the layer names {leaves}, or a glob such as "
                         f"'{kind(next(iter(layers))).replace('*', '[0-3]')}'")
        chosen.update(dict.fromkeys(hits))
    problems.raise_if_any()
    return list(chosen)
