"""Hugging Face PEFT's adapter format: LoRA, VeRA and (IA)³, both ways, and the plain-LoRA
equivalent of any low-rank adapter.

A PEFT adapter directory is `adapter_config.json` (`peft_type` and the method's options) and
`adapter_model.safetensors` with keys under `base_model.model.`:

    LORA   {module}.lora_A.weight (r, in)    {module}.lora_B.weight (out, r)    s = lora_alpha / r
    VERA   {module}.vera_lambda_d (r,)       {module}.vera_lambda_b (out,)       base_model.vera_A,
           base_model.vera_B (only with save_projection; else regenerated from projection_prng_key)
    IA3    {module}.ia3_l: (out, 1) on an output site, (1, in) on a feed-forward (input) site

slimtune's own keys are the module's name and the part (`{module}.A`, `slimtune_shared.A__model`,
helpers.py); this file only renames and reshapes between the two. Which slimtune configs PEFT
can express is decided here (`peft_type`); the others stay in slimtune's format.
"""

from __future__ import annotations

import math
import re

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..adapters.helpers import SHARED_PREFIX
from ..adapters.ia3 import IA3Config, ia3_sites
from ..adapters.inject import sites
from ..adapters.lowrank import LowRankConfig, Part
from ..adapters.registry import AdapterConfig
from ..errors import Problems
from ..models.layers import adaptable_layers

PREFIX = "base_model.model."
SUPPORTED = ("LORA", "VERA", "IA3")


def _is(part: Part, mode: str, share: str | None = None, init=None) -> bool:
    return part.mode == mode and (share is None or part.share == share) and (init is None or part.init == init)


def peft_type(cfg: AdapterConfig) -> str | None:
    """The PEFT type that expresses cfg exactly, or None."""
    if isinstance(cfg, IA3Config):
        return "IA3"
    if not isinstance(cfg, LowRankConfig):
        return None
    if _is(cfg.A, "trained") and _is(cfg.B, "trained") and _is(cfg.d, "absent") and _is(cfg.b, "absent"):
        return "LORA"
    random = dict(mode="random", share="model", init="he_uniform")
    if (_is(cfg.A, **random) and _is(cfg.B, **random) and _is(cfg.d, "trained") and _is(cfg.b, "trained")
            and cfg.alpha is None):
        return "VERA"
    return None


def target_list(model: nn.Module, names: list[str]) -> list[str]:
    """The modules as PEFT's target_modules: their last names where those select exactly these
    modules (PEFT matches a name or a '.'-suffix; LoRA servers read these), else full names."""
    layers = adaptable_layers(model)
    leaves = sorted({n.rsplit(".", 1)[-1] for n in names})
    chosen = {n for n in layers if any(n == t or n.endswith("." + t) for t in leaves)}
    return leaves if chosen == set(names) else sorted(names)


def _common(model: nn.Module, names: list[str]) -> dict:
    conv = any(isinstance(m, Conv1D) for n, m in adaptable_layers(model).items() if n in names)
    return {"base_model_name_or_path": getattr(model.config, "_name_or_path", None) or None,
            "task_type": "SEQ_2_SEQ_LM" if model.config.is_encoder_decoder else "CAUSAL_LM",
            "inference_mode": True, "bias": "none", "fan_in_fan_out": conv, "modules_to_save": None,
            "layers_to_transform": None, "layers_pattern": None, "revision": None,
            "target_modules": target_list(model, names)}


def to_peft(model: nn.Module, cfg: AdapterConfig, tensors: dict[str, torch.Tensor], name: str | None = None):
    """(PEFT config, PEFT tensors) of the adapter whose slimtune tensors are given, or None
    where PEFT cannot express it."""
    kind = peft_type(cfg)
    if kind is None:
        return None
    layers = dict(sites(model, name))
    out: dict[str, torch.Tensor] = {}
    if kind == "LORA":
        for module in layers:
            out[f"{PREFIX}{module}.lora_A.weight"] = tensors[f"{module}.A"]
            out[f"{PREFIX}{module}.lora_B.weight"] = tensors[f"{module}.B"]
        alpha = cfg.r if cfg.alpha is None else cfg.alpha
        conf = {"peft_type": "LORA", "r": cfg.r, "lora_alpha": alpha, "use_rslora": cfg.rslora and cfg.alpha is not None,
                "lora_dropout": cfg.dropout, "use_dora": False, "init_lora_weights": True, "rank_pattern": {},
                "alpha_pattern": {}}
    elif kind == "VERA":
        for module in layers:
            out[f"{PREFIX}{module}.vera_lambda_d"] = tensors[f"{module}.d"]
            out[f"{PREFIX}{module}.vera_lambda_b"] = tensors[f"{module}.b"]
        if cfg.save_frozen:
            out["base_model.vera_A"] = tensors[f"{SHARED_PREFIX}.A__model"]
            out["base_model.vera_B"] = tensors[f"{SHARED_PREFIX}.B__model"]
        conf = {"peft_type": "VERA", "r": cfg.r, "projection_prng_key": cfg.seed, "save_projection": cfg.save_frozen,
                "vera_dropout": cfg.dropout, "d_initial": 0.1, "init_weights": True}
    else:
        for module, site in layers.items():
            l = tensors[f"{module}.l"]
            n = site.out_features if site.where == "output" else site.in_features
            full = torch.cat([l.new_ones(site.start), l, l.new_ones(n - site.stop)])  # a span padded with ones
            out[f"{PREFIX}{module}.ia3_l"] = full[:, None] if site.where == "output" else full[None, :]
        inputs = [m for m, s in layers.items() if s.where == "input"]
        conf = {"peft_type": "IA3", "feedforward_modules": target_list(model, inputs) if inputs else [],
                "init_ia3_weights": True}
    return {**_common(model, list(layers)), **conf}, out


def lora_equivalent(model: nn.Module, cfg: AdapterConfig, name: str | None = None):
    """(PEFT LoRA config, tensors) equal to any low-rank adapter: at the same rank,
    A_l = Λ_d A and B_l = s · Λ_b B per layer, with lora_alpha = r so that PEFT's scale is 1."""
    if not isinstance(cfg, LowRankConfig):
        p = Problems("no LoRA equivalent")
        p.add(f"method {cfg.preset!r} ({cfg.method})", "it is not a low-rank adapter: its change to a layer is "
              "not B A", "export it in slimtune's or PEFT's own format (save_adapter), or as a merged model")
        p.raise_if_any()
    out = {}
    with torch.no_grad():
        for module, site in sites(model, name):
            A, B, d, b = (None if t is None else t.detach().float() for t in site.parts())
            # each layer's own copy: tied parts must not share memory in the file
            out[f"{PREFIX}{module}.lora_A.weight"] = (A if d is None else d[:, None] * A).clone(
                memory_format=torch.contiguous_format)
            out[f"{PREFIX}{module}.lora_B.weight"] = (site.scale * (B if b is None else b[:, None] * B)).contiguous()
    names = [m for m, _ in sites(model, name)]
    conf = {"peft_type": "LORA", "r": cfg.r, "lora_alpha": cfg.r, "use_rslora": False, "lora_dropout": 0.0,
            "use_dora": False, "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}}
    return {**_common(model, names), **conf}, out


def _matches(model: nn.Module, targets, what: str, p: Problems) -> list[str]:
    """The modules PEFT's target_modules (a list of names or suffixes, a regex, or all-linear) select."""
    layers = adaptable_layers(model)
    if targets == "all-linear":
        return list(layers)
    if isinstance(targets, str):
        return [n for n in layers if re.fullmatch(targets, n)]
    if isinstance(targets, list) and all(isinstance(t, str) for t in targets):
        return [n for n in layers if any(n == t or n.endswith("." + t) for t in targets)]
    p.add(f"{what}={targets!r}", "not a list of module names, a regex or 'all-linear'", "fix adapter_config.json")
    return []


UNSUPPORTED = {  # PEFT options slimtune does not implement: (key, value that is fine)
    "LORA": [("exclude_modules", None), ("use_dora", False), ("bias", "none"), ("lora_bias", False), ("modules_to_save", None),
             ("layers_to_transform", None), ("layer_replication", None), ("target_parameters", None),
             ("trainable_token_indices", None), ("rank_pattern", {}), ("alpha_pattern", {}), ("use_qalora", False),
             ("alora_invocation_tokens", None)],
    "VERA": [("exclude_modules", None), ("bias", "none"), ("modules_to_save", None), ("layers_to_transform", None)],
    "IA3": [("modules_to_save", None), ("exclude_modules", None)],
}


def _non_finite(data, where: str = "") -> list[tuple[str, float]]:
    """(key, value) of every NaN or infinity in a JSON document (json.loads accepts them)."""
    if isinstance(data, float):
        return [] if math.isfinite(data) else [(where, data)]
    items = data.items() if isinstance(data, dict) else enumerate(data) if isinstance(data, list) else ()
    return [hit for k, v in items for hit in _non_finite(v, f"{where}.{k}" if where else str(k))]


def from_peft(model: nn.Module, conf: dict, tensors: dict[str, torch.Tensor], where: str):
    """(slimtune config, slimtune tensors) of a PEFT adapter read from `where`."""
    kind = conf.get("peft_type")
    p = Problems(f"cannot load the PEFT adapter {where!r}")
    if kind not in SUPPORTED:
        p.add(f"peft_type={kind!r}", f"slimtune reads PEFT's {list(SUPPORTED)} adapters",
              "load this adapter with peft.PeftModel.from_pretrained")
        p.raise_if_any()
    for key, value in _non_finite(conf):
        p.add(f"{key}={value!r} in {where}/adapter_config.json", "not a finite number",
              "restore the file from whatever wrote it")
    for key in ("target_modules",) + (("r",) if kind != "IA3" else ()):
        if key not in conf:
            p.add(f"{where}/adapter_config.json", f"a PEFT {kind} config without {key!r}", "restore the file")
    if kind != "IA3" and "r" in conf and not (isinstance(conf["r"], int) and conf["r"] > 0):
        p.add(f"r={conf['r']!r}", "the rank must be a positive integer", "restore the file")
    p.raise_if_any()
    for key, fine in UNSUPPORTED[kind]:
        if conf.get(key, fine) not in (fine, None, {}, [], False):
            p.add(f"{key}={conf.get(key)!r}", f"slimtune does not implement this {kind} option",
                  "load this adapter with peft.PeftModel.from_pretrained")
    names = _matches(model, conf.get("target_modules"), "target_modules", p)
    if not names and not p.items:
        p.add(f"target_modules={conf.get('target_modules')!r}", f"it selects no linear layer of {type(model).__name__}",
              "load the base model the adapter was trained on")
    p.raise_if_any()
    ours: dict[str, torch.Tensor] = {}
    rest = {k[len(PREFIX):] if k.startswith(PREFIX) else k: v for k, v in tensors.items()}
    if kind == "LORA":
        cfg = LowRankConfig(preset="lora", r=int(conf["r"]), alpha=float(conf.get("lora_alpha", 8)),
                            rslora=bool(conf.get("use_rslora", False)), targets=names,
                            dropout=float(conf.get("lora_dropout", 0.0)))
        renames = {".lora_A.weight": ".A", ".lora_B.weight": ".B"}
    elif kind == "VERA":
        save = bool(conf.get("save_projection", True))
        cfg = LowRankConfig(preset="vera", r=int(conf["r"]), alpha=None, targets=names, save_frozen=save,
                            seed=int(conf.get("projection_prng_key", 0)), dropout=float(conf.get("vera_dropout", 0.0)),
                            A=Part("random", "he_uniform", "model"), B=Part("random", "he_uniform", "model"),
                            d=Part("trained", float(conf.get("d_initial", 0.1))), b=Part("trained", "zeros"))
        renames = {".vera_lambda_d": ".d", ".vera_lambda_b": ".b"}
        for theirs, mine in (("base_model.vera_A", "A__model"), ("base_model.vera_B", "B__model")):
            if theirs in tensors:
                ours[f"{SHARED_PREFIX}.{mine}"] = tensors[theirs]
                rest.pop(theirs, None)
    else:
        ff = set(_matches(model, conf.get("feedforward_modules") or [], "feedforward_modules", p))
        p.raise_if_any()
        cfg = IA3Config(scale_outputs=[n for n in names if n not in ff], scale_inputs=[n for n in names if n in ff])
        renames = {".ia3_l": ".l"}
    for key, t in rest.items():
        for theirs, mine in renames.items():
            if key.endswith(theirs):
                ours[key[: -len(theirs)] + mine] = t.flatten() if mine == ".l" else t
                break
        else:
            p.add(f"tensor {key!r}", f"not a tensor of a PEFT {kind} adapter", "restore the adapter's files")
    p.raise_if_any()
    return cfg, ours


def fit_spans(model: nn.Module, cfg: AdapterConfig, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """(IA)³ vectors read from PEFT's full-width ones, cut to the sites' spans under cfg (GPT-2's
    fused c_attn scales only its k and v thirds; PEFT's vector holds ones on the q third)."""
    if not isinstance(cfg, IA3Config):
        return tensors
    out = dict(tensors)
    for module, where, (lo, hi) in ia3_sites(model, cfg.scale_outputs, cfg.scale_inputs):
        t = out.get(f"{module}.l")
        if t is not None and where == "output" and (lo, hi) != (0.0, 1.0):
            out[f"{module}.l"] = t[round(lo * t.numel()): round(hi * t.numel())]
    return out
