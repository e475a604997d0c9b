"""`slimtune export`: an adapter in the form another tool serves.

- `peft-lora`: the plain-LoRA equivalent of any low-rank adapter (LoRA, VeRA, every Tied-LoRA
  configuration) in PEFT's format: exact, at the same rank, for PEFT, vLLM and other LoRA servers;
- `peft`: the adapter itself in PEFT's format (LoRA, VeRA, (IA)³);
- `merged`: a standalone transformers model directory (safetensors) with the adapter folded
  in, which plain `AutoModelForCausalLM.from_pretrained` loads.
"""

from __future__ import annotations

from pathlib import Path

from ..adapters.gist import gist_tokens
from ..adapters.helpers import merge_and_unload
from ..adapters.inject import get_config
from ..configs import out_directory
from ..errors import Problems
from ..adapters.inject import add_adapter
from ..adapters.pesc import PESCConfig
from ..formats.adapter import export_peft_lora, load_adapter, save_adapter
from ..formats.peft import peft_type
from ..formats.upcycled import export_upcycled
from ..models.load import load_model, load_tokenizer

FORMATS = ("peft-lora", "peft", "merged")


def _out_dir(out: str) -> Path:
    p = Problems("cannot export")
    out_directory(p, "out", out, "give a directory to write into")
    p.raise_if_any()
    return Path(out)


def run_upcycle(model_name: str, adapter: str | None, out: str, cfg: PESCConfig) -> Path:
    """The dense model upcycled with PESC (a trained adapter, or a fresh one: the dense model at
    step 0), its LoRA merged, as a standalone transformers directory."""
    target = _out_dir(out)
    model = load_model(model_name)
    model = load_adapter(model, adapter) if adapter else add_adapter(model, cfg)
    try:
        tokenizer = load_tokenizer(model_name)
    except (OSError, ValueError):
        tokenizer = None  # a model directory without a tokenizer
    return export_upcycled(model, target, tokenizer)


def run_export(model_name: str, adapter: str, out: str, fmt: str) -> Path:
    target = _out_dir(out)
    p = Problems("cannot export")
    if fmt not in FORMATS:
        p.add(f"format={fmt!r}", "not an export format", f"use one of {list(FORMATS)}")
    p.raise_if_any()
    try:
        tokenizer = load_tokenizer(model_name)
    except (OSError, ValueError):
        tokenizer = None  # a model directory without a tokenizer
    # always the full-precision base: merging needs it
    model = load_adapter(load_model(model_name), adapter, tokenizer=tokenizer)
    if gist_tokens(model) is not None and fmt != "merged":
        p.add(f"format={fmt!r} for an adapter with gist tokens", "PEFT's formats have no trained embedding row",
              "export --format merged (the gist row is written into the embedding; the tokenizer gets <GIST>)")
        p.raise_if_any()
    if fmt == "peft-lora":
        return export_peft_lora(model, target)
    if fmt == "peft":
        cfg = get_config(model)
        if peft_type(cfg) is None:
            p.add(f"method {cfg.preset!r}", "PEFT has no adapter type that expresses it",
                  "export --format peft-lora (its exact LoRA equivalent) or --format merged")
            p.raise_if_any()
        return save_adapter(model, target)
    merge_and_unload(model).save_pretrained(target, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(target)
    return target
