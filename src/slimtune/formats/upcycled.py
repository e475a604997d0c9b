"""A PESC-upcycled model as a standalone transformers directory.

    OUT/config.json                 the base config, plus `pesc` (the mixture's settings), under
                                    a model_type of its own ("slimtune_pesc") with an `auto_map`
                                    to the modelling code below
    OUT/model.safetensors           the base weights with the LoRA merged in, and each FFN
                                    block's router and adapters
    OUT/modeling_slimtune_pesc.py   the modelling code (formats/pesc_modeling.py, its base class
                                    written in): torch and transformers only

    AutoModelForCausalLM.from_pretrained(OUT, trust_remote_code=True)

transformers runs the directory's own code only when asked to (`trust_remote_code=True`); the
code is the small file above, which subclasses the base's transformers classes and can be read
before it is run. Without the flag, the unknown model_type makes transformers refuse the
directory (rather than load the dense base with its FFN weights left random).
"""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path

from torch import nn

from ..adapters.helpers import fold_mergeable
from ..adapters.inject import adapter_set, get_config, sites
from ..adapters.pesc import PESCBlock, PESCConfig, ffn_blocks
from ..errors import Problems

MODULE = "modeling_slimtune_pesc"
TEMPLATE = Path(__file__).with_name("pesc_modeling.py")


def _modeling_code(base_class: str) -> str:
    text = TEMPLATE.read_text()
    return text.replace('BASE_CLASS = "LlamaForCausalLM"', f"BASE_CLASS = {base_class!r}")


def export_upcycled(model: nn.Module, directory, tokenizer=None) -> Path:
    """Write the model with its active PESC adapter (LoRA merged) as a standalone directory."""
    cfg = get_config(model)
    if not isinstance(cfg, PESCConfig):
        p = Problems("cannot export an upcycled model")
        p.add(f"adapter {getattr(cfg, 'preset', None)!r}", "it is not a PESC adapter", "train with --method pesc")
        p.raise_if_any()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    work = fold_mergeable(copy.deepcopy(model))  # LoRA into the weights; the mixtures stay
    name = adapter_set(work).state.active
    hidden = next(s for _, s in sites(work) if isinstance(s, PESCBlock)).W_r.shape[1]
    block = next(iter(ffn_blocks(work, cfg.block))).rsplit(".", 1)[-1]
    base_class = type(work).__name__
    (out / f"{MODULE}.py").write_text(_modeling_code(base_class))
    spec = importlib.util.spec_from_file_location(MODULE, out / f"{MODULE}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    settings = {k: v for k, v in work.config.to_dict().items() if k != "model_type"}
    config = module.PESCConfig.from_dict(settings)  # the base's config, as model_type "slimtune_pesc"
    config.pesc = {"experts": cfg.experts, "top_k": cfg.top_k, "renormalize": cfg.renormalize, "width": cfg.width,
                   "scale": cfg.scale, "hidden": hidden, "block": block, "base_architecture": base_class}
    config.architectures = ["PESCForCausalLM"]
    config.auto_map = {"AutoConfig": f"{MODULE}.PESCConfig", "AutoModelForCausalLM": f"{MODULE}.PESCForCausalLM"}
    standalone = module.PESCForCausalLM(config)
    ours = {}
    for key, tensor in work.state_dict().items():  # host.base.* -> block.base.*, host.adapters.NAME.* -> block.*
        if key.startswith("slimtune_adapters."):
            continue
        ours[key.replace(f".adapters.{name}.", ".")] = tensor
    missing, unexpected = standalone.load_state_dict(ours, strict=False)
    if missing or unexpected:
        raise RuntimeError(f"upcycled export: keys do not match ({missing[:3]} missing, {unexpected[:3]} unexpected)")
    standalone.save_pretrained(out, safe_serialization=True)
    saved = json.loads((out / "config.json").read_text())
    saved["auto_map"] = config.auto_map  # save_pretrained keeps it only for registered classes
    (out / "config.json").write_text(json.dumps(saved, indent=2) + "\n")
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
