"""Saving and loading adapters: `adapter_config.json` + `adapter_model.safetensors`.

`save_adapter` writes what PEFT can express (LoRA, VeRA, (IA)³) in PEFT's format, which
`peft.PeftModel.from_pretrained` loads, and everything else (Tied-LoRA, other low-rank
configurations, methods PEFT lacks) in slimtune's own format: the same two files, the config
under `"format": "slimtune-adapter"` and the tensors under slimtune's keys. Either way the
safetensors header carries slimtune's metadata (its exact config and a fingerprint of the base:
architecture and the shape of every adapted layer), where PEFT does not look.

`load_adapter` reads both formats, PEFT adapters written by PEFT included, and adapters saved
by earlier slimtune versions. It checks everything before it touches the model, and a load
that fails leaves the model as it was. Frozen random tensors are regenerated from the saved
seed unless the config says `save_frozen`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn

from ..adapters.gist import add_gist_tokens, gist_tokens
from ..adapters.helpers import frozen_adapter_tensors, trainable_parameters
from ..adapters.inject import (DEFAULT_NAME, adapter_set, add_adapter, delete_adapter, get_config,
                               share_frozen, sites)
from ..adapters.registry import AdapterConfig, config_from_dict
from ..configs import out_directory, to_dict
from ..errors import Problems
from ..models.gist import GistTokens, add_gist_token
from ..models.layers import adaptable_layers, dims
from ..version import __version__
from . import peft as P
from .sharding import shard_like
from .files import read_json, read_tensors, refuse_non_finite, write_json, write_tensors

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "slimtune-adapter"
META_KEY = "slimtune"  # safetensors header key of slimtune's metadata


def adapter_state_dict(model: nn.Module, name: str | None = None) -> dict[str, torch.Tensor]:
    """The tensors saved for the adapter (the active one): trained, and frozen if save_frozen."""
    tensors = dict(trainable_parameters(model, name))
    if getattr(get_config(model, name), "save_frozen", False):
        tensors.update(frozen_adapter_tensors(model, name))
    return tensors


def fingerprint(model: nn.Module, name: str | None = None) -> dict:
    return {"architecture": type(model).__name__,
            "model_type": getattr(model.config, "model_type", None),
            "name_or_path": getattr(model.config, "_name_or_path", None) or None,
            "layers": {n: list(dims(site)) if hasattr(site, "in_features") else None for n, site in sites(model, name)}}


def _nothing_to_save(model: nn.Module) -> None:
    p = Problems("nothing to save")
    p.add(f"model {type(model).__name__}", "it carries no (active) adapter",
          "call slimtune.add_adapter(model, config) first, or name the adapter")
    p.raise_if_any()


def save_adapter(model: nn.Module, directory: str | os.PathLike, name: str | None = None,
                 tensors: dict | None = None) -> Path:
    """Write the adapter (the active one, or `name`) to `directory`, created if needed: PEFT's
    format where PEFT can express it, else slimtune's. `tensors`: its state dict already
    gathered (FSDP2: see formats/sharding.full_tensors); default: read from the model."""
    cfg = get_config(model, name)
    if cfg is None:
        _nothing_to_save(model)
    tensors = adapter_state_dict(model, name) if tensors is None else tensors
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    refuse_non_finite(tensors, "saving the adapter")
    meta = {"format": FORMAT, "slimtune_version": __version__, "config": to_dict(cfg),
            "base_model": fingerprint(model, name)}
    gist = gist_tokens(model, name)
    if gist is not None:
        meta["gist"] = gist.to_dict()
    out = Path(directory)
    p = Problems("cannot save the adapter")
    out_directory(p, "directory", directory)
    p.raise_if_any()
    out.mkdir(parents=True, exist_ok=True)
    peft = None if gist is not None else P.to_peft(model, cfg, tensors, name)  # PEFT has no gist rows
    if peft is None:
        conf, weights = meta, tensors
    else:
        conf, weights = peft[0], {k: v.contiguous() for k, v in peft[1].items()}
        conf["peft_version"] = _peft_version()
    write_tensors(out / WEIGHTS_NAME, weights, {META_KEY: json.dumps(meta, allow_nan=False)})
    write_json(out / CONFIG_NAME, conf)
    return out


def _peft_version() -> str:
    try:
        from importlib.metadata import version

        return version("peft")
    except Exception:  # PEFT need not be installed to write its format
        return "0.17.0"


def read_adapter(directory: str | os.PathLike, model: nn.Module) -> tuple[AdapterConfig, dict, dict | None]:
    """(config, tensors under slimtune's keys, base fingerprint or None) of a saved adapter, in
    either format, every file checked, the fingerprint against the model too; the model is
    only read."""
    d = Path(directory)
    p = Problems(f"cannot load adapter from {str(d)!r}")
    if not d.is_dir():
        p.add(str(d), "not a directory" if d.exists() else "no such directory",
              f"point at a directory written by save_adapter (it holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    else:
        for file in (CONFIG_NAME, WEIGHTS_NAME):
            if not (d / file).is_file():
                p.add(str(d / file), "the file does not exist", f"point at a directory written by save_adapter "
                      f"(it holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    p.raise_if_any()
    conf = read_json(d / CONFIG_NAME, "the adapter's config")
    tensors, header = read_tensors(d / WEIGHTS_NAME, "the adapter's weights")
    meta = _meta(header, d)
    check_fits(model, (meta or conf).get("base_model"), str(d))
    if "peft_type" in conf:
        cfg, tensors = P.from_peft(model, conf, tensors, str(d))
        if meta is not None:  # written by slimtune: its exact config
            cfg = config_from_dict(meta["config"])
            tensors = P.fit_spans(model, cfg, tensors)
        return cfg, tensors, None if meta is None else meta.get("base_model")
    if conf.get("format") != FORMAT:
        p.add(f"{d / CONFIG_NAME} (format={conf.get('format')!r})", "neither slimtune's adapter format nor PEFT's "
              "(no 'peft_type')", "point at a directory written by slimtune.save_adapter or by PEFT")
        p.raise_if_any()
    if not isinstance(conf.get("config"), dict):
        p.add(f"{d / CONFIG_NAME}", "it has no 'config' section (the adapter's settings)",
              "restore the file, or save the adapter again")
        p.raise_if_any()
    return config_from_dict(conf["config"]), tensors, conf.get("base_model")


def _meta(header: dict, d: Path) -> dict | None:
    if META_KEY not in header:
        return None
    try:
        meta = json.loads(header[META_KEY])
    except json.JSONDecodeError:
        return None  # damaged metadata: the PEFT config alone describes the adapter
    return meta if isinstance(meta, dict) and isinstance(meta.get("config"), dict) else None


def check_fits(model: nn.Module, saved: dict | None, where: str) -> None:
    """The model is the base the adapter was trained on, as far as the fingerprint tells."""
    if not saved:
        return
    p = Problems(f"adapter {where!r} does not fit {type(model).__name__}")
    if saved.get("architecture") not in (None, type(model).__name__):
        p.add(f"architecture {saved.get('architecture')!r}", f"the adapter was trained on another architecture "
              f"than this model's {type(model).__name__!r}", f"load base model {saved.get('name_or_path')!r}")
    have = {n: list(dims(m)) for n, m in adaptable_layers(model).items()}
    for layer, shape in (saved.get("layers") or {}).items():
        if shape is None:
            continue
        if layer not in have:
            p.add(f"layer {layer!r}", "the model has no such linear layer", "load the base model it was trained on")
        elif have[layer] != shape:
            p.add(f"layer {layer!r} (in, out)={tuple(shape)}", f"this model's is {tuple(have[layer])}",
                  f"load the base model it was trained on ({saved.get('name_or_path')!r})")
        if len(p.items) >= 8:
            break
    p.raise_if_any()


def copy_into_adapter(model: nn.Module, tensors: dict[str, torch.Tensor], where: str, name: str | None) -> None:
    p = Problems(f"adapter {where!r} does not fit this model's adapter")
    expected = adapter_state_dict(model, name)
    frozen = frozen_adapter_tensors(model, name)
    for k in sorted(set(expected) - set(tensors)):
        p.add(f"tensor {k!r}", "missing from the saved file", "re-save the adapter; the file is incomplete")
    for k in sorted(set(tensors) - set(expected) - set(frozen)):
        p.add(f"tensor {k!r}", "in the file but not in this adapter", "the config and the weights disagree; re-save")
    target = {**frozen, **expected}
    for k in sorted(set(tensors) & set(target)):
        if tensors[k].shape != target[k].shape:
            p.add(f"tensor {k!r} of shape {tuple(tensors[k].shape)}", f"expected {tuple(target[k].shape)}",
                  "re-save the adapter, or load it onto the base model it was trained on")
    p.raise_if_any()
    with torch.no_grad():
        for k in sorted(set(tensors) & set(target)):  # sorted: under FSDP2 every rank scatters in the same order
            target[k].copy_(shard_like(tensors[k].to(target[k].dtype), target[k]))
    aset = adapter_set(model)
    if aset is not None:
        aset.state.version += 1  # mixed batches restack the new values


def saved_gist(directory: str | os.PathLike) -> GistTokens | None:
    """The gist settings an adapter was saved with (adapters/gist.py), or None."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        return None
    _, header = read_tensors(path, "the adapter's weights")
    meta = _meta(header, Path(directory))
    gist = None if meta is None else meta.get("gist")
    return None if gist is None else GistTokens.from_dict(gist, str(path))


def gist_for_tokenizer(spec: GistTokens, tokenizer, where: str) -> None:
    """Add the gist token to the tokenizer; it must get the id the adapter was trained with."""
    token_id = add_gist_token(tokenizer, spec.token)
    if token_id != spec.token_id:
        p = Problems(f"adapter {where!r} does not fit this tokenizer")
        p.add(f"gist token {spec.token!r} (id {spec.token_id})", f"this tokenizer gives it id {token_id}",
              "load the tokenizer of the base model the adapter was trained on")
        p.raise_if_any()


def load_adapter(model: nn.Module, directory: str | os.PathLike, name: str = DEFAULT_NAME,
                 tokenizer=None) -> nn.Module:
    """Add the adapter saved in `directory` (slimtune's or PEFT's format) to `model` under
    `name`, in place. All or nothing: on any error the model is left as it was. An adapter
    trained with gist tokens brings its gist row; pass the `tokenizer` to have the gist token
    added to it too."""
    cfg, tensors, _ = read_adapter(directory, model)
    gist = saved_gist(directory)
    if gist is not None and tokenizer is not None:
        gist_for_tokenizer(gist, tokenizer, str(directory))
    trainable = {id(p): p.requires_grad for p in model.parameters()}  # add_adapter freezes the base
    add_adapter(model, cfg, name, share=False)  # shared only once its saved tensors are in
    try:
        if gist is not None:
            add_gist_tokens(model, gist, name)
        copy_into_adapter(model, tensors, str(directory), name)
        share_frozen(model, name)
    except BaseException:
        delete_adapter(model, name)
        for p in model.parameters():
            p.requires_grad_(trainable.get(id(p), p.requires_grad))
        raise
    return model


def load_adapter_weights(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> nn.Module:
    """Copy the saved tensors into the adapter the model already carries (resume, reload)."""
    _, tensors, _ = read_adapter(directory, model)
    copy_into_adapter(model, tensors, str(directory), name)
    return model


def export_peft_lora(model: nn.Module, directory: str | os.PathLike, name: str | None = None) -> Path:
    """Write the plain-LoRA equivalent of a low-rank adapter in PEFT's format (servers such as
    vLLM load it): exact, at the same rank."""
    cfg = get_config(model, name)
    if cfg is None:
        _nothing_to_save(model)
    conf, tensors = P.lora_equivalent(model, cfg, name)
    refuse_non_finite(tensors, "the LoRA export")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    conf["peft_version"] = _peft_version()
    write_tensors(out / WEIGHTS_NAME, tensors)
    write_json(out / CONFIG_NAME, conf)
    return out
