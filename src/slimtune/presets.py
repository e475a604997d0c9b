"""The methods as data: each preset is a LowRankConfig (or IA3Config) with its parts set.

Tied-LoRA names a configuration by the letters of `v B u A` (Renduchintala et al., NAACL
2024): v is our `b` (out-vector), u is our `d` (r-vector). We accept the names we can
establish from the paper: vBuA / TL6 (tied A, B trained; u, v per layer, trained) and
TL5 (tied A, B trained; u, v frozen at 1, i.e. absent). Any other combination is data.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from .config import INITS, MODES, AdapterConfig, IA3Config, LowRankConfig, Part
from .errors import Problems, did_you_mean


def lora(r: int = 8, alpha: float = 16.0) -> LowRankConfig:
    """LoRA (Hu et al., 2021): A Kaiming-uniform, B = 0, s = alpha / r."""
    return LowRankConfig(preset="lora", r=r, alpha=alpha)


def vera(r: int = 256, d_initial: float = 0.1) -> LowRankConfig:
    """VeRA (Kopiczko et al., ICLR 2024): one frozen random pair for the model, sliced; d = 0.1, b = 0."""
    shared = dict(mode="random", init="he_uniform", share="model")
    return LowRankConfig(preset="vera", r=r, alpha=None, A=Part(**shared), B=Part(**shared),
                         d=Part("trained", d_initial), b=Part("trained", "zeros"))


def tied_lora(r: int = 8) -> LowRankConfig:
    """Tied-LoRA vBuA (TL6): A, B tied per module kind and trained; u, v per layer, trained, init 1."""
    return LowRankConfig(preset="tied-lora", r=r, alpha=None,
                         A=Part("tied", "kaiming_uniform"), B=Part("tied", "zeros"),
                         d=Part("trained", "ones"), b=Part("trained", "ones"))


def tied_lora_ba(r: int = 8) -> LowRankConfig:
    """Tied-LoRA TL5: A, B tied per module kind and trained; u, v frozen at 1 (absent)."""
    return LowRankConfig(preset="tied-lora-ba", r=r, alpha=None,
                         A=Part("tied", "kaiming_uniform"), B=Part("tied", "zeros"))


def ia3() -> IA3Config:
    """(IA)^3 (Liu et al., 2022): vectors on k, v outputs and the FFN intermediate, init 1."""
    return IA3Config()


PRESETS: dict[str, Callable[..., AdapterConfig]] = {
    "lora": lora, "vera": vera, "tied-lora": tied_lora, "tied-lora-ba": tied_lora_ba, "ia3": ia3,
}
ALIASES = {"vbua": "tied-lora", "tl6": "tied-lora", "tl5": "tied-lora-ba"}


def preset(name: str, **overrides: Any) -> AdapterConfig:
    """A preset by name (or a Tied-LoRA paper name), with field overrides (`r=`, `targets=`...)."""
    key = ALIASES.get(name.lower(), name.lower())
    if key not in PRESETS:
        names = list(PRESETS) + list(ALIASES)
        p = Problems("unknown method")
        p.add(f"method={name!r}", "no such preset" + did_you_mean(name.lower(), names), f"use one of {names}")
        p.raise_if_any()
    cfg = PRESETS[key]()
    r = overrides.pop("r", None)
    if r is not None and isinstance(cfg, LowRankConfig):
        cfg = PRESETS[key](r=r) if key != "lora" else lora(r=r, alpha=cfg.alpha)
    elif r is not None:
        overrides["r"] = r  # let validation below name it
    fields = {f.name for f in dataclasses.fields(cfg)}
    p = Problems(f"invalid options for method {name!r}")
    for k in overrides:
        if k not in fields:
            p.add(f"{k}={overrides[k]!r}", f"{type(cfg).__name__} has no field {k!r}{did_you_mean(k, fields)}",
                  f"use one of {sorted(fields)}")
    p.raise_if_any()
    cfg = dataclasses.replace(cfg, **overrides)
    validate(cfg)
    return cfg


def merge_overrides(base: dict, over: dict) -> dict:
    """`base` with `over`'s keys on top; nested mappings (A: {mode: ...}) merge key by key."""
    return {**base, **{k: merge_overrides(base[k], v) if isinstance(v, dict) and isinstance(base.get(k), dict) else v
                       for k, v in over.items()}}


def preset_config(method: str, overrides: dict) -> AdapterConfig:
    """The preset `method` with nested overrides given as plain data (flags, a YAML section),
    validated. The rank goes first: presets derive other defaults from it."""
    from .config import config_from_dict, to_dict

    r = overrides.get("r") if isinstance(overrides.get("r"), int) else None
    return config_from_dict(merge_overrides(to_dict(preset(method, **({} if r is None else {"r": r}))), overrides))


def _is_zero(init: str | float) -> bool:
    return init == "zeros" or (not isinstance(init, str) and float(init) == 0.0)


def validate(cfg: AdapterConfig) -> None:
    """Check a config; all problems are reported together."""
    p = Problems(f"invalid {type(cfg).__name__} (preset {cfg.preset!r})")
    if isinstance(cfg, IA3Config):
        p.raise_if_any()
        return
    if cfg.r <= 0:
        p.add(f"r={cfg.r}", "the rank must be a positive integer", "use e.g. r=8")
    if not 0.0 <= cfg.dropout < 1.0:
        p.add(f"dropout={cfg.dropout}", "dropout is a probability in [0, 1)", "use e.g. 0.0 or 0.1")
    if not cfg.targets:
        p.add("targets=[]", "no module would be adapted", "use ['all-linear'] or module names")
    present = {}
    for name in "ABdb":
        part: Part = getattr(cfg, name)
        if part.mode not in MODES:
            p.add(f"{name}.mode={part.mode!r}", "unknown mode" + did_you_mean(part.mode, MODES), f"use one of {MODES}")
        if isinstance(part.init, str) and part.init not in INITS:
            p.add(f"{name}.init={part.init!r}", "unknown init" + did_you_mean(part.init, INITS),
                  f"use one of {INITS} or a number")
        if part.share not in ("kind", "model"):
            p.add(f"{name}.share={part.share!r}", "unknown sharing", "use 'kind' or 'model'")
        if part.mode != "absent":
            present[name] = part
    for name in "AB":
        if name not in present:
            p.add(f"{name}.mode='absent'", "A and B carry the rank; the formula needs both", "use trained/tied/random")
    zeros = [n for n, q in present.items() if _is_zero(q.init)]
    trained = [n for n, q in present.items() if q.mode in ("trained", "tied")]
    if not trained:
        p.add("all parts frozen", "nothing would train", "make at least one of A, B, d, b 'trained' or 'tied'")
    if len(zeros) == 0:
        p.add("no zero-initialised part", "delta W would not be 0 at step 0, so the model would not start as the base",
              "initialise exactly one trained part to zeros (LoRA: B, VeRA: b)")
    elif len(zeros) > 1:
        p.add(f"zero-initialised parts {zeros}", "with two zero factors every gradient of both vanishes: "
              "they never move", "initialise only one of them to zeros (e.g. B random, b = 0)")
    elif present[zeros[0]].mode not in ("trained", "tied"):
        p.add(f"{zeros[0]}.init=zeros with mode {present[zeros[0]].mode!r}", "a frozen zero keeps delta W = 0 forever",
              "train the zero-initialised part")
    p.raise_if_any()
