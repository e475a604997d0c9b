"""Training checkpoints: adapter, optimiser, schedule, RNG and data position, atomically.

    OUT/checkpoints/step-000100/
        adapter_config.json, adapter_model.safetensors   the adapter (slimtune.load_adapter reads it)
        optimizer.safetensors                             AdamW moments, flattened
        rng.safetensors                                   torch CPU (and CUDA) generator states
        trainer_state.json                                step, data position, schedule, param groups, config
    OUT/checkpoints/latest                                name of the newest complete checkpoint

A checkpoint is written into a temporary directory, flushed, then renamed into place: a
kill at any moment leaves the previous checkpoint intact, and a half-written directory is
never taken for a checkpoint, and leftovers of a crash are removed by the next run
(`clean_leftovers`). Only JSON and safetensors are read back; nothing is unpickled. A
checkpoint is read whole before anything is restored: `resume` falls back to the newest one
that reads completely, and says which it skipped.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from ..errors import Problems, SlimtuneError
from ..formats.adapter import copy_into_adapter, adapter_state_dict, read_adapter, save_adapter
from ..formats.files import read_json, read_tensors
from ..formats.sharding import full_tensors, shard_like

STATE = "trainer_state.json"  # written last: its presence marks a complete checkpoint


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors = full_tensors({f"{i}.{k}": v for i, st in sd["state"].items() for k, v in st.items() if torch.is_tensor(v)})
    tensors = {k: v.cpu().contiguous() for k, v in tensors.items()}
    return tensors, {"param_groups": sd["param_groups"], "state_keys": {str(i): list(st) for i, st in sd["state"].items()}}


def save_checkpoint(root: str | Path, step: int, model, opt, state: dict, keep: int = 2, write: bool = True,
                    name: str | None = None) -> Path:
    """Write checkpoint `step` of adapter `name` (the active one) under root/checkpoints
    atomically; keep the newest `keep`. Under FSDP2 every rank calls this (the tensors are
    gathered) and only `write=True` writes."""
    adapter = full_tensors(adapter_state_dict(model, name))
    tensors, opt_meta = _optimizer_tensors(opt)
    ckpts = Path(root) / "checkpoints"
    final = ckpts / f"step-{step:06d}"
    if not write or (final / STATE).is_file():
        return final
    ckpts.mkdir(parents=True, exist_ok=True)
    tmp = ckpts / f".tmp-step-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    save_adapter(model, tmp, name=name, tensors=adapter)
    save_file(tensors, str(tmp / "optimizer.safetensors"))
    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_file(rng, str(tmp / "rng.safetensors"))
    py = random.getstate()
    full = {**state, "step": step, "optimizer": opt_meta, "python_random": [py[0], list(py[1]), py[2]]}
    (tmp / STATE).write_text(json.dumps(full, indent=1, allow_nan=False))
    for f in tmp.iterdir():
        with open(f, "rb+") as fh:
            os.fsync(fh.fileno())
    _fsync_dir(tmp)
    if final.exists():  # an incomplete leftover of an earlier run
        shutil.rmtree(final)
    os.rename(tmp, final)
    latest_tmp = ckpts / f".latest-{os.getpid()}"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, ckpts / "latest")
    _fsync_dir(ckpts)
    for old in sorted(ckpts.glob("step-*"))[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under root/checkpoints, or None."""
    ckpts = Path(root) / "checkpoints"
    pointer = ckpts / "latest"
    if pointer.is_file():
        named = ckpts / pointer.read_text().strip()
        if (named / STATE).is_file():
            return named
    done = sorted(p for p in ckpts.glob("step-*") if (p / STATE).is_file())
    return done[-1] if done else None


def clean_leftovers(root: str | Path) -> list[Path]:
    """Remove what a crashed run left half-written under root/checkpoints; returns it."""
    ckpts = Path(root) / "checkpoints"
    gone = sorted(ckpts.glob(".tmp-step-*")) + sorted(ckpts.glob(".latest-*")) if ckpts.is_dir() else []
    for path in gone:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
    return gone


def read_checkpoint(path: str | Path, model) -> dict:
    """Every file of checkpoint `path`, read and checked; nothing is restored yet."""
    path = Path(path)
    if not (path / STATE).is_file():
        p = Problems("cannot resume")
        p.add(f"checkpoint {str(path)!r}", f"it has no {STATE} (incomplete or not a checkpoint)",
              "point at OUT/checkpoints/step-N written by slimtune train, or resume from OUT")
        p.raise_if_any()
    state = read_json(path / STATE, "the checkpoint's trainer state")
    _, adapter, _ = read_adapter(path, model)
    optimizer, _ = read_tensors(path / "optimizer.safetensors", "the checkpoint's optimiser state")
    rng, _ = read_tensors(path / "rng.safetensors", "the checkpoint's random-number state")
    return {"state": state, "adapter": adapter, "optimizer": optimizer, "rng": rng, "path": path}


def restore(ckpt: dict, model, opt, name: str | None = None) -> dict:
    """Restore adapter `name` (the active one), optimiser and RNG from a read checkpoint; return
    its trainer state."""
    state, tensors, path = ckpt["state"], ckpt["optimizer"], ckpt["path"]
    meta = state["optimizer"]
    groups = meta["param_groups"]
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in opt.state_dict()["param_groups"]]:
        p = Problems("cannot resume")
        p.add(f"checkpoint {str(path)!r}", "its optimiser has different parameter groups than this run",
              "resume with the same method and adapter settings it was written with")
        p.raise_if_any()
    copy_into_adapter(model, ckpt["adapter"], str(path), name)
    params = [p for g in opt.param_groups for p in g["params"]]
    opt_state = {int(i): {k: shard_like(tensors[f"{i}.{k}"], params[int(i)]) if tensors[f"{i}.{k}"].dim() else
                          tensors[f"{i}.{k}"] for k in keys}
                 for i, keys in sorted(meta["state_keys"].items(), key=lambda kv: int(kv[0]))}
    opt.load_state_dict({"state": opt_state, "param_groups": groups})
    rng = ckpt["rng"]
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        states = [rng[k] for k in sorted(rng) if k.startswith("cuda")]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)
    v, internal, gauss = state["python_random"]
    random.setstate((v, tuple(internal), gauss))
    return state


def load_checkpoint(path: str | Path, model, opt) -> dict:
    """Read checkpoint `path` whole, then restore adapter, optimiser and RNG from it."""
    return restore(read_checkpoint(path, model), model, opt)


def newest_readable(root: str | Path, model) -> tuple[dict | None, list[tuple[Path, str]]]:
    """The newest complete checkpoint under root/checkpoints that reads whole, and those skipped
    on the way (newer ones that did not read, with why)."""
    ckpts = Path(root) / "checkpoints"
    done = sorted((p for p in ckpts.glob("step-*") if (p / STATE).is_file()), reverse=True) if ckpts.is_dir() else []
    skipped = []
    for path in done:
        try:
            return read_checkpoint(path, model), skipped
        except SlimtuneError as e:
            skipped.append((path, str(e).splitlines()[0]))
    return None, skipped
