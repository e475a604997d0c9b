"""Reading and writing the files adapters and checkpoints live in, safely.

Only JSON and safetensors are read; nothing is unpickled. Writes go to a temporary name in the
same directory and are renamed into place, so a crash never leaves a half-written file. Reads
turn a missing, truncated or corrupt file into one clear error that names it, and refuse
tensors that are not finite.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import Problems


def atomic_write(path: Path, write) -> None:
    """write(tmp_path) then rename onto path."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: Path, data: dict) -> None:
    atomic_write(path, lambda p: Path(p).write_text(json.dumps(data, indent=2, allow_nan=False) + "\n"))


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    atomic_write(path, lambda p: save_file(tensors, p, metadata={"format": "pt", **(metadata or {})}))


def read_json(path: Path, what: str = "file") -> dict:
    """A JSON object from path (a UTF-8 byte-order mark is accepted)."""
    p = Problems(f"cannot read {what}")
    if not path.is_file():
        p.add(str(path), "a directory, not a file" if path.is_dir() else "the file does not exist",
              "point at the directory that holds it")
        p.raise_if_any()
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        p.add(str(path), f"not valid JSON ({e})", "restore the file from whatever wrote it")
        p.raise_if_any()
    if not isinstance(data, dict):
        p.add(str(path), f"holds a {type(data).__name__}, not a JSON object", "restore the file from whatever wrote it")
        p.raise_if_any()
    return data


def read_tensors(path: Path, what: str = "tensors") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, header metadata) of a safetensors file, on the CPU; every tensor finite."""
    p = Problems(f"cannot read {what}")
    if not path.is_file():
        p.add(str(path), "the file does not exist", "point at a directory that holds it")
        p.raise_if_any()
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for a truncated or corrupt header
        size = path.stat().st_size
        cause = "the file is empty" if size == 0 else f"not a readable safetensors file ({type(e).__name__}: {e})"
        p.add(f"{path} ({size} bytes)", cause + " (truncated by a crash or a partial copy?)",
              "restore the file, or write it again")
        p.raise_if_any()
    for k in non_finite(tensors):
        p.add(f"tensor {k!r} in {path}", "it holds inf or NaN (written by a run that diverged?)",
              "use a file written before training diverged, or train again with a lower learning rate")
    p.raise_if_any()
    return tensors, meta


def non_finite(tensors: dict[str, torch.Tensor], most: int = 5) -> list[str]:
    """The names of (at most `most`) float tensors that hold inf or NaN."""
    return [k for k, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()][:most]


def refuse_non_finite(tensors: dict[str, torch.Tensor], what: str) -> None:
    p = Problems(f"{what} refused")
    for k in non_finite(tensors):
        p.add(f"tensor {k!r}", "it holds inf or NaN (training diverged?)",
              "lower the learning rate and train again; nothing was written")
    p.raise_if_any()
