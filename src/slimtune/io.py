"""Save and load adapters: `adapter_config.json` + `adapter_model.safetensors`.

Only JSON and safetensors are read; nothing is unpickled. Files are written to a temporary
name and renamed, so a crash never leaves a half-written adapter behind. Frozen random
tensors are regenerated from the saved seed unless the config says `save_frozen`.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from . import __version__
from . import targets as T
from .config import config_from_dict, to_dict
from .errors import Problems
from .inject import add_adapter, get_config
from .ops import adapter_layers, frozen_adapter_tensors, trainable_parameters

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
FORMAT = "slimtune-adapter"


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    cfg = get_config(model)
    tensors = dict(trainable_parameters(model))
    if getattr(cfg, "save_frozen", False):
        tensors.update(frozen_adapter_tensors(model))
    return tensors


def _fingerprint(model: nn.Module) -> dict:
    return {"architecture": type(model).__name__,
            "model_type": getattr(model.config, "model_type", None),
            "name_or_path": getattr(model.config, "_name_or_path", None) or None,
            "layers": {n: list(T.dims(layer.base)) for n, layer in adapter_layers(model)}}


def save_adapter(model: nn.Module, directory: str | os.PathLike, tensors: dict | None = None) -> Path:
    """Write the model's adapter to `directory` (created if needed). `tensors`: the adapter's
    state dict already gathered (FSDP2: see parallel.full_tensors); default: read from the model."""
    cfg = get_config(model)
    if cfg is None:
        p = Problems("nothing to save")
        p.add(f"model {type(model).__name__}", "it carries no adapter", "call slimtune.add_adapter(model, config) first")
        p.raise_if_any()
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = adapter_state_dict(model) if tensors is None else tensors
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    meta = {"format": FORMAT, "slimtune_version": __version__, "config": to_dict(cfg), "base_model": _fingerprint(model)}
    _atomic_write(out / WEIGHTS_NAME, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    _atomic_write(out / CONFIG_NAME, lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))
    return out


def read_adapter_config(directory: str | os.PathLike) -> dict:
    d = Path(directory)
    p = Problems(f"cannot load adapter from {str(d)!r}")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (d / name).is_file():
            p.add(f"{d / name}", "the file does not exist", f"point at a directory written by slimtune.save_adapter "
                  f"(it holds {CONFIG_NAME} and {WEIGHTS_NAME})")
    p.raise_if_any()
    try:
        meta = json.loads((d / CONFIG_NAME).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        p.add(str(d / CONFIG_NAME), f"not valid JSON ({e})", "restore the file from the adapter's writer")
        p.raise_if_any()
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else meta
        p.add(f"format={fmt!r}", f"{CONFIG_NAME} was not written by slimtune (a PEFT adapter?)",
              "load PEFT adapters with peft.PeftModel.from_pretrained")
    p.raise_if_any()
    return meta


def load_adapter(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Add the adapter saved in `directory` to `model` (a fresh base model), in place."""
    meta = read_adapter_config(directory)
    cfg = config_from_dict(meta["config"])
    saved = meta.get("base_model", {})
    p = Problems(f"adapter {str(directory)!r} does not fit {type(model).__name__}")
    if saved.get("architecture") != type(model).__name__:
        p.add(f"architecture {saved.get('architecture')!r}", f"the adapter was trained on another architecture "
              f"than this model's {type(model).__name__!r}", f"load base model {saved.get('name_or_path')!r}")
    have = {n: list(T.dims(m)) for n, m in T.adaptable_layers(model).items()}
    for name, shape in saved.get("layers", {}).items():
        if name not in have:
            p.add(f"layer {name!r}", "the model has no such linear layer", "load the base model it was trained on")
        elif have[name] != shape:
            p.add(f"layer {name!r} (in, out)={tuple(shape)}", f"this model's is {tuple(have[name])}",
                  f"load the base model it was trained on ({saved.get('name_or_path')!r})")
        if len(p.items) >= 8:
            break
    p.raise_if_any()
    add_adapter(model, cfg)
    return load_adapter_weights(model, directory)


def load_adapter_weights(model: nn.Module, directory: str | os.PathLike) -> nn.Module:
    """Copy the saved tensors into the adapter `model` already carries (resume, reload)."""
    p = Problems(f"adapter {str(directory)!r} does not fit this model's adapter")
    expected = adapter_state_dict(model)
    tensors = load_file(str(Path(directory) / WEIGHTS_NAME))
    for k in sorted(set(expected) - set(tensors)):
        p.add(f"tensor {k!r}", "missing from the saved file", "re-save the adapter; the file is incomplete")
    for k in sorted(set(tensors) - set(expected)):
        p.add(f"tensor {k!r}", "in the file but not in this adapter", "the config and the weights disagree; re-save")
    for k in sorted(set(tensors) & set(expected)):
        if tensors[k].shape != expected[k].shape:
            p.add(f"tensor {k!r} of shape {tuple(tensors[k].shape)}", f"expected {tuple(expected[k].shape)}",
                  "re-save the adapter")
    p.raise_if_any()
    from .parallel import shard_like

    with torch.no_grad():
        for k in sorted(tensors):  # sorted: under FSDP2 every rank scatters in the same order
            expected[k].copy_(shard_like(tensors[k], expected[k]))
    return model
